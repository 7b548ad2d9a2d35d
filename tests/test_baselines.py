"""Baselines: stock ResEnc planner with the DSM CPU sizes, short-schedule comparison trainers, max-logit maps."""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dsm.cli import anomaly as anomaly_cli
from nnunetv2_dsm.evaluation.evaluate import evaluate_folder
from nnunetv2_dsm.evaluation.maxlogit import (
    MaxLogitError,
    max_logit_score,
    organ_channels,
    write_anomaly_maps,
)
from nnunetv2_dsm.trainers.baselines import (
    DSMBaselineTrainer_2epochs_NoMirroring,
    DSMTrainer_noKMMM_2epochs_NoMirroring,
    DSMTrainer_noSSM_2epochs_NoMirroring,
)
from nnunetv2_dsm.trainers.variants import DSMTrainer_2epochs_NoMirroring

# Organs contain their tumours (nnU-Net region syntax), as in DSM datasets.
REGION_LABELS = {"background": 0, "liver": [1, 3], "kidney_right": 2, "liver_tumor": 3}
PLAIN_LABELS = {"background": 0, "liver": 1, "kidney_right": 2, "liver_tumor": 3}
SHAPE = (5, 6, 7)  # (z, y, x)


def _dataset_json(labels: dict) -> dict:
    regions = {"regions_class_order": [1, 2, 3]} if labels is REGION_LABELS else {}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz", **regions}


def _image(path: Path, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return image


def _case(tmp_path: Path, channels: int, seed: int = 0) -> tuple[Path, Path, np.ndarray, sitk.Image]:
    rng = np.random.default_rng(seed)
    image = _image(tmp_path / "images" / "case_0000.nii.gz", rng.normal(0, 100, SHAPE).astype(np.float32))
    probabilities = rng.random((channels, *SHAPE), dtype=np.float32)
    (tmp_path / "pred").mkdir()
    np.savez_compressed(tmp_path / "pred" / "case.npz", probabilities=probabilities)
    return tmp_path / "pred", tmp_path / "images", probabilities, image


def _run_cli(pred: Path, images: Path, out: Path, dataset_json: dict, tmp_path: Path) -> int:
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json))
    parser = argparse.ArgumentParser()
    anomaly_cli.register(parser.add_subparsers())
    args = parser.parse_args(["anomaly-maxlogit", "-i", str(pred), "-o", str(out), "--images", str(images),
                              "-d", str(tmp_path / "dataset.json")])
    return args.func(args)


@pytest.mark.parametrize(
    ("labels", "channels", "organs"),
    [
        (REGION_LABELS, 3, [0, 1]),  # sigmoid regions (DSM, or stock nnU-Net on region datasets)
        (PLAIN_LABELS, 3, [0, 1]),  # sigmoid, one channel per class (DSM label manager on plain labels)
        (PLAIN_LABELS, 4, [1, 2]),  # softmax with background channel 0 (stock nnU-Net on plain labels)
    ],
    ids=["sigmoid-regions", "sigmoid-plain", "softmax"],
)
def test_anomaly_map_is_minus_max_over_organ_channels(tmp_path: Path, labels: dict, channels: int,
                                                      organs: list[int]) -> None:
    pred, images, probabilities, image = _case(tmp_path, channels)
    assert _run_cli(pred, images, tmp_path / "scores", _dataset_json(labels), tmp_path) == 0

    written = sitk.ReadImage(str(tmp_path / "scores" / "case_anomaly.nii.gz"))
    score = sitk.GetArrayFromImage(written)
    np.testing.assert_allclose(score, -probabilities[organs].max(axis=0), rtol=0, atol=1e-7)
    # The tumour channel is not organ evidence: where it is the largest, it must not set the score.
    tumour = channels - 1
    assert np.any(probabilities[tumour] > probabilities[organs].max(axis=0))
    assert np.all(score <= -probabilities[organs].min(axis=0) + 1e-7)
    assert written.GetSize() == image.GetSize()
    assert np.allclose(written.GetSpacing(), image.GetSpacing())
    assert np.allclose(written.GetOrigin(), image.GetOrigin())
    assert np.allclose(written.GetDirection(), image.GetDirection())
    assert not [p for p in (tmp_path / "scores").iterdir() if p.name.startswith(".")], "no temporary file left"


