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
import resource
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import SimpleITK as sitk
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nnunetv2_dsm.data.totalseg_example import TEST_PATIENT_C, build_example_dataset, write_test_patient_c  # noqa: E402
from nnunetv2_dsm.evaluation.leaderboard import build_leaderboard, collect_results  # noqa: E402
from nnunetv2_dsm.evaluation.leaderboard import write_leaderboard as write_leaderboard_files  # noqa: E402
from nnunetv2_dsm.io import atomic  # noqa: E402
from nnunetv2_dsm.trainers.benchmark import LEARNING_LOG, DSMTrainer_Benchmark  # noqa: E402
from nnunetv2_dsm.trainers.sdseg_trainer import SDSegTrainer  # noqa: E402
from nnunetv2_dsm.visualization import overlay_png  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
DATASET_ID = "990"
DATASET = "Dataset990_TSExample"
CLASSES = ["liver", "spleen", "stomach", "aorta", "pancreas"]
HELD_OUT = "tsexample_B"
MODELS = {
    "dsm": ("DSMTrainer_Benchmark", "DSMPlansCPU"),
    "nnunet": ("DSMBaselineTrainer_Benchmark", "ResEncPlansCPU"),
    # both with contrast-phase augmentation (patient A is non-contrast CT, patient B contrast-enhanced)
    "dsm_contrast_aug": ("DSMTrainer_Benchmark_contrastAug", "DSMPlansCPU"),
    "nnunet_contrast_aug": ("DSMBaselineTrainer_Benchmark_contrastAug", "ResEncPlansCPU"),
    # variants of DSM, measured against the same runs
    "dsm_sgd": ("DSMTrainer_Benchmark_SGD", "DSMPlansCPU"),
    "dsm_kmeans_void": ("DSMTrainer_Benchmark_kmeansVoid", "DSMPlansCPU"),
    "dsm_static_queries": ("DSMTrainer_Benchmark_staticQueries", "DSMPlansCPU"),
    "dsm_no_ssm": ("DSMTrainer_Benchmark_noSSM", "DSMPlansCPU"),
    "dsm_bg_query": ("DSMTrainer_Benchmark_bgQuery", "DSMPlansCPU"),
    "dsm_bg_query_update_drop": ("DSMTrainer_Benchmark_bgQuery_updateDrop", "DSMPlansCPU"),
    # SDSeg architecture, trained from scratch (no Stable Diffusion prior): SDSegTrainer on SDSegPlansCPU
    "sdseg": ("SDSegTrainer_Benchmark", "SDSegPlansCPU"),
    "sdseg_final_step": ("SDSegTrainer_Benchmark_finalStep", "SDSegPlansCPU"),
}
# Planner of each plans file beyond DSMPlansCPU (same preprocessed data, nnU-Net's plan_experiment).
EXTRA_PLANNERS = {"ResEncPlansCPU": "DSMBaselinePlannerCPU", "SDSegPlansCPU": "SDSegPlannerCPU"}


