"""Merging nnU-Net raw datasets into one DSM dataset with partial labels."""

import argparse
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

from nnunetv2_dsm.cli import merge as merge_cli
from nnunetv2_dsm.data.merge import MergeError, MergeSource, merge_datasets
from nnunetv2_dsm.data.raw_dataset import OutputOverlapsInputError
from nnunetv2_dsm.io.orientation import image_orientation

SHAPE = (8, 10, 12)


def write_nii(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((3.0, -4.0, 12.5))
    sitk.WriteImage(image, str(path))


def make_dataset(root: Path, labels: dict, cases: dict[str, np.ndarray], extra: dict | None = None) -> Path:
    for case_id, label in cases.items():
        write_nii(root / "imagesTr" / f"{case_id}_0000.nii.gz", np.full(SHAPE, 30, dtype=np.int16))
        write_nii(root / "labelsTr" / f"{case_id}.nii.gz", label.astype(np.uint8))
    dj = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz",
          **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(dj))
    return root


def blocks(values: list[int]) -> np.ndarray:
    """Label map with value ``values[k]`` in the k-th 2x2x2 block along the last axis."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    for k, v in enumerate(values):
        label[2:4, 2:4, 2 * k : 2 * k + 2] = v
    return label


def value_at(path: Path, k: int) -> int:
    # Sources are written LPS (identity direction); merged datasets store RAS: compare in LPS.
    image = sitk.ReadImage(str(path))
    assert image_orientation(image) == "RAS", path
    return int(sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))[2, 2, 2 * k])


def verify_integrity(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net's verify_dataset_integrity, run in full; its pool uses fork instead of spawn, which
    re-imports torch in every worker (seconds per call) for the same checks."""
    real = multiprocessing.get_context
    monkeypatch.setattr(vdi.multiprocessing, "get_context", lambda method=None: real("fork"))
    vdi.verify_dataset_integrity(str(folder), num_processes=1)


@pytest.fixture
def sources(tmp_path: Path) -> list[MergeSource]:
    liver = make_dataset(
        tmp_path / "Dataset003_Liver", {"background": 0, "Liver": 1, "cancer": 2},
        {"liver_001": blocks([1, 2]), "liver_002": blocks([1, 0])},
    )
    organs = make_dataset(
        tmp_path / "Dataset102_Organs",
        {"background": 0, "spleen": 1, "kidney_left": [2, 4], "kidney_right": [3, 4], "kidney_tumor": 4},
        {"abc_001": blocks([1, 2, 3, 4]), "abc_002": blocks([1, 2, 3, 0])},
        {"regions_class_order": [1, 2, 3, 4], "dsm": {"class_availability": {"abc_002": ["spleen", "kidney_left"]}}},
    )
    spleen = make_dataset(
        tmp_path / "Dataset009_Spleen", {"background": 0, "spleen": 1}, {"msd09_spleen_001": blocks([1])},
        {"dsm": {"sources": {"msd09": "Medical Segmentation Decathlon Task09_Spleen"}}},
    )
    return [
        MergeSource(liver, "msd03", {"Liver": "liver", "cancer": "liver_tumor"}),
        MergeSource(organs),
        MergeSource(spleen),
    ]


def test_merge(sources: list[MergeSource], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = merge_datasets(sources, tmp_path / "raw" / "Dataset500_DSM")
    dj = json.loads((out / "dataset.json").read_text())
    # Organs in vocabulary order, then tumours; each organ region holds its present tumours.
    assert dj["labels"] == {
        "background": 0, "spleen": 1, "kidney_right": [2, 5], "kidney_left": [3, 5], "liver": [4, 6],
        "kidney_tumor": 5, "liver_tumor": 6,
    }
    assert dj["regions_class_order"] == [1, 2, 3, 4, 5, 6]
    assert dj["numTraining"] == 5
    assert dj["dsm"]["sources"] == {
        "msd03": "Dataset003_Liver", "organs": "Dataset102_Organs",
        "msd09": "Medical Segmentation Decathlon Task09_Spleen",
    }
    assert dj["dsm"]["class_availability"] == {
        "msd03_liver_001": ["liver", "liver_tumor"],
        "msd03_liver_002": ["liver", "liver_tumor"],
        "organs_abc_001": ["kidney_left", "kidney_right", "kidney_tumor", "spleen"],
        "organs_abc_002": ["spleen", "kidney_left"],
        "msd09_spleen_001": ["spleen"],
    }
    labels = out / "labelsTr"
    assert [value_at(labels / "msd03_liver_001.nii.gz", k) for k in range(2)] == [4, 6]
    assert [value_at(labels / "organs_abc_001.nii.gz", k) for k in range(4)] == [1, 3, 2, 5]
    assert value_at(labels / "msd09_spleen_001.nii.gz", 0) == 1
    image = sitk.ReadImage(str(out / "imagesTr" / "organs_abc_001_0000.nii.gz"))
    label = sitk.ReadImage(str(labels / "organs_abc_001.nii.gz"))
    assert label.GetSpacing() == image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))
    assert label.GetOrigin() == image.GetOrigin()
    verify_integrity(out, monkeypatch)


def test_ignore_label_is_carried_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    a = make_dataset(tmp_path / "a", {"background": 0, "liver": 1, "ignore": 2}, {"c1": blocks([1, 2])})
    b = make_dataset(tmp_path / "b", {"background": 0, "pancreas": 1, "pancreas_tumor": 2}, {"c1": blocks([1, 2])})
    out = merge_datasets([MergeSource(a, "a"), MergeSource(b, "b")], tmp_path / "out")
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"]["ignore"] == 4
    assert dj["labels"]["pancreas"] == [2, 3]
    assert [value_at(out / "labelsTr" / "a_c1.nii.gz", k) for k in range(2)] == [1, 4]
    assert [value_at(out / "labelsTr" / "b_c1.nii.gz", k) for k in range(2)] == [2, 3]
    verify_integrity(out, monkeypatch)


