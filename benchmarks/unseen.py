"""Does DSM find tumour types it never saw, better than post-hoc anomaly scores on stock nnU-Net?

One invocation, stock commands, one preprocessed dataset (``nnunetv2_dsm.data.unseen_benchmark``):

1. Training set: patient A of the TotalSegmentator example CT, 4 versions with synthetic *seen* tumours
   (liver, kidney); classes are the organs and the seen tumours only. Test set: held-out patients B
   (spleen and stomach tumours) and C (aortic lesions), *unseen* types in three sizes/contrasts each.
2. ``nnUNetv2_plan_and_preprocess -pl DSMPlannerCPU`` (2d, 3 mm) and ``nnUNetv2_plan_experiment -pl
   DSMBaselinePlannerCPU`` (ResEnc, same preprocessed data).
3. ``nnUNetv2_train`` fold ``all`` (every training case is patient A), contrast-phase augmentation in
   every model, one seed: DSM stage 1 (``--stage1-epochs``), DSM stage 2 from its weights
   (``-pretrained_weights``, ``--stage2-epochs``; optionally its no-AMVP ablation), and stock nnU-Net for the
   sum of both stages' epochs: the same number of training iterations as DSM stage 1 + stage 2.
4. Scores on the test cases: DSM stage 2 prompted with the unseen tumours' names (``nnunetv2_dsm
   predict --prompts``, with the anomaly mask prompt normalised per tile and, ``dsm_caserange``, per
   case) and its anomaly map; ``nnunetv2_dsm anomaly-posthoc`` (MSP, max-logit, energy,
   SML with statistics from the training images) on stock nnU-Net.
5. Per unseen type and score: voxel AUROC and FPR95 inside the host organ and inside the body, lesion
   detection at a 1 % body false-positive budget and Dice at that threshold
   (``nnunetv2_dsm.evaluation.lesions``); ``benchmarks/results/unseen_<device>.json`` and a PNG.

Labels: organs are TotalSegmentator model output, tumours synthetic. Three test types on two held-out
patients, one training patient: the numbers compare methods on the same data, not clinical accuracy.

    python benchmarks/unseen.py --work /tmp/dsm_unseen
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
DATASET_ID = "991"
DATASET = "Dataset991_UnseenTumours"
CONFIGURATION = "2d"
FOLD = "all"
# name -> (trainer, plans, epochs attribute of the arguments, stage-1 model it starts from)
MODELS = {
    "dsm_stage1": ("DSMTrainer_Benchmark_contrastAug", "DSMPlansCPU", "stage1_epochs", None),
    "dsm": ("DSMTrainerStage2_Benchmark_contrastAug", "DSMPlansCPU", "stage2_epochs", "dsm_stage1"),
    "nnunet": ("DSMBaselineTrainer_Benchmark_contrastAug", "ResEncPlansCPU", "total_epochs", None),
    "dsm_no_amvp": ("DSMTrainerStage2_Benchmark_contrastAug_noAMVP", "DSMPlansCPU", "stage2_epochs", "dsm_stage1"),
    "dsm_no_dqr": ("DSMTrainerStage2_Benchmark_contrastAug_noDQR", "DSMPlansCPU", "stage2_epochs", "dsm_stage1"),
    "diffugts": ("DiffuGTSTrainer_Benchmark_contrastAug", "DSMPlansCPU", "total_epochs", None),
    "diffugts_no_grounding": ("DiffuGTSTrainer_Benchmark_contrastAug_noGrounding", "DSMPlansCPU", "total_epochs", None),
}
POSTHOC_MODELS = ("nnunet",)
PROMPT_MODELS = ("dsm", "dsm_no_amvp", "dsm_no_dqr")
DIFFUGTS_MODELS = ("diffugts", "diffugts_no_grounding")


def run(cmd: list[str], env: dict, log) -> float:
    """Run a stock command with its output appended to the log; returns its wall seconds."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = time.time()
    result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {result.returncode}); see {log.name}")
    seconds = time.time() - start
    print(f"  {cmd[0].split('/')[-1]} {' '.join(cmd[1:5])}: {seconds:.0f} s", flush=True)
    return seconds


def model_folder(results: Path, name: str) -> Path:
    trainer, plans, _, _ = MODELS[name]
    return results / DATASET / f"{trainer}__{plans}__{CONFIGURATION}"


