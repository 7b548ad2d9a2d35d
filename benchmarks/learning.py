"""Does DSM stage 1 learn? DSM and stock nnU-Net trained on one patient, tested on another.

Everything runs through the stock nnU-Net commands, in one invocation, on the same preprocessed data:

1. ``nnunetv2_dsm example-dataset`` with the organs both patients carry (liver, spleen, stomach, aorta,
   pancreas): patient A (abdomen and pelvis, 3 mm) and patient B (upper abdomen, another scanner,
   from DICOM), both stored RAS, listed in ``dsm.patients`` so the DSM planners write patient-level
   folds: fold 0 trains on A only and validates on B.
2. ``nnUNetv2_plan_and_preprocess -pl DSMPlannerCPU`` and ``nnUNetv2_plan_experiment -pl
   DSMBaselinePlannerCPU`` (ResEnc with the same sizes; same preprocessed data identifier).
3. ``nnUNetv2_train`` fold 0, ``DSMTrainer_Benchmark -p DSMPlansCPU`` and ``DSMBaselineTrainer_Benchmark
   -p ResEncPlansCPU`` (stock ``nnUNetTrainer``): the same epochs x iterations, augmentation (mirroring
   included), seed (``DSM_SEED``) and threads, one after the other.
4. ``nnUNetv2_predict`` of patient B with each model, and Dice per class against B's labels.

Labels are TotalSegmentator model output and the training set is a single patient: the numbers say
whether each method learns organs that transfer to an unseen patient and scanner at this CPU budget,
not how either performs on a real dataset. Writes ``benchmarks/results/learning_<device>.json`` and a
PNG of held-out Dice against iterations and against CPU seconds (per-epoch nnU-Net validation
pseudo-Dice, i.e. on patches of patient B; the final points are full-volume Dice).

    python benchmarks/learning.py --work /tmp/dsm_learning
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _learning_report import (
    dice_per_class,
    mark_autoencoder_epochs,
    merge_earlier,
    pair_ratios,
    plot,
    replot,
)
from _learning_runs import (  # noqa: F401  (RESULTS and run are used by sdseg_sampling.py)
    BIN,
    CLASSES,
    DATASET,
    DATASET_ID,
    EXTRA_PLANNERS,
    HELD_OUT,
    MODELS,
    RESULTS,
    draw_overlays,
    extend_results,
    heldout_scores,
    input_folder,
    predict,
    predict_patient_c,
    run,
    run_until,
)

from nnunetv2_dsm.data.totalseg_example import build_example_dataset
from nnunetv2_dsm.evaluation.leaderboard import build_leaderboard, collect_results
from nnunetv2_dsm.evaluation.leaderboard import write_leaderboard as write_leaderboard_files
from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.trainers.benchmark import LEARNING_LOG, DSMTrainer_Benchmark


def leaderboard_folder(out: Path) -> Path:
    return out.with_name(out.stem + "_leaderboard")


def write_leaderboard(results: Path, models: list[str], configuration: str, out: Path) -> None:
    """The models' rows of ``nnunetv2_dsm leaderboard`` (nnU-Net's validation on held-out patient B) to ``out``."""
    wanted = {(*MODELS[m], configuration) for m in models if m in MODELS}
    folds = [f for f in collect_results([results]) if (f.trainer, f.plans, f.configuration) in wanted]
    if folds:
        paths = write_leaderboard_files(build_leaderboard(folds), out)
        preface = ("Data: real CT with TotalSegmentator labels (model output); every model trained on patient A "
                   "only, and fold 0's validation case is held-out patient B (another scanner). SDSegTrainer rows "
                   "are the SDSeg architecture trained from scratch (no Stable Diffusion prior). Budgets and CPU "
                   f"seconds: {out.name.replace('_leaderboard', '')}.json.")
        title, rest = paths["md"].read_text().split("\n", 1)
        atomic.write_text(paths["md"], f"{title}\n\n{preface}\n{rest}")
        print("leaderboard:", ", ".join(str(p) for p in paths.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for nnUNet_raw/preprocessed/results")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0],
                        help="target spacing (nnU-Net's -overwrite_target_spacing); patient A is stored at 3 mm")
    parser.add_argument("--epochs", type=int, default=DSMTrainer_Benchmark.epochs)
    parser.add_argument("--iterations", type=int, default=DSMTrainer_Benchmark.iterations)
    parser.add_argument("--sdseg-epochs", type=int, default=6,
                        help="SDSeg's epochs (of --iterations each): a step costs about 2.5x nnU-Net's, so 6 x 250 "
                             "iterations use about the CPU seconds of nnU-Net's 16 x 250 (see cpu_seconds)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results of models not run now from the existing --out file (they are "
                             "listed under 'earlier_runs' with the command that made them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS / "learning_cpu.json")
    parser.add_argument("--stop-after-epochs", type=int, default=None,
                        help="screening: stop each training after this many epochs of the schedule (the learning "
                             "rate follows the full --epochs schedule) and record its curve, without prediction")
    parser.add_argument("--collect", action="store_true",
                        help="with --stop-after-epochs: train nothing, collect the curves of runs already in WORK")
    parser.add_argument("--overlays", action="store_true",
                        help="only draw overlays of the --models' predictions of patient B (already in WORK) on CT, "
                             "beside the reference, to <--out>_overlays/")
    parser.add_argument("--patient-c", action="store_true",
                        help="only predict test patient C (aorta only) with the --models already trained in WORK and "
                             "add their aorta Dice to --out")
    parser.add_argument("--training-patient", action="store_true",
                        help="only predict training patient A with the trained --models and add their Dice on it "
                             "(<model>_training_patient_dice: how well each fitted the patient it saw) to --out")
    parser.add_argument("--repredict", metavar="REASON",
                        help="only predict held-out patient B again with the trained --models (e.g. after a change "
                             "of inference), replacing their Dice and confusion in --out and keeping the previous "
                             "Dice under 'repredicted' with REASON")
    parser.add_argument("--confusion", action="store_true",
                        help="only add to --out where each organ of patient B went in the --models' predictions "
                             "already in WORK (fractions of its voxels per predicted label)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG of --out from its JSON")
    parser.add_argument("--leaderboard", action="store_true",
                        help="only write the leaderboard of the models in --out from the trained runs in WORK")
    args = parser.parse_args()
    if args.replot:
        replot(args.out)
        return
    if args.leaderboard:
        done = [k[: -len("_heldout_dice")] for k in json.loads(args.out.read_text()) if k.endswith("_heldout_dice")]
        write_leaderboard(args.work.resolve() / "results", done, args.configuration, leaderboard_folder(args.out))
        return
    if args.collect and not args.stop_after_epochs:
        parser.error("--collect needs --stop-after-epochs")

    work = args.work.resolve()
    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res),
           "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f", "DSM_SEED": str(args.seed),
           "OMP_NUM_THREADS": str(args.threads), "nnUNet_def_n_proc": "1",
           "DSM_BENCHMARK_EPOCHS": str(args.epochs), "DSM_BENCHMARK_ITERATIONS": str(args.iterations)}
    env.pop("nnUNet_extTrainer", None)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "learning.log", "a")
    load_before = os.getloadavg()
    started = time.time()

    dataset = raw / DATASET
    if not dataset.exists():
        build_example_dataset(dataset, CLASSES)
    spacing = [str(s) for s in args.spacing]
    plans_file = pre / DATASET / "DSMPlansCPU.json"
    if not plans_file.exists():
        run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", DATASET_ID, "-pl", "DSMPlannerCPU", "-c",
             args.configuration, "-np", "1", "-overwrite_target_spacing", *spacing], env, log)
    for plans_name, planner in EXTRA_PLANNERS.items():
        if not (pre / DATASET / f"{plans_name}.json").exists():
            run([str(BIN / "nnUNetv2_plan_experiment"), "-d", DATASET_ID, "-pl", planner,
                 "-overwrite_target_spacing", *spacing], env, log)
    splits = json.loads((pre / DATASET / "splits_final.json").read_text())
    assert splits[0]["val"] == [HELD_OUT] and HELD_OUT not in splits[0]["train"], splits[0]

    inputs = input_folder(work / "heldout_images", dataset, HELD_OUT)
    labels = {k: v for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items()
              if k != "background"}

    if args.overlays:
        draw_overlays(args.models, work, dataset, labels, args.out.with_name(args.out.stem + "_overlays"))
        return
    if extend_results(args, work, dataset, inputs, labels, env, log):
        return
    curves, final, cpu_seconds, status, iterations, seed_agreement = {}, {}, {}, {}, {}, {}
    patient_c, confusions = {}, {}
    predict_seconds: dict[str, float] = {}
    for name in args.models:
        trainer, plans = MODELS[name]
        folder = res / DATASET / f"{trainer}__{plans}__{args.configuration}"
        train = [str(BIN / "nnUNetv2_train"), DATASET_ID, args.configuration, "0", "-tr", trainer, "-p", plans,
                 "-device", "cpu"]
        epochs = args.sdseg_epochs if name.startswith("sdseg") else args.epochs
        iterations[name] = epochs * args.iterations
        model_env = {**env, "DSM_BENCHMARK_EPOCHS": str(epochs)}
        if args.collect:
            cpu_seconds[name] = float("nan")
        elif args.stop_after_epochs:
            cpu_seconds[name] = run_until(train, model_env, log, folder / "fold_0" / LEARNING_LOG,
                                          args.stop_after_epochs)
        else:
            cpu_seconds[name] = run(train, model_env, log)
        curves[name] = mark_autoencoder_epochs(name, json.loads((folder / "fold_0" / LEARNING_LOG).read_text())["epochs"])
        if args.stop_after_epochs:
            curves[name] = curves[name][: args.stop_after_epochs]
        non_finite = [e["epoch"] for e in curves[name] if not np.isfinite(e["train_loss"])]
        status[name] = "diverged" if non_finite else "finite"
        if args.stop_after_epochs:
            status[name] += f", stopped after {len(curves[name])} of {args.epochs} epochs"
            continue
        out = work / f"prediction_{name}"
        predict_seconds[name] = predict(name, inputs, out, args.configuration, env, log)
        final[name], confusions[name] = heldout_scores(out, dataset, labels)
        print(f"  {name}: held-out Dice {final[name]}", flush=True)
        patient_c[name] = predict_patient_c(name, work, env, log, args.configuration, labels["aorta"])
        if name.startswith("sdseg"):
            # SDSeg's answer starts from noise: predict again from another seed and compare the two.
            other = work / f"prediction_{name}_seed1"
            predict(name, inputs, other, args.configuration, {**env, "DSM_SDSEG_NOISE_SEED": "1"}, log)
            seed_agreement[name] = dice_per_class(other / f"{HELD_OUT}.nii.gz", out / f"{HELD_OUT}.nii.gz", labels)

    payload = {
        "data": "real CT, two patients from the TotalSegmentator 2.18.0 sdist; labels are TotalSegmentator "
                "model output. Trained on patient A only, tested on patient B (another scanner, never seen).",
        "iterations": args.epochs * args.iterations,
        "iterations_per_model": iterations,
        "predict_cpu_seconds": {k: round(v, 1) for k, v in predict_seconds.items()},
        "cpu_seconds": {k: round(v, 1) if np.isfinite(v) else None for k, v in cpu_seconds.items()},
        "status": status,
        "curves": curves,
        "config": {"configuration": args.configuration, "spacing_mm": args.spacing, "epochs": args.epochs,
                   "iterations_per_epoch": args.iterations, "classes": CLASSES, "threads": args.threads,
                   "nnUNet_n_proc_DA": 0, "seed": args.seed,
                   "mirroring": {m: not m.endswith("_no_mirroring") for m in args.models},
                   "trainers": {k: MODELS[k] for k in args.models}},
        "command": " ".join(["python", *sys.argv]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "nnunetv2": _version("nnunetv2")},
        "device": platform.processor() or platform.machine(),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "wall_minutes": round((time.time() - started) / 60, 1),
    }
    if args.stop_after_epochs:
        payload["screen"] = (
            f"first {args.stop_after_epochs} epochs of each run on the full {args.epochs} x {args.iterations} schedule "
            "(learning rate as in the full run); the curves are nnU-Net's validation pseudo-Dice on patches of "
            "held-out patient B, per class in the order of 'classes'; no full-volume prediction")
        payload["classes"] = json.loads((dataset / "dataset.json").read_text())["labels"]
    for name, dice in final.items():
        payload[f"{name}_heldout_dice"] = dice
    for name, rows in confusions.items():
        payload[f"{name}_heldout_confusion"] = rows
    for name, dice in seed_agreement.items():
        payload[f"{name}_seed_to_seed_dice"] = dice
    for name, dice in patient_c.items():
        payload[f"{name}_patient_c_dice"] = dice
    if args.merge and args.out.exists():
        merge_earlier(payload, json.loads(args.out.read_text()), args.models)
    payload.update(pair_ratios(payload))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out, payload, strict=False)
    merged_final = {k[: -len("_heldout_dice")]: v for k, v in payload.items() if k.endswith("_heldout_dice")}
    plot(payload["curves"], merged_final, args.out.with_suffix(".png"),
         f"Trained on patient A, Dice on held-out patient B (TotalSegmentator labels); {args.configuration}, "
         f"{args.spacing[0]:g} mm, {args.epochs}x{args.iterations} iterations (SDSeg: iterations per model in the "
         f"JSON), CPU {args.threads} threads")
    write_leaderboard(res, list(merged_final), args.configuration, leaderboard_folder(args.out))
    print(json.dumps({k: v for k, v in payload.items() if k.endswith("_heldout_dice") or k.startswith("ratio")
                      or k == "cpu_seconds"}, indent=1))
    print(f"written {args.out}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
