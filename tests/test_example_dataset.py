"""The example-CT recipe, the cached fetch and the errors users see for bad setups."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dsm.data import fetch
from nnunetv2_dsm.data.totalseg_example import build_example_dataset, read_ct
from nnunetv2_dsm.dataset import DSMDataset, DSMDatasetError
from nnunetv2_dsm.io.orientation import image_orientation
from nnunetv2_dsm.vocabulary import CANONICAL


@pytest.fixture(scope="module")
def example_dataset(tmp_path_factory, example_ct_dir) -> Path:
    return build_example_dataset(tmp_path_factory.mktemp("raw") / "Dataset990_TSExample", src=example_ct_dir)


def test_recipe_writes_canonical_nnunet_dataset(example_dataset: Path, example_ct_dir: Path) -> None:
    dataset_json = json.loads((example_dataset / "dataset.json").read_text())
    labels = dataset_json["labels"]
    assert labels["background"] == 0
    assert all(name in CANONICAL for name in labels if name != "background")
    assert {"liver", "spleen", "kidney_left", "kidney_right", "aorta"} <= set(labels)
    assert list(labels.values()) == list(range(len(labels))), "ids are consecutive in vocabulary order"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (example_dataset / "labelsTr").glob("*.nii.gz"))
    # Two patients, one case each: the crop of patient A (example_ct_sm) is not used.
    assert cases == ["tsexample_A", "tsexample_B"]
    assert dataset_json["numTraining"] == len(cases)
    assert dataset_json["dsm"]["patients"] == {"B": ["tsexample_B"], "A": ["tsexample_A"]}
    DSMDataset.from_json(dataset_json).require_prompts()

    # The DICOM series is stored LPS; the dataset stores every case RAS (same voxels, axes flipped).
    dicom = sitk.DICOMOrient(read_ct(example_ct_dir / "example_ct_dicom"), "RAS")
    assert dataset_json["dsm"]["orientation"] == "RAS"
    for path in [*(example_dataset / "imagesTr").iterdir(), *(example_dataset / "labelsTr").iterdir()]:
        assert image_orientation(sitk.ReadImage(str(path))) == "RAS", path
    image = sitk.ReadImage(str(example_dataset / "imagesTr" / "tsexample_B_0000.nii.gz"))
    label = sitk.ReadImage(str(example_dataset / "labelsTr" / "tsexample_B.nii.gz"))
    assert image.GetSize() == dicom.GetSize() == label.GetSize() == (512, 512, 20)
    assert np.allclose(image.GetOrigin(), dicom.GetOrigin()) and np.allclose(label.GetOrigin(), dicom.GetOrigin())
    assert image.GetDirection() == dicom.GetDirection() == label.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(dicom).astype(np.int16))
    liver = sitk.GetArrayFromImage(label) == labels["liver"]
    # The DICOM label comes from a NIfTI with flipped axes: after alignment the liver lies on real
    # liver tissue (soft tissue HU), not on air or bone.
    hu = sitk.GetArrayFromImage(image)[liver]
    assert liver.sum() > 1000 and 0 < np.median(hu) < 150

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(example_dataset / "labelsTr" / "tsexample_A.nii.gz")))
    assert a.shape == (112, 101, 122) and set(np.unique(a)) <= set(labels.values())


def test_recipe_refuses_to_overwrite_and_leaves_no_staging(example_dataset: Path, example_ct_dir: Path) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        build_example_dataset(example_dataset, src=example_ct_dir)
    with pytest.raises(ValueError, match="do not occur"):
        build_example_dataset(example_dataset.parent / "Dataset991_X", ["celiac_trunk"], src=example_ct_dir)
    assert sorted(p.name for p in example_dataset.parent.iterdir()) == [example_dataset.name]


def test_fetch_is_cached(example_ct_dir: Path, monkeypatch) -> None:
    assert (example_ct_dir / "example_ct.nii.gz").is_file()
    assert len(list((example_ct_dir / "example_ct_dicom").iterdir())) == 20
    # A second call must not touch the registry: with no reachable index it still returns the cache.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    assert fetch.example_ct_dir() == example_ct_dir


def test_fetch_without_registry_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSM_CACHE", str(tmp_path / "cache"))
    # A closed local port: pip cannot reach any package index.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(fetch.FetchError) as err:
        fetch.example_ct_dir(quiet=True)
    message = str(err.value)
    assert "totalsegmentator-2.18.0" in message and "pip" in message and "reference_files" in message
    assert not list((tmp_path / "cache").rglob("*.nii.gz")), "nothing half-fetched is left in the cache"


def test_dataset_without_dsm_class_names_is_refused() -> None:
    with pytest.raises(DSMDatasetError, match="dsm.*prompts"):
        DSMDataset.from_json({"labels": {"background": 0, "organ_a": 1}}, "Dataset5/dataset.json").require_prompts()
    DSMDataset.from_json({"labels": {"background": 0, "organ_a": 1},
                          "dsm": {"prompts": {"organ_a": "liver"}}}).require_prompts()
    with pytest.raises(DSMDatasetError, match="not labels of this dataset"):
        DSMDataset.from_json({"labels": {"background": 0, "liver": 1},
                              "dsm": {"class_availability": {"c1": ["spleen"]}}}, "dataset.json")


def test_dsm_planner_refuses_dataset_without_class_names(tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "Dataset005_Bad"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "thing": 1}, "numTraining": 0,
        "file_ending": ".nii.gz"}))
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pp"),
           "nnUNet_results": str(tmp_path / "res")}
    code = "from nnunetv2_dsm.planners.dsm_planner import DSMPlanner; DSMPlanner(5)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "Dataset005_Bad/dataset.json" in out.stderr and "'thing'" in out.stderr


def test_example_dataset_command_needs_nnunet_raw(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_raw"}
    out = subprocess.run([str(Path(sys.executable).parent / "nnunetv2_dsm"), "example-dataset"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "nnUNet_raw is not set" in out.stderr


def test_test_patient_c_holds_the_aorta_only_on_its_ct(tmp_path: Path, example_ct_dir: Path) -> None:
    from nnunetv2_dsm.data.totalseg_example import TEST_PATIENT_C, write_test_patient_c

    out = write_test_patient_c(tmp_path / "c", aorta_label=4, src=example_ct_dir)
    image = sitk.ReadImage(str(out / "images" / f"{TEST_PATIENT_C}_0000.nii.gz"))
    label = sitk.ReadImage(str(out / "labels" / f"{TEST_PATIENT_C}.nii.gz"))
    assert image.GetSize() == label.GetSize() == (233, 167, 191)
    assert image_orientation(image) == image_orientation(label) == "RAS"
    ct, aorta = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    assert set(np.unique(aorta).tolist()) == {0, 4}
    # the label, brought from its cropped grid, lies on the contrast-filled aorta of the angiogram
    assert np.median(ct[aorta == 4]) > 250
    assert (aorta == 4).sum() == int((sitk.GetArrayViewFromImage(sitk.ReadImage(
        str(example_ct_dir / "aorta_report" / "test_result" / "models" / "aorta.nii.gz"))) > 0).sum())