def test_organ_channels_rejects_foreign_channel_counts() -> None:
    with pytest.raises(MaxLogitError, match="has 5 channels .* give 3 \\(sigmoid regions\\);"):
        organ_channels(_dataset_json(REGION_LABELS), 5, "x.npz")
    # With regions nnU-Net never writes a background channel, so 4 channels cannot come from this dataset.
    with pytest.raises(MaxLogitError, match="x.npz has 4 channels"):
        organ_channels(_dataset_json(REGION_LABELS), 4, "x.npz")
    with pytest.raises(MaxLogitError, match="no organ class"):
        organ_channels({"labels": {"background": 0, "liver_tumor": 1}}, 1)


def test_max_logit_score_edge_values() -> None:
    probabilities = np.zeros((3, 2, 2, 2), dtype=np.float32)
    probabilities[1, 0, 0, 0] = 1.0
    probabilities[2] = 1.0  # a tumour channel everywhere changes nothing
    score = max_logit_score(probabilities, [0, 1])
    assert score.dtype == np.float32 and score.shape == (2, 2, 2)
    assert score[0, 0, 0] == -1.0 and np.all(score.ravel()[1:] == 0.0)


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    pred, images, _, _ = _case(tmp_path, 3)
    dataset_json = _dataset_json(REGION_LABELS)
    with pytest.raises(MaxLogitError, match="must differ"):
        write_anomaly_maps(pred, images, pred, dataset_json)

    np.savez(pred / "other.npz", probabilities=np.zeros((3, 2, 2, 2), np.float32))
    with pytest.raises(MaxLogitError, match="other.npz has no input image .*other_0000.nii.gz"):
        write_anomaly_maps(pred, images, tmp_path / "s", dataset_json)
    assert not (tmp_path / "s").exists(), "nothing is written before every input is found"

    # case.npz is fine and written first; other.npz fails: no map of either, no output folder
    _image(images / "other_0000.nii.gz", np.zeros(SHAPE, np.float32))
    with pytest.raises(MaxLogitError, match="other.npz: probabilities of shape \\(3, 2, 2, 2\\) do not match"):
        write_anomaly_maps(pred, images, tmp_path / "s", dataset_json)
    assert not (tmp_path / "s").exists(), "no partial output, not even an empty folder"
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("earlier output")
    with pytest.raises(MaxLogitError):
        write_anomaly_maps(pred, images, tmp_path / "s", dataset_json)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["keep.txt"], "an existing folder is left as it was"
    (pred / "case.npz").unlink()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MaxLogitError, match="--save_probabilities"):
        write_anomaly_maps(empty, images, tmp_path / "s", dataset_json)
    assert _run_cli(empty, images, tmp_path / "s", dataset_json, tmp_path) == 2


def test_anomaly_map_feeds_the_evaluation(tmp_path: Path) -> None:
    """The map is picked up by ``evaluate`` as the anomaly score of the tumour class; a perfect score gives AUROC 1."""
    rng = np.random.default_rng(1)
    image = rng.normal(0, 100, SHAPE).astype(np.float32)
    reference = np.zeros(SHAPE, np.uint8)
    reference[1:4, 1:5, 1:6] = 1
    reference[2, 2:4, 2:4] = 3  # tumour inside the liver
    reference[0, :, :2] = 2
    _image(tmp_path / "images" / "case_0000.nii.gz", image)
    _image(tmp_path / "labels" / "case.nii.gz", reference)
    _image(tmp_path / "pred" / "case.nii.gz", reference)
    # The model sees organ tissue everywhere except at the lesion: no organ channel claims it.
    probabilities = np.full((3, *SHAPE), 0.9, np.float32)
    probabilities[:, reference == 3] = 0.1
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "case.npz", probabilities=probabilities)
    dataset_json = _dataset_json(REGION_LABELS)
    write_anomaly_maps(tmp_path / "npz", tmp_path / "images", tmp_path / "scores", dataset_json)
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json))
    result = evaluate_folder(tmp_path / "pred", tmp_path / "labels", tmp_path / "dataset.json", None, "image",
                             tmp_path / "metrics", scores=tmp_path / "scores")
    tumour = result["per_case"]["case"]["liver_tumor"]
    auroc = tumour["anomaly_auroc"]["value"] if isinstance(tumour["anomaly_auroc"], dict) else tumour["anomaly_auroc"]
    assert auroc == pytest.approx(1.0)
    assert tumour["anomaly_score_file"] == "case_anomaly.nii.gz"


def test_short_schedule_trainers_share_the_dsm_budget() -> None:
    budget = DSMTrainer_2epochs_NoMirroring
    assert DSMBaselineTrainer_2epochs_NoMirroring.budget is budget
    for ablation, override in ((DSMTrainer_noKMMM_2epochs_NoMirroring, {"use_kmeans": False}),
                               (DSMTrainer_noSSM_2epochs_NoMirroring, {"use_ssm": False})):
        assert ablation.arch_overrides == override
        assert (ablation.epochs, ablation.iterations) == (budget.epochs, budget.iterations)
        assert issubclass(ablation, budget), "mirroring switched off as in the full model's CPU run"


