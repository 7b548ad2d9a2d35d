"""Stock-command runs of the learning benchmark (``learning.py``): its models and data, training,
``nnUNetv2_predict`` of the test patients, and the modes that add results of models already trained."""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _learning_report import confusion_of_classes, dice_per_class, pair_ratios, replot

from nnunetv2_dsm.data.totalseg_example import TEST_PATIENT_C, write_test_patient_c
from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.visualization import overlay_png

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
DATASET_ID = "990"
DATASET = "Dataset990_TSExample"
CLASSES = ["liver", "spleen", "stomach", "aorta", "pancreas"]
HELD_OUT = "tsexample_B"
TRAINING_PATIENT = "tsexample_A"
MODELS = {
    "dsm": ("DSMTrainer_Benchmark", "DSMPlansCPU"),
    "nnunet": ("DSMBaselineTrainer_Benchmark", "ResEncPlansCPU"),
    # both with contrast-phase augmentation (patient A is non-contrast CT, patient B contrast-enhanced)
    "dsm_contrast_aug": ("DSMTrainer_Benchmark_contrastAug", "DSMPlansCPU"),
    "nnunet_contrast_aug": ("DSMBaselineTrainer_Benchmark_contrastAug", "ResEncPlansCPU"),
    # ... and without mirroring, so that the side of the body (liver right, spleen left) is a cue
    "dsm_contrast_aug_no_mirroring": ("DSMTrainer_Benchmark_contrastAug_noMirroring", "DSMPlansCPU"),
    "nnunet_contrast_aug_no_mirroring": ("DSMBaselineTrainer_Benchmark_contrastAug_noMirroring", "ResEncPlansCPU"),
    # variants of DSM, measured against the same runs
    "dsm_sgd": ("DSMTrainer_Benchmark_SGD", "DSMPlansCPU"),
    "dsm_decoder_lr_1e3": ("DSMTrainer_Benchmark_decoderLR1e3", "DSMPlansCPU"),
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


def input_folder(folder: Path, dataset: Path, case: str) -> Path:
    """``folder`` holding a link to ``case``'s image of the raw dataset: the input of ``nnUNetv2_predict``."""
    folder.mkdir(exist_ok=True)
    link = folder / f"{case}_0000.nii.gz"
    if not link.exists():
        link.symlink_to(dataset / "imagesTr" / f"{case}_0000.nii.gz")
    return folder


def heldout_scores(prediction_folder: Path, dataset: Path, labels: dict[str, int]) -> tuple[dict, dict]:
    """Dice per class and confusion of the prediction of held-out patient B in ``prediction_folder``."""
    prediction, reference = prediction_folder / f"{HELD_OUT}.nii.gz", dataset / "labelsTr" / f"{HELD_OUT}.nii.gz"
    return dice_per_class(prediction, reference, labels), confusion_of_classes(prediction, reference, labels)


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


def predict_training_patient(name: str, work: Path, dataset: Path, env: dict, log, configuration: str,
                             labels: dict[str, int]) -> dict:
    """Predict training patient A with model ``name``: its Dice there, i.e. how well it fitted what it saw."""
    inputs = input_folder(work / "training_images", dataset, TRAINING_PATIENT)
    out = work / f"prediction_{name}_training_patient"
    seconds = predict(name, inputs, out, configuration, env, log)
    dice = dice_per_class(out / f"{TRAINING_PATIENT}.nii.gz", dataset / "labelsTr" / f"{TRAINING_PATIENT}.nii.gz",
                          labels)
    return {**dice, "predict_cpu_seconds": round(seconds, 1)}


def draw_overlays(models: list[str], work: Path, dataset: Path, labels: dict[str, int], out: Path) -> None:
    """Each model's prediction of held-out patient B beside B's reference, on the slice with most organ."""
    names = {label: name for name, label in labels.items()}
    for name in models:
        prediction = work / f"prediction_{name}" / f"{HELD_OUT}.nii.gz"
        png = overlay_png(dataset / "imagesTr" / f"{HELD_OUT}_0000.nii.gz", prediction, out / f"{name}_B.png", names,
                          dataset / "labelsTr" / f"{HELD_OUT}.nii.gz", title=f"{name}, patient B")
        print(f"  {png}", flush=True)


def extend_results(args, work: Path, dataset: Path, inputs: Path, labels: dict[str, int], env: dict, log) -> bool:
    """The modes that add to an existing results file from trained models (``--confusion``, ``--repredict``,
    ``--training-patient``, ``--patient-c``, the first one given); returns whether one ran."""
    mode = next((m for m in ("confusion", "repredict", "training_patient", "patient_c") if getattr(args, m)), None)
    if mode is None:
        return False
    payload = json.loads(args.out.read_text())
    for name in args.models:
        if mode == "confusion":
            payload[f"{name}_heldout_confusion"] = heldout_scores(work / f"prediction_{name}", dataset, labels)[1]
            print(f"  {name}: {payload[f'{name}_heldout_confusion']}", flush=True)
        elif mode == "repredict":
            seconds = predict(name, inputs, work / f"prediction_{name}", args.configuration, env, log)
            previous = payload.get(f"{name}_heldout_dice")
            payload[f"{name}_heldout_dice"], payload[f"{name}_heldout_confusion"] = heldout_scores(
                work / f"prediction_{name}", dataset, labels)
            payload.setdefault("repredicted", {})[name] = {"reason": args.repredict, "previous_heldout_dice": previous,
                                                           "predict_cpu_seconds": round(seconds, 1)}
            print(f"  {name}: {previous} -> {payload[f'{name}_heldout_dice']}", flush=True)
        elif mode == "training_patient":
            payload[f"{name}_training_patient_dice"] = predict_training_patient(name, work, dataset, env, log,
                                                                                args.configuration, labels)
            print(f"  {name}: Dice on training patient A {payload[f'{name}_training_patient_dice']}", flush=True)
        else:
            payload[f"{name}_patient_c_dice"] = predict_patient_c(name, work, env, log, args.configuration,
                                                                  labels["aorta"])
            print(f"  {name}: patient C aorta Dice {payload[f'{name}_patient_c_dice']['aorta']}", flush=True)
    if mode == "repredict":
        payload = {k: v for k, v in payload.items() if not (k.startswith("ratio_") and k.endswith("_mean_dice"))}
        payload.update(pair_ratios(payload))
    atomic.write_json(args.out, payload, strict=False)
    if mode == "repredict":
        replot(args.out)
    return True