def run(cmd: list[str], env: dict, log) -> float:
    """Run a stock command, its output appended to the log; returns the CPU seconds it used."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {result.returncode}); see {log.name}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"  {cmd[0].split('/')[-1]} {' '.join(cmd[1:4])}: {time.time() - start:.0f} s wall, {cpu:.0f} s CPU",
          flush=True)
    return cpu


def run_until(cmd: list[str], env: dict, log, learning_log: Path, epochs: int) -> float:
    """Run a training until its learning log holds ``epochs`` epochs, then stop it; returns its CPU seconds."""
    learning_log.unlink(missing_ok=True)
    log.write(f"$ {' '.join(cmd)}  (stopped after {epochs} epochs)\n")
    log.flush()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None:
        time.sleep(5)
        if learning_log.is_file() and len(json.loads(learning_log.read_text())["epochs"]) >= epochs:
            proc.terminate()
            proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def dice_per_class(prediction: Path, reference: Path, labels: dict[str, int]) -> dict[str, float]:
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(prediction)))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))
    out = {}
    for name, label in labels.items():
        p, r = pred == label, ref == label
        denominator = p.sum() + r.sum()
        out[name] = round(float(2 * (p & r).sum() / denominator), 4) if denominator else float("nan")
    out["mean"] = round(float(np.nanmean([out[n] for n in labels])), 4)
    return out


def predict(name: str, inputs: Path, out: Path, configuration: str, env: dict, log) -> float:
    """``nnUNetv2_predict`` of every image in ``inputs`` with model ``name`` (fold 0); returns its CPU seconds."""
    trainer, plans = MODELS[name]
    return run([str(BIN / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", DATASET_ID, "-c",
                configuration, "-f", "0", "-tr", trainer, "-p", plans, "-device", "cpu", "-npp", "1", "-nps", "1"],
               env, log)


def predict_patient_c(name: str, work: Path, env: dict, log, configuration: str, aorta_label: int) -> dict:
    """Predict test patient C (chest CT angiogram, aorta labelled only) with model ``name``; its aorta Dice."""
    folder = work / "test_patient_c"
    if not (folder / "labels" / f"{TEST_PATIENT_C}.nii.gz").is_file():
        write_test_patient_c(folder, aorta_label)
    out = work / f"prediction_{name}_patient_c"
    seconds = predict(name, folder / "images", out, configuration, env, log)
    dice = dice_per_class(out / f"{TEST_PATIENT_C}.nii.gz", folder / "labels" / f"{TEST_PATIENT_C}.nii.gz",
                          {"aorta": aorta_label})
    return {"aorta": dice["aorta"], "predict_cpu_seconds": round(seconds, 1)}


def draw_overlays(models: list[str], work: Path, dataset: Path, labels: dict[str, int], out: Path) -> None:
    """Each model's prediction of held-out patient B beside B's reference, on the slice with most organ."""
    names = {label: name for name, label in labels.items()}
    for name in models:
        prediction = work / f"prediction_{name}" / f"{HELD_OUT}.nii.gz"
        png = overlay_png(dataset / "imagesTr" / f"{HELD_OUT}_0000.nii.gz", prediction, out / f"{name}_B.png", names,
                          dataset / "labelsTr" / f"{HELD_OUT}.nii.gz", title=f"{name}, patient B")
        print(f"  {png}", flush=True)


def plot(curves: dict, final: dict, out_png: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"dsm": "tab:red", "nnunet": "tab:blue", "dsm_sgd": "tab:orange", "dsm_kmeans_void": "tab:purple",
               "dsm_static_queries": "tab:green", "dsm_no_ssm": "tab:brown", "dsm_bg_query": "tab:pink",
               "dsm_bg_query_update_drop": "tab:gray", "sdseg": "tab:olive", "sdseg_final_step": "tab:cyan",
               "dsm_contrast_aug": "darkred", "nnunet_contrast_aug": "navy"}
    labels = {"dsm": "DSM stage 1", "nnunet": "nnU-Net (nnUNetTrainer)", "dsm_sgd": "DSM, SGD everywhere",
              "dsm_kmeans_void": "DSM, k-means void", "dsm_static_queries": "DSM, queries not updated per image",
              "dsm_no_ssm": "DSM without SSM", "dsm_bg_query": "DSM, background query",
              "dsm_bg_query_update_drop": "DSM, background query + update dropout",
              "sdseg": "SDSeg (from scratch)", "sdseg_final_step": "SDSeg, 1/4 of samples at t=T-1",
              "dsm_contrast_aug": "DSM, contrast-phase aug.", "nnunet_contrast_aug": "nnU-Net, contrast-phase aug."}
    for name, epochs in curves.items():
        epochs = [e for e in epochs if e.get("phase") != "autoencoder"]  # SDSeg's reconstruction Dice
        iterations = [e["iterations"] for e in epochs]
        cpu = [e["cpu_seconds"] for e in epochs]
        mean_dice = [float(np.mean(e["pseudo_dice"])) for e in epochs]
        label = labels.get(name, name)
        for ax, x in zip(axes, (iterations, cpu)):
            ax.plot(x, mean_dice, "o-", color=colours.get(name), label=f"{label}: pseudo-Dice on B patches")
            if name not in final:
                continue
            ax.plot([x[-1]], [final[name]["mean"]], "*", markersize=14, color=colours.get(name),
                    label=f"{label}: full-volume Dice on B ({final[name]['mean']:.3f})")
    axes[0].set_xlabel("training iterations")
    axes[1].set_xlabel("training CPU seconds")
    for ax in axes:
        ax.set_ylabel("mean Dice over 5 organs, held-out patient B")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic.atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def mark_autoencoder_epochs(name: str, epochs: list[dict]) -> list[dict]:
    """SDSeg's first epochs train its mask autoencoder: their pseudo-Dice is reconstruction Dice, not a
    prediction, so they are marked ``phase: autoencoder`` and left out of the plotted curves."""
    if not name.startswith("sdseg"):
        return epochs
    if not epochs:
        return epochs
    first = SDSegTrainer.autoencoder_epochs_of(max(e["epoch"] for e in epochs) + 1)
    return [{**e, "phase": "autoencoder" if e["epoch"] < first else "diffusion"} for e in epochs]


def replot(out: Path) -> None:
    """Redraw the PNG of an existing results file (after marking SDSeg's autoencoder epochs)."""
    payload = json.loads(out.read_text())
    payload["curves"] = {k: mark_autoencoder_epochs(k, v) for k, v in payload["curves"].items()}
    atomic.write_json(out, payload, strict=False)
    final = {k[: -len("_heldout_dice")]: v for k, v in payload.items() if k.endswith("_heldout_dice")}
    config = payload["config"]
    plot(payload["curves"], final, out.with_suffix(".png"),
         f"Trained on patient A, Dice on held-out patient B (TotalSegmentator labels); {config['configuration']}, "
         f"{config['spacing_mm'][0]:g} mm, {config['epochs']}x{config['iterations_per_epoch']} iterations "
         f"(SDSeg: iterations per model in the JSON), CPU {config['threads']} threads")


def merge_earlier(payload: dict, earlier: dict, models_now: list[str]) -> None:
    """Keep the results of models not run now (from ``earlier``, the previous --out file), marked as such."""
    per_model = ("cpu_seconds", "status", "curves", "iterations_per_model", "predict_cpu_seconds")
    kept = [m for m in earlier.get("curves", {}) if m not in models_now]
    for key in per_model:
        for model in kept:
            if model in earlier.get(key, {}):
                payload.setdefault(key, {})[model] = earlier[key][model]
    for model in kept:
        payload.setdefault("iterations_per_model", {}).setdefault(model, earlier.get("iterations"))
        for suffix in ("_heldout_dice", "_seed_to_seed_dice", "_patient_c_dice"):
            if model + suffix in earlier:
                payload[model + suffix] = earlier[model + suffix]
    if kept:
        payload["earlier_runs"] = {**earlier.get("earlier_runs", {}),
                                   **{m: {"command": earlier.get("command"), "trainers": earlier.get("config", {}).get(
                                       "trainers", {}).get(m)} for m in kept if m not in earlier.get("earlier_runs", {})}}
    for key in ("ratio_dsm_over_nnunet_mean_dice",):
        if key in earlier and key not in payload:
            payload[key] = earlier[key]


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

    inputs = work / "heldout_images"
    inputs.mkdir(exist_ok=True)
    link = inputs / f"{HELD_OUT}_0000.nii.gz"
    if not link.exists():
        link.symlink_to(dataset / "imagesTr" / f"{HELD_OUT}_0000.nii.gz")
    labels = {k: v for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items()
              if k != "background"}

    if args.overlays:
        draw_overlays(args.models, work, dataset, labels, args.out.with_name(args.out.stem + "_overlays"))
        return
    if args.patient_c:
        payload = json.loads(args.out.read_text())
        for name in args.models:
            payload[f"{name}_patient_c_dice"] = predict_patient_c(name, work, env, log, args.configuration,
                                                                  labels["aorta"])
            print(f"  {name}: patient C aorta Dice {payload[f'{name}_patient_c_dice']['aorta']}", flush=True)
        atomic.write_json(args.out, payload, strict=False)
        return

    curves, final, cpu_seconds, status, iterations, seed_agreement = {}, {}, {}, {}, {}, {}
    patient_c = {}
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
        final[name] = dice_per_class(out / f"{HELD_OUT}.nii.gz", dataset / "labelsTr" / f"{HELD_OUT}.nii.gz", labels)
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
                   "nnUNet_n_proc_DA": 0, "seed": args.seed, "mirroring": True,
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
    for name, dice in seed_agreement.items():
        payload[f"{name}_seed_to_seed_dice"] = dice
    for name, dice in patient_c.items():
        payload[f"{name}_patient_c_dice"] = dice
    if args.merge and args.out.exists():
        merge_earlier(payload, json.loads(args.out.read_text()), args.models)
    if {"dsm", "nnunet"} <= set(final):
        payload["ratio_dsm_over_nnunet_mean_dice"] = round(final["dsm"]["mean"] / max(final["nnunet"]["mean"], 1e-6), 4)
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
