"""Synthetic lesions in the real example CT, and the seen/unseen tumour benchmark built from it."""

import argparse
import json
import multiprocessing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning import verify_dataset_integrity as vdi
from scipy import ndimage

from nnunetv2_dsm.cli import synth as synth_cli
from nnunetv2_dsm.data.raw_dataset import assign_ids, read_array
from nnunetv2_dsm.data.synthesis import (
    DEFAULT_LESION_CONFIGS,
    EXAMPLE_CASES,
    LesionConfig,
    synthesize_lesions,
    totalseg_to_organ_labels,
)
from nnunetv2_dsm.io.orientation import file_orientation


@pytest.fixture(scope="module")
def real(example_ct_dir: Path) -> dict:
    _, ct_name, seg_name = EXAMPLE_CASES[0]
    image, geometry = read_array(example_ct_dir / ct_name)
    seg, _ = read_array(example_ct_dir / seg_name)
    ids = assign_ids(["liver", "kidney_right", "kidney_left", "pancreas", "spleen", "liver_tumor", "kidney_tumor"])
    return {"image": image, "label": totalseg_to_organ_labels(seg, ids), "ids": ids, "spacing": geometry.array_spacing}


def _run(real: dict, organs: list[str], tumour: str, seed: int, config: LesionConfig):
    ids = real["ids"]
    return synthesize_lesions(
        real["image"], real["label"], [ids[o] for o in organs], ids[tumour], real["spacing"],
        np.random.default_rng(seed), config,
    )


def test_lesions_stay_inside_the_eroded_organ_and_change_only_organ_voxels(real: dict):
    image, label, ids = real["image"], real["label"], real["ids"]
    before = (image.copy(), label.copy())
    cfg = DEFAULT_LESION_CONFIGS["liver_tumor"]
    out_image, out_label, info = _run(real, ["liver"], "liver_tumor", 0, cfg)
    assert np.array_equal(image, before[0]) and np.array_equal(label, before[1])
    assert out_image.dtype == image.dtype and out_label.dtype == label.dtype

    liver = label == ids["liver"]
    lesion = out_label == ids["liver_tumor"]
    assert lesion.sum() == sum(les["voxels"] for les in info["lesions"]) > 0
    eroded = ndimage.distance_transform_edt(liver, sampling=real["spacing"]) > cfg.erosion_mm
    assert not (lesion & ~eroded).any()
    assert np.array_equal(out_label[~lesion], label[~lesion])

    changed = out_image != image
    assert not (changed & ~liver).any()
    assert changed[lesion].mean() > 0.9
    # Hypodense lesions: mean HU inside falls below the organ reference.
    assert out_image[lesion].mean() < info["organ_reference_hu"] - 10


def test_without_edge_blur_only_lesion_voxels_change_to_the_organ_relative_attenuation(real: dict):
    cfg = LesionConfig(diameter_mm=(12.0, 20.0), count=(1, 1), attenuation_hu=(40.0, 60.0), texture_std_hu=2.0,
                       edge_blur_mm=0.0)
    out_image, out_label, info = _run(real, ["spleen"], "liver_tumor", 3, cfg)
    lesion = out_label == real["ids"]["liver_tumor"]
    changed = out_image != real["image"]
    assert not (changed & ~lesion).any() and changed[lesion].mean() > 0.9
    (placed,) = info["lesions"]
    target = info["organ_reference_hu"] + placed["attenuation_shift_hu"]
    assert abs(out_image[lesion].mean() - target) < 2.0
    assert target > info["organ_reference_hu"] + 39  # hyperdense as configured


