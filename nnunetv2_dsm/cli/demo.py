"""``demo`` subcommand: the whole nnU-Net cycle with DSM on real example CT, on CPU.

Builds the example dataset (two patients, five organs both carry), then runs the stock nnU-Net
commands exactly as a user would (plan and preprocess with DSMPlannerCPU, train on patient A,
predict patient B, which the model never saw), evaluates, and writes a report with a metrics table
and overlay pictures. The settings are those of the learning benchmark's best DSM run
(``benchmarks/learning.py``: 2d at 3 mm, mirroring on, contrast-phase augmentation) with a shorter
budget (``DSMTrainer_Demo_contrastAug``, 4 x 150 iterations).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID}_TSExample"
PLANS = "DSMPlansCPU"
CONFIGURATION = "2d"
SPACING = ["3", "3", "3"]
# The organs both example patients carry (patient B is an upper-abdominal slab).
CLASSES = ["liver", "spleen", "stomach", "aorta", "pancreas"]
# The progress lines of nnU-Net worth showing while it runs.
SHOWN = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "Mean Validation Dice", "Predicting ")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="plan, train, predict and evaluate DSM on real example CT (CPU, a few minutes)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work-dir", default="dsm_demo", help="folder for nnUNet_raw/preprocessed/results and the report")
    parser.add_argument("--trainer", default="DSMTrainer_Demo_contrastAug", help="nnU-Net trainer class to train")
    parser.add_argument("--fold", default="0", choices=["0", "1"],
                        help="patient-level fold: 0 trains on patient A and tests on B, 1 the reverse")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.set_defaults(func=run)


def _run(cmd: list[str], env: dict, log, bar: tqdm) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        log.write(line)
        if any(s in line for s in SHOWN):
            bar.write("  " + line.rstrip())
    if proc.wait() != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}; see {log.name}")


def run(args: argparse.Namespace) -> int:
    from nnunetv2_dsm.data.totalseg_example import build_example_dataset
    from nnunetv2_dsm.dataset import DSMDataset
    from nnunetv2_dsm.evaluation.evaluate import evaluate_folder
    from nnunetv2_dsm.io import atomic
    from nnunetv2_dsm.visualization import overlay_png

    work = Path(args.work_dir).resolve()
    raw, preprocessed, results = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    report_dir = work / "report"
    for folder in (raw, preprocessed, results, report_dir):
        folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(results), "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "0"),
           "nnUNet_compile": "f",
           # nnU-Net starts 8 spawned workers for validation and export unless told: more than 2 cores can run
           "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))}
    bin_dir = Path(sys.executable).parent
    start = time.time()
    steps = ["dataset", "plan+preprocess", "train", "predict", "evaluate+report"]
    with open(work / "demo.log", "w") as log, tqdm(total=len(steps), desc="DSM demo", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        dataset_dir = raw / DATASET_NAME
        if not (dataset_dir / "dataset.json").is_file():
            build_example_dataset(dataset_dir, CLASSES)
        bar.update()

        bar.set_postfix_str(steps[1])
        if not (preprocessed / DATASET_NAME / f"{PLANS}.json").is_file():
            _run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-pl", "DSMPlannerCPU",
                  "-c", CONFIGURATION, "-np", "2", "-overwrite_target_spacing", *SPACING], env, log, bar)
        bar.update()

        bar.set_postfix_str(steps[2])
        _run([str(bin_dir / "nnUNetv2_train"), str(DATASET_ID), CONFIGURATION, args.fold, "-tr", args.trainer,
              "-p", PLANS, "-device", args.device], env, log, bar)
        bar.update()

        bar.set_postfix_str(steps[3])
        splits = json.loads((preprocessed / DATASET_NAME / "splits_final.json").read_text())
        cases = splits[int(args.fold)]["val"] if args.fold != "all" else sorted(
            p.name[:-len("_0000.nii.gz")] for p in (dataset_dir / "imagesTr").glob("*_0000.nii.gz"))
        inputs = work / "predict_input"
        inputs.mkdir(exist_ok=True)
        for case in cases:
            link = inputs / f"{case}_0000.nii.gz"
            if not link.exists():
                link.symlink_to(dataset_dir / "imagesTr" / f"{case}_0000.nii.gz")
        predictions = work / "predictions"
        _run([str(bin_dir / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(predictions), "-d", str(DATASET_ID),
              "-c", CONFIGURATION, "-f", args.fold, "-tr", args.trainer, "-p", PLANS, "-device", args.device,
              "-npp", "1", "-nps", "1"], env, log, bar)
        bar.update()

        bar.set_postfix_str(steps[4])
        dataset_json = json.loads((dataset_dir / "dataset.json").read_text())
        result = evaluate_folder(predictions, dataset_dir / "labelsTr", dataset_dir / "dataset.json",
                                 inputs, "body", report_dir, True)
        names = {ids[0]: name for name, ids in DSMDataset.from_json(dataset_json).classes.items()}
        pictures = [overlay_png(inputs / f"{case}_0000.nii.gz", predictions / f"{case}.nii.gz",
                                report_dir / f"overlay_{case}.png", names, dataset_dir / "labelsTr" / f"{case}.nii.gz")
                    for case in cases]
        report = _report(result, pictures, args, time.time() - start)
        atomic.write_text(report_dir / "report.md", report)
        bar.update()
    print(report)
    print(f"Report: {report_dir / 'report.md'}")
    return 0


def _report(result: dict, pictures: list[Path], args: argparse.Namespace, seconds: float) -> str:
    lines = [f"# DSM demo ({args.trainer}, fold {args.fold}, {args.device}, {seconds / 60:.1f} min)", "",
             "Real CT of two patients from the TotalSegmentator sdist. The model was trained on ONE patient "
             "(fold 0: patient A) and is evaluated on the other (patient B: another scanner, never seen in "
             "training). The reference labels are TotalSegmentator model output, not manual annotation. "
             "A few minutes of CPU training on one patient do not measure what DSM reaches with a real dataset "
             "and budget; benchmarks/learning.py compares DSM with stock nnU-Net on the same split.", "",
             "| class | DSC on the held-out patient | cases |", "|---|---|---|"]
    for name, metrics in result["summary"]["per_class"].items():
        dsc = metrics["dsc"]
        if dsc["n"]:
            lines.append(f"| {name} | {dsc['mean']:.3f} | {dsc['n']} |")
        else:
            reasons = ", ".join(reason.replace("_", " ") for reason in dsc["undefined"])
            lines.append(f"| {name} | – ({reasons}) | 0 |")
    lines += ["", *[f"![{p.stem}]({p.name})" for p in pictures], ""]
    return "\n".join(lines)
