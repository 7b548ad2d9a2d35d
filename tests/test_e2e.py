"""End to end on real CT with the stock nnU-Net commands, in subprocesses, on CPU.

The example dataset is built by our recipe, then planned and preprocessed with DSMPlannerCPU,
trained briefly with a DSM trainer, predicted with ``nnUNetv2_predict`` and evaluated with both
``nnUNetv2_evaluate_folder`` and ``nnunetv2_dsm evaluate``.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import SimpleITK as sitk
from _stock_commands import failed_save_script, run_command

from nnunetv2_dsm.data.totalseg_example import build_example_dataset

BIN = Path(sys.executable).parent
DATASET_ID = "990"
DATASET = "Dataset990_TSExample"
TRAINER = "DSMTrainer_2epochs_NoMirroring"
PLANS = "DSMPlansCPU"
# Structures of both patients: fold 0 (patient-level, from dataset.json dsm.patients) trains on patient A
# and validates on patient B, and nnU-Net averages per-class Dice with np.mean, so a class missing from
# both reference and prediction would make the validation mean nan.
CLASSES = ["liver", "spleen", "stomach", "aorta", "pancreas"]


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory, example_ct_dir) -> dict:
    root = tmp_path_factory.mktemp("nnunet")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f"}
    env.pop("nnUNet_extTrainer", None)
    build_example_dataset(root / "raw" / DATASET, CLASSES, src=example_ct_dir)
    return env


@pytest.fixture(scope="module")
def trained(nnunet_env) -> Path:
    run_command([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", DATASET_ID, "-pl", "DSMPlannerCPU", "-c", "3d_fullres",
          "-np", "2", "--verify_dataset_integrity"], nnunet_env)
    run_command([str(BIN / "nnUNetv2_train"), DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
          "-device", "cpu"], nnunet_env)
    return Path(nnunet_env["nnUNet_results"]) / DATASET / f"{TRAINER}__{PLANS}__3d_fullres"


def _finite_unit(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


def test_plans_use_dsm_network(nnunet_env, trained: Path) -> None:
    plans = json.loads((Path(nnunet_env["nnUNet_preprocessed"]) / DATASET / f"{PLANS}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert plans["label_manager"] == "DSMLabelManager"
    assert config["architecture"]["network_class_name"] == "nnunetv2_dsm.networks.dsm_network.DSMNetwork"
    assert config["architecture"]["arch_kwargs"]["num_kmmm_layers"] == 4
    # nnU-Net's target spacing logic is kept: the median spacing of patient A (3 mm) and B (2 x 0.98 mm).
    assert config["spacing"] == plans["original_median_spacing_after_transp"] == [2.5, 1.98828125, 1.98828125]


def test_training_outputs(trained: Path) -> None:
    fold = trained / "fold_0"
    for name in ("checkpoint_final.pth", "progress.png", "debug.json", "validation/summary.json"):
        assert (fold / name).is_file(), name
    assert not list(fold.glob("*.tmp-*")), "no temporary checkpoint left behind"
    import torch

    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert checkpoint["current_epoch"] == 2
    assert any(".ssm." in key for key in checkpoint["network_weights"]), "the SSM is part of the trained network"

    summary = json.loads((fold / "validation" / "summary.json").read_text())
    for region, metrics in summary["mean"].items():
        for key in ("Dice", "IoU"):
            assert math.isnan(metrics[key]) or _finite_unit(metrics[key]), (region, key, metrics[key])
        assert metrics["n_ref"] >= 0 and metrics["n_pred"] >= 0
    assert len(summary["mean"]) == len(CLASSES), "one sigmoid region per class"


def test_predict_and_evaluate(nnunet_env, trained: Path, tmp_path: Path) -> None:
    raw = Path(nnunet_env["nnUNet_raw"]) / DATASET
    splits = json.loads((Path(nnunet_env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").read_text())
    case = splits[0]["val"][0]
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / f"{case}_0000.nii.gz").symlink_to(raw / "imagesTr" / f"{case}_0000.nii.gz")
    out = tmp_path / "pred"
    run_command([str(BIN / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", DATASET_ID, "-c", "3d_fullres",
          "-f", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1"], nnunet_env)
    prediction = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    image = sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
    assert prediction.GetSize() == image.GetSize()
    assert np.allclose(prediction.GetSpacing(), image.GetSpacing())
    assert np.allclose(prediction.GetOrigin(), image.GetOrigin())
    assert np.allclose(prediction.GetDirection(), image.GetDirection())
    values = set(np.unique(sitk.GetArrayViewFromImage(prediction)).tolist())
    assert values <= set(range(len(CLASSES) + 1))

    run_command([str(BIN / "nnUNetv2_evaluate_folder"), str(raw / "labelsTr"), str(out), "-djfile",
          str(raw / "dataset.json"), "-pfile", str(trained / "plans.json"), "--chill"], nnunet_env)
    summary = json.loads((out / "summary.json").read_text())
    assert _finite_unit(summary["foreground_mean"]["Dice"]) or math.isnan(summary["foreground_mean"]["Dice"])

    run_command([str(BIN / "nnunetv2_dsm"), "evaluate", str(out), str(raw / "labelsTr"), "-d", str(raw / "dataset.json"),
          "-i", str(inputs), "-o", str(tmp_path / "metrics"), "--chill"], nnunet_env)
    metrics = json.loads((tmp_path / "metrics" / "metrics.json").read_text())
    assert list(metrics["per_case"]) == [case]

    from nnunetv2_dsm.visualization import overlay_png

    dataset_json = json.loads((raw / "dataset.json").read_text())
    names = {v: k for k, v in dataset_json["labels"].items() if k != "background"}
    png = overlay_png(inputs / f"{case}_0000.nii.gz", out / f"{case}.nii.gz", tmp_path / "overlay.png", names,
                      raw / "labelsTr" / f"{case}.nii.gz")
    from nnunetv2_dsm.cli.demo import _report

    report = _report(metrics, [png], argparse.Namespace(trainer=TRAINER, fold="0", device="cpu"), 90.0)
    assert f"![overlay]({png.name})" in report
    for name in CLASSES:
        assert f"| {name} |" in report, "every class has a row in the demo report"
    picture = plt.imread(png)
    assert picture.shape[0] > 300 and picture.shape[1] > 600, "reference and prediction side by side"
    assert picture[..., :3].std() > 0.05, "a real picture, not a blank canvas"
    for name, stats in metrics["per_case"][case].items():
        dsc = stats["dice"]["value"] if isinstance(stats.get("dice"), dict) else stats.get("dice")
        assert dsc is None or math.isnan(dsc) or _finite_unit(dsc), (name, dsc)


def test_find_best_configuration(nnunet_env, trained: Path) -> None:
    run_command([str(BIN / "nnUNetv2_find_best_configuration"), DATASET_ID, "-c", "3d_fullres", "-tr", TRAINER,
          "-p", PLANS, "-f", "0", "--disable_ensembling", "-np", "1"], nnunet_env)
    inference = Path(nnunet_env["nnUNet_results"]) / DATASET / "inference_information.json"
    info = json.loads(inference.read_text())
    assert info["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == TRAINER


def test_dsm_trainer_refuses_other_plans(nnunet_env, trained: Path) -> None:
    folder = Path(nnunet_env["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((folder / f"{PLANS}.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = (
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet")
    plans["label_manager"] = "LabelManager"
    plans["plans_name"] = "OtherPlans"
    (folder / "OtherPlans.json").write_text(json.dumps(plans))
    out = subprocess.run([str(BIN / "nnUNetv2_train"), DATASET_ID, "3d_fullres", "0", "-tr", TRAINER,
                          "-p", "OtherPlans", "-device", "cpu"], env=nnunet_env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "needs plans made by a DSM planner" in out.stderr and "-pl DSMPlanner" in out.stderr


def test_killed_training_resumes_with_continue(nnunet_env, trained: Path) -> None:
    """SIGKILL in the middle of an epoch, then nnU-Net's --c finishes the run from the last checkpoint."""
    fold = trained / "fold_1"
    cmd = [str(BIN / "nnUNetv2_train"), DATASET_ID, "3d_fullres", "1", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"]
    proc = subprocess.Popen(cmd, env=nnunet_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while not (fold / "checkpoint_latest.pth").exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 15 minutes"
            time.sleep(1)
        time.sleep(0.5)  # now inside the second epoch (on a quiet machine it lasts only a few seconds)
        assert proc.poll() is None, "training must still be running when it is killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (fold / "checkpoint_final.pth").exists()
    assert not list(fold.glob("*.tmp-*")), "no half-written checkpoint"
    import torch

    assert torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"] == 1

    run_command(cmd + ["--c"], nnunet_env)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2
    assert (fold / "validation" / "summary.json").is_file()


def test_atomic_checkpoint_survives_a_failed_save(nnunet_env, trained: Path, tmp_path: Path) -> None:
    """A save that dies half-way (disk full, kill) leaves the previous checkpoint intact and no debris."""
    target = tmp_path / "checkpoint_latest.pth"
    script = failed_save_script(DATASET_ID, "3d_fullres", TRAINER, PLANS, target) + textwrap.dedent(f"""
        # nnUNetv2_train --c on a truncated checkpoint: an error naming the file and the fix
        from nnunetv2_dsm.trainers.dsm_trainer import DSMCheckpointError
        open({str(target)!r}, 'wb').write(before[: len(before) // 2])
        try:
            trainer.load_checkpoint({str(target)!r})
        except DSMCheckpointError as err:
            assert {str(target)!r} in str(err) and 'truncated' in str(err), err
        else:
            raise AssertionError('a truncated checkpoint must not load')
        print('ATOMIC OK')
    """)
    out = run_command([sys.executable, "-c", script], nnunet_env)
    assert "ATOMIC OK" in out.stdout


def test_predictions_are_reproducible(nnunet_env, trained: Path, tmp_path: Path) -> None:
    raw = Path(nnunet_env["nnUNet_raw"]) / DATASET
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "tsexample_B_0000.nii.gz").symlink_to(raw / "imagesTr" / "tsexample_B_0000.nii.gz")
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        run_command([str(BIN / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", DATASET_ID, "-c", "3d_fullres",
              "-f", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1"], nnunet_env)
        outputs.append((out / "tsexample_B.nii.gz").read_bytes())
    assert outputs[0] == outputs[1], "two predictions of the same case are byte-identical"


def test_seeded_training_repeats_first_iteration_loss(nnunet_env, trained: Path) -> None:
    script = (
        "import torch\n"
        "from nnunetv2.run.run_training import get_trainer_from_args\n"
        f"t = get_trainer_from_args('{DATASET_ID}', '3d_fullres', 0, '{TRAINER}', '{PLANS}', "
        "device=torch.device('cpu'))\n"
        "t.on_train_start()\n"
        "print('LOSS', float(t.train_step(next(t.dataloader_train))['loss']))\n"
    )
    losses = []
    for seed in ("7", "7", "8"):
        env = {**nnunet_env, "DSM_SEED": seed, "nnUNet_results": str(Path(nnunet_env["nnUNet_results"]) / f"seed{len(losses)}")}
        out = run_command([sys.executable, "-c", script], env)
        losses.append(float(out.stdout.split("LOSS")[-1]))
    assert losses[0] == losses[1], "same seed, same first-iteration loss"
    assert losses[0] != losses[2], "a different seed gives a different run"


def test_non_finite_loss_stops_training_before_the_weights_change(nnunet_env, trained: Path) -> None:
    """A NaN batch: train_step raises DSMNonFiniteError naming epoch and cases; no weight changes."""
    script = textwrap.dedent(f"""
        import torch
        from nnunetv2.run.run_training import get_trainer_from_args
        from nnunetv2_dsm.trainers.dsm_trainer import DSMNonFiniteError
        trainer = get_trainer_from_args('{DATASET_ID}', '3d_fullres', 0, '{TRAINER}', '{PLANS}',
                                        device=torch.device('cpu'))
        trainer.initialize()
        trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
        batch = next(trainer.dataloader_train)
        batch['data'][:] = float('nan')
        before = {{k: v.clone() for k, v in trainer.network.state_dict().items()}}
        try:
            trainer.train_step(batch)
        except DSMNonFiniteError as err:
            message = str(err)
        else:
            raise AssertionError('a NaN loss must stop training')
        assert 'became nan in epoch 0' in message and str(batch['keys'][0]) in message, message
        assert '--c' in message and 'learning rate' in message, message
        after = trainer.network.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), 'weights changed'
        print('STOPPED OK')
    """)
    out = run_command([sys.executable, "-c", script], nnunet_env)
    assert "STOPPED OK" in out.stdout


def test_posthoc_anomaly_maps_from_the_trained_model(nnunet_env, trained: Path, tmp_path: Path) -> None:
    """anomaly-posthoc: every method's map in the input geometry, max-logit equal to -max organ logit."""
    from nnunetv2_dsm.cli.main import main
    from nnunetv2_dsm.inference.logits import LogitsPredictor

    raw = Path(nnunet_env["nnUNet_raw"]) / DATASET
    case = "tsexample_B"
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / f"{case}_0000.nii.gz").symlink_to(raw / "imagesTr" / f"{case}_0000.nii.gz")
    train = tmp_path / "train"
    train.mkdir()
    (train / "tsexample_A_0000.nii.gz").symlink_to(raw / "imagesTr" / "tsexample_A_0000.nii.gz")
    out = tmp_path / "posthoc"
    assert main(["anomaly-posthoc", "-m", str(trained), "-f", "0", "-i", str(inputs), "-o", str(out),
                 "--stats-images", str(train), "--disable-tta"]) == 0
    image = sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz"))
    maps = {m: sitk.ReadImage(str(out / m / f"{case}_anomaly.nii.gz")) for m in ("msp", "maxlogit", "energy", "sml")}
    for written in maps.values():
        assert written.GetSize() == image.GetSize() and np.allclose(written.GetOrigin(), image.GetOrigin())
        assert np.isfinite(sitk.GetArrayViewFromImage(written)).all()
    stats = json.loads((out / "sml_statistics.json").read_text())
    assert len(stats["mean"]) == len(stats["std"]) == len(CLASSES)

    import torch

    predictor = LogitsPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained), (0,), "checkpoint_final.pth")
    logits, _ = predictor.logits([inputs / f"{case}_0000.nii.gz"])
    assert logits.shape == (len(CLASSES), *sitk.GetArrayViewFromImage(image).shape)
    np.testing.assert_allclose(sitk.GetArrayFromImage(maps["maxlogit"]), -logits.max(axis=0), rtol=1e-5, atol=1e-5)
    assert main(["anomaly-posthoc", "-m", str(trained), "-i", str(inputs), "-o", str(tmp_path / "x"),
                 "--methods", "sml"]) == 2, "sml without --stats-images is an error"
    assert not (tmp_path / "x").exists()