def test_deterministic_per_seed_and_different_across_seeds(real: dict):
    cfg = DEFAULT_LESION_CONFIGS["liver_tumor"]
    a = _run(real, ["liver"], "liver_tumor", 7, cfg)
    b = _run(real, ["liver"], "liver_tumor", 7, cfg)
    c = _run(real, ["liver"], "liver_tumor", 8, cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesion_sizes_within_configured_range(real: dict, seed: int):
    cfg = LesionConfig(diameter_mm=(9.0, 16.0), count=(3, 3))
    _, out_label, info = _run(real, ["liver"], "liver_tumor", seed, cfg)
    assert len(info["lesions"]) == 3
    components, n = ndimage.label(out_label == real["ids"]["liver_tumor"])
    assert n == 3  # lesions never touch
    voxel_mm3 = float(np.prod(real["spacing"]))
    sizes = ndimage.sum(components > 0, components, range(1, n + 1))
    diameters = sorted((6 * s * voxel_mm3 / np.pi) ** (1 / 3) for s in sizes)
    assert all(9.0 <= d <= 16.0 for d in diameters)
    assert diameters == pytest.approx(sorted(les["diameter_mm"] for les in info["lesions"]), abs=1e-2)


def test_two_parent_organs(real: dict):
    _, out_label, info = _run(real, ["kidney_right", "kidney_left"], "kidney_tumor", 0,
                              DEFAULT_LESION_CONFIGS["kidney_tumor"])
    ids = real["ids"]
    lesion = out_label == ids["kidney_tumor"]
    assert lesion.any()
    assert np.isin(real["label"][lesion], [ids["kidney_right"], ids["kidney_left"]]).all()


def test_bad_input_is_rejected(real: dict):
    image, label, spacing = real["image"], real["label"], real["spacing"]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no voxel carries the organ label values"):
        synthesize_lesions(image, label, [99], 100, spacing, rng)
    with pytest.raises(ValueError, match="lesion_id"):
        synthesize_lesions(image, label, [1], 1, spacing, rng)
    with pytest.raises(ValueError, match="one shape"):
        synthesize_lesions(image, label[:-1], [1], 100, spacing, rng)
    with pytest.raises(ValueError, match="diameter_mm"):
        replace(LesionConfig(), diameter_mm=(20.0, 10.0))


def test_benchmark_via_cli_is_a_valid_nnunet_dataset(example_ct_dir: Path, tmp_path: Path, monkeypatch):
    parser = argparse.ArgumentParser()
    synth_cli.register(parser.add_subparsers())
    case_args = [a for name, ct, seg in EXAMPLE_CASES for a in ("--case", name, str(example_ct_dir / ct),
                                                               str(example_ct_dir / seg))]
    out = tmp_path / "Dataset900_TumourBench"
    args = parser.parse_args(["synth", "--out", str(out), "--variants", "2", "--seed", "5", *case_args])
    assert args.func(args) == 0

    dj = json.loads((out / "dataset.json").read_text())
    labels = dj["labels"]
    own = {n: (v[0] if isinstance(v, list) else v) for n, v in labels.items()}
    assert labels["liver"] == [own["liver"], own["liver_tumor"]]
    assert labels["pancreas"] == [own["pancreas"], own["pancreas_tumor"]]
    assert labels["kidney_left"] == [own["kidney_left"], own["kidney_tumor"]]
    assert dj["numTraining"] == 4
    bench = dj["dsm"]["benchmark"]
    assert bench["seen_tumours"] == ["liver_tumor", "kidney_tumor"]
    assert bench["unseen_tumours"] == ["pancreas_tumor", "spleen_tumor"]
    train_ids = sorted(dj["dsm"]["class_availability"])
    assert train_ids == ["tsyn_ct_00", "tsyn_ct_01", "tsyn_ctsm_00", "tsyn_ctsm_01"]
    assert sorted(bench["test_cases"]) == ["tsyn_ct_test_00", "tsyn_ct_test_01", "tsyn_ctsm_test_00",
                                           "tsyn_ctsm_test_01"]
    unseen_ids = {own["pancreas_tumor"], own["spleen_tumor"]}
    seen_ids = {own["liver_tumor"], own["kidney_tumor"]}
    for case_id in train_ids:
        avail = dj["dsm"]["class_availability"][case_id]
        assert {"liver", "pancreas", "liver_tumor", "kidney_tumor"} <= set(avail)
        assert not {"pancreas_tumor", "spleen_tumor"} & set(avail)
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{case_id}.nii.gz")))))
        assert own["liver_tumor"] in values and not values & unseen_ids
    for case_id in bench["test_cases"]:
        values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTs" / f"{case_id}.nii.gz")))))
        assert unseen_ids <= values and not values & seen_ids
        assert (out / "imagesTs" / f"{case_id}_0000.nii.gz").is_file()
    # Synthetic images keep the real CT's grid.
    real_ct = sitk.ReadImage(str(example_ct_dir / EXAMPLE_CASES[0][1]))
    synth_ct = sitk.ReadImage(str(out / "imagesTr" / "tsyn_ct_00_0000.nii.gz"))
    assert synth_ct.GetSize() == real_ct.GetSize() and synth_ct.GetOrigin() == real_ct.GetOrigin()
    assert synth_ct.GetDirection() == real_ct.GetDirection()
    # Every file of the benchmark is stored in the canonical orientation.
    assert dj["dsm"]["orientation"] == "RAS"
    for path in out.glob("*s*/*.nii.gz"):
        assert file_orientation(path) == "RAS", path

    real_get_context = multiprocessing.get_context
    # verify_dataset_integrity in full; fork instead of spawn spares re-importing torch in the worker.
    monkeypatch.setattr(vdi.multiprocessing, "get_context", lambda method=None: real_get_context("fork"))
    vdi.verify_dataset_integrity(str(out), num_processes=1)
