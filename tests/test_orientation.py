"""One orientation everywhere: lossless reorientation, the way back, and mixed datasets reported."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dsm.checks.inputs import check_raw_dataset
from nnunetv2_dsm.dataset import DSMDatasetError
from nnunetv2_dsm.io.orientation import (
    file_orientation,
    image_orientation,
    orientation_code,
    reorient,
    reorient_files,
    restore_geometry,
)
from nnunetv2_dsm.planners.dsm_planner import training_orientation

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
# x and y swapped and one flipped: a transposition, not only a flip
ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _image(direction=LPS, dtype=np.uint8) -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(0, 7, size=(5, 6, 7)).astype(dtype))
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((12.5, -30.25, 7.0))
    image.SetDirection(direction)
    return image


def _world_values(image: sitk.Image) -> dict:
    """Physical point (rounded) -> voxel value, for every voxel."""
    array = sitk.GetArrayFromImage(image)
    out = {}
    for index in np.ndindex(array.shape):
        point = image.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]])
        out[tuple(np.round(point, 4))] = array[index]
    return out


def test_orientation_codes() -> None:
    assert orientation_code(LPS) == "LPS" and orientation_code(RAS) == "RAS"
    assert orientation_code((1.0, 0.0, 0.0, 1.0)) == "LP"


@pytest.mark.parametrize("direction", [LPS, ROTATED, RAS])
def test_reorientation_is_lossless_and_reversible(direction: tuple) -> None:
    image = _image(direction)
    canonical = reorient(image, "RAS")
    assert image_orientation(canonical) == "RAS"
    # Every voxel keeps its value at the same physical position: nothing is resampled.
    assert _world_values(canonical) == _world_values(image)
    back = restore_geometry(canonical, image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    assert back.GetSize() == image.GetSize() and back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin() and back.GetDirection() == image.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_reorient_files_writes_copies_only_when_needed(tmp_path: Path) -> None:
    for name, direction in (("ras", RAS), ("lps", LPS)):
        sitk.WriteImage(_image(direction, np.int16), str(tmp_path / f"{name}_0000.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    assert reorient_files([tmp_path / "ras_0000.nii.gz"], "RAS", out) is None
    files, grid = reorient_files([tmp_path / "lps_0000.nii.gz"], "RAS", out)
    assert [f.parent for f in files] == [out] and file_orientation(files[0]) == "RAS"
    assert grid["direction"] == LPS and file_orientation(tmp_path / "lps_0000.nii.gz") == "LPS"


def _dataset(root: Path, directions: dict[str, tuple]) -> Path:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for case, direction in directions.items():
        image = _image(direction, np.int16)
        label = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 3).astype(np.uint8))
        label.CopyInformation(image)
        sitk.WriteImage(image, str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{case}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
        "numTraining": len(directions), "file_ending": ".nii.gz"}))
    return root


def test_check_reports_mixed_orientations(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "Dataset001_Mixed", {"a": RAS, "b": RAS, "c": LPS})
    problems = check_raw_dataset(folder, progress=False)
    assert len(problems) == 1
    message = str(problems[0])
    assert "mix image orientations" in message and "RAS: 2 case(s)" in message and "LPS: 1 case(s)" in message
    assert "c_0000.nii.gz" in message and "DICOMOrient" in message
    assert check_raw_dataset(_dataset(tmp_path / "Dataset002_Same", {"a": LPS, "b": LPS}), progress=False) == []


def test_planner_check_refuses_mixed_orientations(tmp_path: Path) -> None:
    folder = _dataset(tmp_path / "Dataset001_Mixed", {"a": RAS, "c": LPS})
    dataset_json = json.loads((folder / "dataset.json").read_text())
    with pytest.raises(DSMDatasetError, match="mix image orientations"):
        training_orientation(str(folder), dataset_json)
    same = _dataset(tmp_path / "Dataset002_Same", {"a": LPS, "b": LPS})
    assert training_orientation(str(same), json.loads((same / "dataset.json").read_text())) == "LPS"