_PLAN_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    import nnunetv2
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    planners = os.path.join(os.path.dirname(nnunetv2.__file__), 'experiment_planning')
    trainers = os.path.join(os.path.dirname(nnunetv2.__file__), 'training', 'nnUNetTrainer')
    out = {}
    for name in ('DSMPlannerCPU', 'DSMBaselinePlannerCPU'):
        cls = recursive_find_python_class(planners, name, 'nnunetv2.experiment_planning')
        out[name] = cls(999).plan_experiment()
    found = recursive_find_python_class(trainers, 'DSMBaselineTrainer_2epochs_NoMirroring',
                                        'nnunetv2.training.nnUNetTrainer')
    out['trainer_module'] = found.__module__
    trainer = get_trainer_from_args('999', '3d_fullres', 0, 'DSMBaselineTrainer_2epochs_NoMirroring',
                                    'ResEncPlansCPU', device=torch.device('cpu'))
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    out['trainer'] = [trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
                      trainer.save_every, trainer.inference_allowed_mirroring_axes]
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                             trainer.label_manager.num_segmentation_heads, False)
    with torch.no_grad():
        y = net(torch.zeros(1, 1, 16, 16, 16))
    out['network'] = [type(net).__module__ + '.' + type(net).__name__, list(y.shape)]
    try:
        get_trainer_from_args('999', '3d_fullres', 0, 'DSMBaselineTrainer_2epochs_NoMirroring', 'DSMPlansCPU',
                              device=torch.device('cpu'))
    except Exception as e:
        out['wrong_plans'] = str(e)
    json.dump(out, sys.stdout)
""")


def test_baseline_planner_keeps_dsm_cpu_sizes_with_stock_resenc(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "Dataset999_Baseline"
    _image(raw / "imagesTr" / "case_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    label = np.zeros((4, 4, 4), np.uint8)
    label[1:3, 1:3, 1:3] = 1  # a sound case: the DSM planner checks the raw dataset first
    _image(raw / "labelsTr" / "case.nii.gz", label)
    (raw / "dataset.json").write_text(json.dumps(_dataset_json(REGION_LABELS)))
    pre = tmp_path / "preprocessed" / "Dataset999_Baseline"
    pre.mkdir(parents=True)
    # The example CT's fingerprint (z, y, x at 3 mm), so the patch-size logic has real work to do.
    intensity = {"max": 3000.0, "mean": 40.0, "median": 45.0, "min": -1000.0, "percentile_00_5": -990.0,
                 "percentile_99_5": 1200.0, "std": 250.0}
    (pre / "dataset_fingerprint.json").write_text(json.dumps({
        "foreground_intensity_properties_per_channel": {"0": intensity},
        "median_relative_size_after_cropping": 1.0,
        "shapes_after_crop": [[112, 101, 122], [110, 100, 120]],
        "spacings": [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]],
    }))
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_compile": "f"}
    out = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])

    dsm, base = result["DSMPlannerCPU"], result["DSMBaselinePlannerCPU"]
    assert base["plans_name"] == "ResEncPlansCPU" and base["label_manager"] == "LabelManager"
    assert json.loads((pre / "ResEncPlansCPU.json").read_text())["plans_name"] == "ResEncPlansCPU"
    for config in ("3d_fullres", "2d"):
        d, b = dsm["configurations"][config], base["configurations"][config]
        assert b["architecture"]["network_class_name"] == (
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet")
        for key in ("patch_size", "batch_size", "spacing", "data_identifier", "normalization_schemes"):
            assert b[key] == d[key], (config, key)
        dsm_kwargs = d["architecture"]["arch_kwargs"]
        base_kwargs = b["architecture"]["arch_kwargs"]
        assert base_kwargs == {k: v for k, v in dsm_kwargs.items() if k in base_kwargs}
        assert "num_kmmm_layers" not in base_kwargs and "num_kmmm_layers" in dsm_kwargs
    assert max(base["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"]) == 64

    assert result["trainer_module"] == "nnunetv2_dsm.trainers.baselines"
    budget = DSMTrainer_2epochs_NoMirroring
    assert result["trainer"] == [budget.epochs, budget.iterations, max(1, budget.iterations // 2), 1, None]
    assert result["network"] == ["dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                                 [1, 3, 16, 16, 16]], "one sigmoid region per class, no background channel"
    assert "-pl DSMBaselinePlannerCPU" in result["wrong_plans"]