def _no_output(tmp_path: Path, name: str) -> bool:
    return not any(p.name.startswith(name) or p.name.startswith(f".{name}") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "labels, rename, message",
    [
        ({"background": 0, "Liver": 1}, None, r"label 'Liver' is not a canonical DSM class name; map it"),
        ({"background": 0, "liver": 1}, {"livr": "liver"}, r"rename table names \['livr'\]"),
        ({"background": 0, "a": 1}, {"a": "hepar"}, r"unknown class name\(s\) \['hepar'\]"),
        ({"background": 0, "liver": [1, 2], "spleen": 2}, None, r"only an organ contains its own tumours"),
        ({"background": 0, "liver": 1, "spleen": 1}, None, r"value 1 is claimed by labels"),
        ({"background": 1, "liver": 2}, None, r"background must be label 0"),
    ],
)
def test_bad_definitions_are_clear_errors_and_write_nothing(tmp_path, labels, rename, message):
    src = make_dataset(tmp_path / "src", labels, {"c1": blocks([1])})
    with pytest.raises((MergeError, ValueError), match=message):
        merge_datasets([MergeSource(src, "s", rename)], tmp_path / "out")
    assert _no_output(tmp_path, "out")


def test_prefix_and_case_collisions(sources: list[MergeSource], tmp_path: Path):
    with pytest.raises(MergeError, match="prefix 'msd03' is used by more than one source"):
        merge_datasets([sources[0], sources[0]], tmp_path / "out")
    dup = make_dataset(tmp_path / "dup", {"background": 0, "spleen": 1}, {"001": blocks([1])})
    with pytest.raises(MergeError, match="case id 'organs_abc_001' occurs in"):
        merge_datasets([sources[1], MergeSource(dup, "organs_abc")], tmp_path / "out")
    assert _no_output(tmp_path, "out")


def test_undeclared_voxel_value_fails_without_partial_output(sources: list[MergeSource], tmp_path: Path):
    write_nii(sources[2].path / "labelsTr" / "msd09_spleen_001.nii.gz", blocks([1, 9]))
    with pytest.raises(ValueError, match=r"msd09_spleen_001\.nii\.gz: has voxel values \[9\]"):
        merge_datasets(sources, tmp_path / "out")
    assert _no_output(tmp_path, "out")


def test_cli(sources: list[MergeSource], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    table = tmp_path / "rename.json"
    table.write_text(json.dumps({"Liver": "liver", "cancer": None}))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    parser = argparse.ArgumentParser()
    merge_cli.register(parser.add_subparsers())
    args = parser.parse_args([
        "merge", "--source", f"msd03={sources[0].path}", "--source", str(sources[2].path),
        "--rename", f"msd03={table}", "-d", "501", "--name", "LiverSpleen",
    ])
    assert args.func(args) == 0
    out = tmp_path / "raw" / "Dataset501_LiverSpleen"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "spleen": 1, "liver": 2}
    # The dropped tumour class becomes background in the liver cases.
    assert [value_at(out / "labelsTr" / "msd03_liver_001.nii.gz", k) for k in range(2)] == [2, 0]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_a_source_is_refused_even_with_overwrite(sources: list[MergeSource], tmp_path: Path,
                                                                   where: str):
    source = sources[0].path
    out = {"same": source, "inside": source / "merged", "parent": tmp_path}[where]
    before = sorted(str(p) for p in source.rglob("*"))
    with pytest.raises(OutputOverlapsInputError, match="overwrite or remove the input"):
        merge_datasets(sources, out, overwrite=True)
    assert sorted(str(p) for p in source.rglob("*")) == before, "the source is untouched"


def test_cli_refuses_output_equal_to_a_source(sources: list[MergeSource], capsys):
    from nnunetv2_dsm.cli.main import main

    args = ["merge", *[a for s in sources[1:] for a in ("--source", str(s.path))], "--out", str(sources[1].path),
            "--overwrite"]
    assert main(args) == 2
    assert "is the input" in capsys.readouterr().err
    assert (sources[1].path / "dataset.json").is_file()


def test_bad_source_files_are_refused_before_anything_is_written(sources: list[MergeSource], tmp_path: Path):
    """Truncated images, NaN voxels and labels off the image grid are not copied into the merged dataset."""
    from nnunetv2_dsm.checks.inputs import InputErrors

    liver, organs, spleen = (s.path for s in sources)
    whole = (liver / "imagesTr" / "liver_001_0000.nii.gz").read_bytes()
    (liver / "imagesTr" / "liver_001_0000.nii.gz").write_bytes(whole[: len(whole) // 2])
    nan_image = np.full(SHAPE, 30.0, dtype=np.float32)
    nan_image[1, 1, 1] = np.nan
    write_nii(organs / "imagesTr" / "abc_001_0000.nii.gz", nan_image)
    shifted = sitk.ReadImage(str(spleen / "labelsTr" / "msd09_spleen_001.nii.gz"))
    shifted.SetOrigin((8.0, -4.0, 12.5))  # 5 mm off the image
    sitk.WriteImage(shifted, str(spleen / "labelsTr" / "msd09_spleen_001.nii.gz"))
    with pytest.raises(InputErrors) as err:
        merge_datasets(sources, tmp_path / "out")
    message = str(err.value)
    assert "3 input problems" in message
    assert "liver_001_0000.nii.gz: is truncated" in message
    assert "abc_001_0000.nii.gz: has 1 NaN" in message
    assert "msd09_spleen_001.nii.gz" in message and "origin" in message
    assert _no_output(tmp_path, "out")