def prepare(work: Path, env: dict, log, seed: int) -> tuple[Path, Path]:
    from nnunetv2_dsm.data.unseen_benchmark import build_unseen_benchmark

    raw, pre = work / "raw" / DATASET, work / "preprocessed" / DATASET
    test = work / "test"
    if not raw.exists():
        build_unseen_benchmark(raw, test, seed=seed, overwrite=True)
    if not (pre / "DSMPlansCPU.json").exists():
        run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", DATASET_ID, "-pl", "DSMPlannerCPU", "-c",
             CONFIGURATION, "-np", "1", "-overwrite_target_spacing", "3", "3", "3"], env, log)
    if not (pre / "ResEncPlansCPU.json").exists():
        run([str(BIN / "nnUNetv2_plan_experiment"), "-d", DATASET_ID, "-pl", "DSMBaselinePlannerCPU",
             "-overwrite_target_spacing", "3", "3", "3"], env, log)
    return raw, test


def train(name: str, args, env: dict, log, results: Path) -> float:
    trainer, plans, epochs_of, start_from = MODELS[name]
    folder = model_folder(results, name)
    if (folder / f"fold_{FOLD}" / "checkpoint_final.pth").is_file():
        print(f"  {name}: already trained ({folder})", flush=True)
        return float("nan")
    cmd = [str(BIN / "nnUNetv2_train"), DATASET_ID, CONFIGURATION, FOLD, "-tr", trainer, "-p", plans, "-device", "cpu"]
    if (folder / f"fold_{FOLD}" / "checkpoint_latest.pth").is_file():
        # an interrupted run continues from its last epoch (the benchmark trainers checkpoint every epoch);
        # its wall time then covers the remaining epochs only, so it is not recorded
        print(f"  {name}: continuing from {folder / f'fold_{FOLD}' / 'checkpoint_latest.pth'}", flush=True)
        run(cmd + ["--c"], {**env, "DSM_BENCHMARK_EPOCHS": str(getattr(args, epochs_of))}, log)
        return float("nan")
    if start_from is not None:
        cmd += ["-pretrained_weights", str(model_folder(results, start_from) / f"fold_{FOLD}" / "checkpoint_final.pth")]
    return run(cmd, {**env, "DSM_BENCHMARK_EPOCHS": str(getattr(args, epochs_of))}, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["dsm_stage1", "dsm", "nnunet"], choices=list(MODELS),
                        help="dsm_no_amvp and dsm_no_dqr (stage-2 ablations), diffugts (DiffuGTS method, diffusion model "
                             "trained here) and diffugts_no_grounding (its denoiser without TokenCompose grounding) are "
                             "not in the default run")
    parser.add_argument("--stage1-epochs", type=int, default=8)
    parser.add_argument("--stage2-epochs", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-only", action="store_true", help="train the models, score nothing")
    parser.add_argument("--evaluate-only", action="store_true", help="score the models already trained in WORK")
    parser.add_argument("--out", type=Path, default=RESULTS / "unseen_cpu.json")
    args = parser.parse_args()
    args.total_epochs = args.stage1_epochs + args.stage2_epochs

    work = args.work.resolve()
    results = work / "results"
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f",
           "DSM_SEED": str(args.seed), "OMP_NUM_THREADS": str(args.threads), "nnUNet_def_n_proc": "1",
           "DSM_BENCHMARK_ITERATIONS": str(args.iterations)}
    env.pop("nnUNet_extTrainer", None)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "unseen.log", "a")
    raw, test = prepare(work, env, log, args.seed)
    timings_file = work / "train_seconds.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    if not args.evaluate_only:
        for name in args.models:
            seconds = train(name, args, env, log, results)
            if seconds == seconds:
                # re-read first: several invocations may train different models in the same work folder
                timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
                timings[name] = round(seconds, 1)
                timings_file.write_text(json.dumps(timings, indent=1))
    if args.train_only:
        return
    from unseen_scoring import score_all  # noqa: E402 - the scoring half, importable on its own

    score_all(args, work, raw, test, env, log, timings,
              {"python": platform.python_version(), "device": platform.processor() or platform.machine()})


if __name__ == "__main__":
    main()
