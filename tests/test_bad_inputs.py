"""The catalogue of bad inputs: each one gives an InputError naming the file and the fix, and writes nothing."""

import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_dsm.checks.inputs import (
    InputError,
    InputErrors,
    allowed_label_ids,
    check_channels,
    check_dimensionality,
    check_intensities,
    check_label_not_empty,
    check_label_values,
    check_output_writable,
    check_prediction_inputs,
    check_raw_dataset,
    check_same_geometry,
    read_image_checked,
    resolve_raw_dataset,
)
from nnunetv2_dsm.cli import check as check_cli
from nnunetv2_dsm.data.totalseg_example import build_example_dataset
from nnunetv2_dsm.dataset import DSMDatasetError

FIX = "How to fix:"
REEXPORT = "re-export or re-download"
PLANS_3D = {
    "plans_name": "DSMPlans",
    "original_median_shape_after_transp": [112, 101, 122],
    "configurations": {"2d": {"patch_size": [64, 64], "architecture": {}},
                       "3d_fullres": {"patch_size": [16, 32, 32], "architecture": {}}},
}
PLANS_2D = {
    "plans_name": "DSMPlans",
    "original_median_shape_after_transp": [1, 256, 256],
    "configurations": {"2d": {"patch_size": [64, 64], "architecture": {}}},
}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz",
                "numTraining": 0}


def assert_input_error(err: pytest.ExceptionInfo, *names: str) -> str:
    message = str(err.value)
    assert isinstance(err.value, InputError) and isinstance(err.value, ValueError)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert FIX in message
    return message


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def from_array(array: np.ndarray, spacing: tuple[float, ...] | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    return image


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.fixture(scope="module")
def ct_crop(example_ct_dir: Path) -> sitk.Image:
    """32x32x16 voxels of the real example CT (int16, 3 mm)."""
    ct = sitk.ReadImage(str(example_ct_dir / "example_ct.nii.gz"))
    return sitk.Cast(ct[40:72, 30:62, 40:56], sitk.sitkInt16)


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory: pytest.TempPathFactory, example_ct_dir: Path) -> Path:
    """The real-CT example dataset written by the package's own recipe (two patients, one from DICOM)."""
    raw = tmp_path_factory.mktemp("raw")
    return build_example_dataset(raw / "Dataset991_CheckGood", src=example_ct_dir)


# ------------------------------------------------------------------------------------- read_image_checked


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        read_image_checked(tmp_path / "case_0000.nii.gz")
    assert_input_error(err, "case_0000.nii.gz", "does not exist")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty_0000.nii.gz").touch()
    with pytest.raises(InputError) as err:
        read_image_checked(tmp_path / "empty_0000.nii.gz")
    assert_input_error(err, "empty_0000.nii.gz", "empty file", REEXPORT)


@pytest.mark.parametrize("fraction", [0.5, 0.999])
def test_truncated_nii_gz_of_real_ct(tmp_path: Path, example_ct_dir: Path, fraction: float) -> None:
    path = tmp_path / "ct_0000.nii.gz"
    shutil.copy(example_ct_dir / "example_ct.nii.gz", path)
    assert read_image_checked(path).GetSize() == (122, 101, 112)
    truncate(path, fraction)
    with pytest.raises(InputError) as err:
        read_image_checked(path)
    assert_input_error(err, "ct_0000.nii.gz", "truncated", REEXPORT)


def test_truncated_uncompressed_nii(tmp_path: Path, ct_crop: sitk.Image) -> None:
    path = write(ct_crop, tmp_path / "ct_0000.nii")
    truncate(path, 0.6)
    with pytest.raises(InputError) as err:
        read_image_checked(path)
    message = assert_input_error(err, "ct_0000.nii", "truncated", REEXPORT)
    assert "(32, 32, 16)" in message


def test_corrupt_gzip(tmp_path: Path, example_ct_dir: Path) -> None:
    path = tmp_path / "ct_0000.nii.gz"
    data = bytearray((example_ct_dir / "example_ct.nii.gz").read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        read_image_checked(path)
    assert_input_error(err, "ct_0000.nii.gz", REEXPORT)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "scan_0000.mha"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError) as err:
        read_image_checked(path)
    assert_input_error(err, "scan_0000.mha", "cannot be read", REEXPORT)


def test_dicom_series_reads(example_ct_dir: Path) -> None:
    assert read_image_checked(example_ct_dir / "example_ct_dicom").GetSize() == (512, 512, 20)


def test_dicom_folder_without_series(tmp_path: Path) -> None:
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "notes.txt").write_text("not a DICOM file")
    with pytest.raises(InputError) as err:
        read_image_checked(tmp_path / "series")
    assert_input_error(err, "series", "without a readable DICOM series", REEXPORT)


def test_dicom_truncated_slice(tmp_path: Path, example_ct_dir: Path) -> None:
    folder = shutil.copytree(example_ct_dir / "example_ct_dicom", tmp_path / "dicom")
    victim = sorted(folder.iterdir())[5]
    truncate(victim, 0.5)
    with pytest.raises(InputError) as err:
        read_image_checked(folder)
    assert_input_error(err, victim.name, "not part of its series", REEXPORT)


def test_dicom_missing_slice(tmp_path: Path, example_ct_dir: Path) -> None:
    folder = shutil.copytree(example_ct_dir / "example_ct_dicom", tmp_path / "dicom")
    sorted(folder.iterdir())[10].unlink()
    with pytest.raises(InputError) as err:
        read_image_checked(folder)
    assert_input_error(err, "dicom", "not evenly spaced", REEXPORT)


# ------------------------------------------------------------------------------------- voxel checks


def test_nan_and_inf_voxels(tmp_path: Path, ct_crop: sitk.Image) -> None:
    array = sitk.GetArrayFromImage(ct_crop).astype(np.float32)
    array[0, 0, :2] = np.nan
    array[1, 1, 1] = np.inf
    path = write(from_array(array), tmp_path / "nan_0000.nii.gz")
    image = read_image_checked(path)
    with pytest.raises(InputError) as err:
        check_intensities(image, path)
    assert_input_error(err, "nan_0000.nii.gz", "2 NaN and 1 infinite", "reads them as 0", "nan_to_num")
    with pytest.raises(InputError) as err:
        check_intensities(from_array(array), "in_memory.mha")
    assert_input_error(err, "in_memory.mha", "2 NaN and 1 infinite", "nan_to_num")
    check_intensities(ct_crop, "ct_crop")
    check_intensities(from_array(np.nan_to_num(array, nan=-1024.0, posinf=3000.0)), "fixed.mha")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda im: im[:, :, :15], "size"),
        (lambda im: (im.SetSpacing((3.0, 3.0, 2.5)), im)[1], "spacing"),
        (lambda im: (im.SetOrigin((0.0, 0.0, 10.0)), im)[1], "origin"),
        (lambda im: (im.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, -1)), im)[1], "direction"),
    ],
)
def test_geometry_mismatch(tmp_path: Path, ct_crop: sitk.Image, change, field: str) -> None:
    label = sitk.Cast(ct_crop > 100, sitk.sitkUInt8)
    label.CopyInformation(ct_crop)
    moved = change(sitk.Image(label))
    with pytest.raises(InputError) as err:
        check_same_geometry(ct_crop, tmp_path / "c1_0000.nii.gz", moved, tmp_path / "c1.nii.gz")
    message = assert_input_error(err, "c1_0000.nii.gz", "c1.nii.gz", field, "resample")
    assert " vs " in message
    check_same_geometry(ct_crop, "a", label, "b")


def test_undeclared_label_values(tmp_path: Path) -> None:
    array = np.zeros((4, 5, 6), np.uint8)
    array[0, 0, :3] = 1
    array[1, 1, 1] = 7
    array[2, 2, 2] = 9
    allowed = allowed_label_ids(DATASET_JSON)
    assert allowed == [0, 1]
    with pytest.raises(InputError) as err:
        check_label_values(from_array(array), tmp_path / "c1.nii.gz", allowed, tmp_path / "dataset.json")
    assert_input_error(err, "c1.nii.gz", "dataset.json", "[7, 9]", "(2 voxels)", "relabel")


def test_region_labels_allow_every_id() -> None:
    regions = {"background": 0, "liver": [1, 2], "liver_tumor": 2}
    assert allowed_label_ids({"labels": regions, "regions_class_order": [1, 2]}) == [0, 1, 2]


def test_all_background_label(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        check_label_not_empty(from_array(np.zeros((4, 5, 6), np.uint8)), tmp_path / "c1.nii.gz")
    assert_input_error(err, "c1.nii.gz", "only background", "remove the case")


@pytest.mark.parametrize(
    ("names", "expected", "detail"),
    [
        (["c1_0000.nii.gz"], 2, "missing _0001"),
        (["c1_0000.nii.gz", "c1_0001.nii.gz"], 1, "unexpected c1_0001.nii.gz"),
        (["c1_0000.nii.gz", "c1_0002.nii.gz"], 2, "missing _0001"),
    ],
)
def test_wrong_channel_files(tmp_path: Path, names: list[str], expected: int, detail: str) -> None:
    with pytest.raises(InputError) as err:
        check_channels([tmp_path / n for n in names], expected, tmp_path / "dataset.json")
    assert_input_error(err, names[0], "dataset.json", f"declares {expected}", detail, "channel_names")
    check_channels([tmp_path / f"c.1_{i:04d}.nii.gz" for i in range(expected)], expected, "dataset.json")


def test_2d_image_for_3d_configuration(tmp_path: Path, ct_crop: sitk.Image) -> None:
    for image in (ct_crop[:, :, 7], ct_crop[:, :, 7:8]):
        with pytest.raises(InputError) as err:
            check_dimensionality(image, tmp_path / "slice_0000.nii.gz", "3d_fullres", PLANS_3D)
        assert_input_error(err, "slice_0000.nii.gz", "2D image", "3d_fullres", "complete 3D volume")
    check_dimensionality(ct_crop, "ct", "3d_fullres", PLANS_3D)
    check_dimensionality(ct_crop, "ct", "2d", PLANS_3D)


def test_3d_image_for_2d_model(tmp_path: Path, ct_crop: sitk.Image) -> None:
    with pytest.raises(InputError) as err:
        check_dimensionality(ct_crop, tmp_path / "vol_0000.nii.gz", "2d", PLANS_2D)
    assert_input_error(err, "vol_0000.nii.gz", "3D volume", "trained on 2D images")
    check_dimensionality(ct_crop[:, :, 7:8], "slice", "2d", PLANS_2D)


def test_4d_image_and_unknown_configuration(tmp_path: Path, ct_crop: sitk.Image) -> None:
    series = sitk.JoinSeries([ct_crop, ct_crop])
    with pytest.raises(InputError) as err:
        check_dimensionality(series, tmp_path / "t_0000.nii.gz", "3d_fullres", PLANS_3D)
    assert_input_error(err, "t_0000.nii.gz", "4D image", "separate files")
    plans_path = tmp_path / "plans.json"
    plans_path.write_text(json.dumps(PLANS_3D))
    with pytest.raises(InputError) as err:
        check_dimensionality(ct_crop, tmp_path / "c_0000.nii.gz", "3d_lowres", plans_path)
    assert_input_error(err, "plans.json", "3d_lowres")


# ------------------------------------------------------------------------------------- output folder


def test_output_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "x" / "file.txt"
    blocker.parent.mkdir()
    blocker.write_text("in the way")
    before = snapshot(tmp_path)
    with pytest.raises(InputError) as err:
        check_output_writable(blocker / "out", [])
    assert_input_error(err, "file.txt/out", "is a file, not a folder", "choose another output folder")
    with pytest.raises(InputError) as err:
        check_output_writable(blocker, [])
    assert_input_error(err, "file.txt", "is a file")
    assert snapshot(tmp_path) == before


def test_output_folder_is_or_contains_inputs(tmp_path: Path) -> None:
    inputs = [tmp_path / "in" / "c1_0000.nii.gz", tmp_path / "in" / "c2_0000.nii.gz"]
    for f in inputs:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x")
    for folder in (tmp_path / "in", tmp_path):
        with pytest.raises(InputError) as err:
            check_output_writable(folder, inputs)
        assert_input_error(err, str(folder), "c1_0000.nii.gz", "prediction never overwrites an input")


def test_writable_output_is_not_created(tmp_path: Path) -> None:
    check_output_writable(tmp_path / "a" / "b" / "out", [tmp_path / "in" / "c1_0000.nii.gz"])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- raw datasets


def test_good_real_ct_dataset_has_no_problems(good_dataset: Path) -> None:
    assert check_raw_dataset(good_dataset, progress=False) == []


def make_bad_dataset(good: Path, dest: Path) -> tuple[Path, dict[str, str]]:
    """Copy of the good dataset with one problem per entry; returns the folder and {file: expected text}."""
    bad = shutil.copytree(good, dest)
    images, labels = bad / "imagesTr", bad / "labelsTr"
    # More cases of real CT, one per fault: copies of patient A.
    for k in range(4):
        shutil.copy(images / "tsexample_A_0000.nii.gz", images / f"copy{k}_0000.nii.gz")
        shutil.copy(labels / "tsexample_A.nii.gz", labels / f"copy{k}.nii.gz")
    truncate(images / "copy0_0000.nii.gz", 0.5)
    label = sitk.ReadImage(str(labels / "copy1.nii.gz"))
    label[0, 0, 0] = 99
    write(label, labels / "copy1.nii.gz")
    empty = sitk.ReadImage(str(labels / "copy2.nii.gz")) * 0
    write(empty, labels / "copy2.nii.gz")
    shifted = sitk.ReadImage(str(labels / "copy3.nii.gz"))
    shifted.SetSpacing([s * 2 for s in shifted.GetSpacing()])
    write(shifted, labels / "copy3.nii.gz")
    shutil.copy(images / "tsexample_B_0000.nii.gz", images / "tsexample_B_0001.nii.gz")
    nan_image = np.full((8, 8, 8), -1000.0, np.float32)
    nan_image[4, 4, 4] = np.nan
    nan_label = np.zeros((8, 8, 8), np.uint8)
    nan_label[2:5, 2:5, 2:5] = 1
    write(from_array(nan_image), images / "nancase_0000.nii.gz")
    write(from_array(nan_label), labels / "nancase.nii.gz")
    write(from_array(nan_label), labels / "orphan.nii.gz")
    write(from_array(nan_image * 0), images / "nolabel_0000.nii.gz")
    write(from_array(nan_image * 0), images / "badname.nii.gz")
    # one 2D slice among 3D volumes
    slice_image = sitk.ReadImage(str(images / "tsexample_A_0000.nii.gz"))
    slice_label = sitk.ReadImage(str(labels / "tsexample_A.nii.gz"))
    middle = slice_image.GetSize()[2] // 2
    write(slice_image[:, :, middle:middle + 1], images / "slice2d_0000.nii.gz")
    write(slice_label[:, :, middle:middle + 1], labels / "slice2d.nii.gz")
    dataset_json = json.loads((bad / "dataset.json").read_text())
    dataset_json["labels"]["weird_thing"] = max(v for v in dataset_json["labels"].values()) + 1
    dataset_json["labels"]["rectum"] = dataset_json["labels"]["liver"]
    (bad / "dataset.json").write_text(json.dumps(dataset_json))
    (bad / "imagesTs").mkdir()
    (bad / "imagesTs" / "test1_0000.nii.gz").touch()
    expected = {
        "copy0_0000.nii.gz": "truncated",
        "copy1.nii.gz": "[99]",
        "copy2.nii.gz": "only background",
        "copy3.nii.gz": "spacing",
        "tsexample_B_0001.nii.gz": "unexpected",
        "nancase_0000.nii.gz": "1 NaN",
        "orphan.nii.gz": "has no image",
        "nolabel_0000.nii.gz": "no label file",
        "badname.nii.gz": "naming",
        "numTraining": "numTraining 2",
        "weird_thing": "DSM vocabulary",
        "test1_0000.nii.gz": "empty file",
        "slice2d_0000.nii.gz": "2D (one slice)",
        "rectum": "several labels one id",
    }
    return bad, expected


def test_bad_dataset_reports_every_problem(good_dataset: Path, tmp_path: Path) -> None:
    bad, expected = make_bad_dataset(good_dataset, tmp_path / "Dataset992_CheckBad")
    before = snapshot(bad)
    problems = check_raw_dataset(bad, progress=False)
    assert snapshot(bad) == before
    assert len(problems) == len(expected), "\n".join(map(str, problems))
    for key, text in expected.items():
        hits = [str(p) for p in problems if key in str(p) and text in str(p)]
        assert len(hits) == 1, f"{key} / {text}: {hits}"
    assert all(isinstance(p, InputError) and FIX in str(p) for p in problems)


def test_broken_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text("{not json")
    [problem] = check_raw_dataset(tmp_path, progress=False)
    assert "dataset.json" in str(problem) and "not valid JSON" in str(problem) and FIX in str(problem)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    [problem] = check_raw_dataset(tmp_path, progress=False)
    assert "channel_names" in str(problem) and "file_ending" in str(problem)


def test_dataset_with_explicit_file_lists(tmp_path: Path, ct_crop: sitk.Image) -> None:
    label = sitk.Cast(ct_crop > 100, sitk.sitkUInt8)
    label.CopyInformation(ct_crop)
    write(ct_crop, tmp_path / "imgs" / "c1.nii.gz")
    write(label, tmp_path / "segs" / "c1.nii.gz")
    write(ct_crop, tmp_path / "imgs" / "c2.nii.gz")
    dataset = {"c1": {"images": ["imgs/c1.nii.gz"], "label": "segs/c1.nii.gz"},
               "c2": {"images": ["imgs/c2.nii.gz"], "label": "segs/c2.nii.gz"}}
    (tmp_path / "dataset.json").write_text(json.dumps({**DATASET_JSON, "numTraining": 2, "dataset": dataset}))
    [problem] = check_raw_dataset(tmp_path, progress=False)
    assert "segs/c2.nii.gz" in str(problem) and "does not exist" in str(problem) and FIX in str(problem)


# ------------------------------------------------------------------------------------- prediction inputs


def test_prediction_inputs_good(tmp_path: Path, ct_crop: sitk.Image) -> None:
    for case in ("b", "a"):
        write(ct_crop, tmp_path / "in" / f"{case}_0000.nii.gz")
    (tmp_path / "in" / "notes.txt").write_text("ignored, as nnU-Net does")
    cases = check_prediction_inputs(tmp_path / "in", DATASET_JSON, PLANS_3D, "3d_fullres",
                                    output_folder=tmp_path / "out", progress=False)
    assert cases == [[str(tmp_path / "in" / "a_0000.nii.gz")], [str(tmp_path / "in" / "b_0000.nii.gz")]]
    assert not (tmp_path / "out").exists()


def test_prediction_inputs_from_files(tmp_path: Path, ct_crop: sitk.Image) -> None:
    write(ct_crop, tmp_path / "in" / "a_0000.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (tmp_path / "plans.json").write_text(json.dumps(PLANS_3D))
    cases = check_prediction_inputs(tmp_path / "in", tmp_path / "dataset.json", tmp_path / "plans.json",
                                    "3d_fullres", progress=False)
    assert cases == [[str(tmp_path / "in" / "a_0000.nii.gz")]]
    with pytest.raises(InputError) as err:
        check_prediction_inputs(tmp_path / "in", tmp_path / "model" / "dataset.json", PLANS_3D, "3d_fullres")
    assert_input_error(err, "model/dataset.json", "does not exist")


def test_prediction_inputs_all_problems_before_writing(tmp_path: Path, ct_crop: sitk.Image) -> None:
    inp = tmp_path / "in"
    write(ct_crop, inp / "good_0000.nii.gz")
    truncate(write(ct_crop, inp / "cut_0000.nii.gz"), 0.5)
    nan = sitk.GetArrayFromImage(ct_crop).astype(np.float32)
    nan[3, 3, 3] = np.nan
    write(from_array(nan), inp / "nan_0000.nii.gz")
    write(ct_crop[:, :, 7], inp / "flat_0000.nii.gz")
    write(ct_crop, inp / "two_0000.nii.gz")
    write(ct_crop, inp / "two_0001.nii.gz")
    write(ct_crop, inp / "nochannel.nii.gz")
    blocker = tmp_path / "file.txt"
    blocker.write_text("in the way")
    before = snapshot(tmp_path)
    with pytest.raises(InputErrors) as err:
        check_prediction_inputs(inp, DATASET_JSON, PLANS_3D, "3d_fullres", output_folder=blocker / "out",
                                progress=False)
    assert snapshot(tmp_path) == before
    assert len(err.value.errors) == 6
    assert_input_error(err, "cut_0000.nii.gz", "nan_0000.nii.gz", "flat_0000.nii.gz", "two_0001.nii.gz",
                       "nochannel.nii.gz", "file.txt/out")
    assert "good_0000" not in str(err.value)


def test_errors_survive_pickling() -> None:
    one = InputError("a.nii.gz", "is broken.", "re-export it")
    many = InputErrors([one, InputError(["b.nii.gz", "c.nii.gz"], "differ.", "resample")])
    assert str(pickle.loads(pickle.dumps(one))) == str(one) == "a.nii.gz: is broken. How to fix: re-export it."
    copy = pickle.loads(pickle.dumps(many))
    assert str(copy) == str(many) and copy.paths == ("a.nii.gz", "b.nii.gz", "c.nii.gz")


def test_prediction_into_input_folder(tmp_path: Path, ct_crop: sitk.Image) -> None:
    write(ct_crop, tmp_path / "a_0000.nii.gz")
    with pytest.raises(InputError) as err:
        check_prediction_inputs(tmp_path, DATASET_JSON, PLANS_3D, "3d_fullres", output_folder=tmp_path,
                                progress=False)
    assert_input_error(err, "a_0000.nii.gz", "never overwrites an input")


# ------------------------------------------------------------------------------------- CLI


def run_check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    check_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check", *argv, "--no-progress"])
    return args.func(args)


def test_cli_good_and_bad(good_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_check([str(good_dataset)]) == 0
    assert "no problems" in capsys.readouterr().out
    bad, expected = make_bad_dataset(good_dataset, tmp_path / "Dataset992_CheckBad")
    assert run_check([str(bad)]) == 2
    out = capsys.readouterr().out
    assert out.count("\n- ") + out.startswith("- ") == len(expected)


def test_cli_resolves_ids(good_dataset: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture) -> None:
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    assert run_check(["991"]) == 2
    assert "nnUNet_raw is not set" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(good_dataset.parent))
    assert resolve_raw_dataset("991") == good_dataset
    assert resolve_raw_dataset("Dataset991_CheckGood") == good_dataset
    assert run_check(["991"]) == 0
    assert run_check(["993"]) == 2
    assert "993" in capsys.readouterr().err
    with pytest.raises(InputError) as err:
        resolve_raw_dataset(os.path.join("no", "such", "folder"))
    assert_input_error(err, "folder", "not an existing folder")


def test_dsm_planner_stops_on_every_problem_before_planning(good_dataset: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """nnUNetv2_plan_and_preprocess -pl DSMPlanner... runs the checks of `nnunetv2_dsm check` first."""
    from nnunetv2_dsm.planners import dsm_planner

    raw = tmp_path / "raw"
    bad, expected = make_bad_dataset(good_dataset, raw / "Dataset992_CheckBad")
    preprocessed = tmp_path / "preprocessed"
    monkeypatch.setattr(dsm_planner, "nnUNet_raw", str(raw))
    monkeypatch.setattr(dsm_planner, "nnUNet_preprocessed", str(preprocessed))
    monkeypatch.delenv(dsm_planner.SKIP_CHECKS_VARIABLE, raising=False)
    with pytest.raises(InputErrors) as err:
        dsm_planner.DSMPlannerCPU("Dataset992_CheckBad")
    message = str(err.value)
    assert f"{len(expected)} input problems found" in message
    for key, text in expected.items():
        assert key in message and text in message, (key, text)
    assert not preprocessed.exists(), "nothing is planned or written"
    # DSM_SKIP_CHECKS=1 skips the file checks (dataset.json's DSM vocabulary is still checked)
    monkeypatch.setenv(dsm_planner.SKIP_CHECKS_VARIABLE, "1")
    with pytest.raises(DSMDatasetError, match="weird_thing"):
        dsm_planner.DSMPlannerCPU("Dataset992_CheckBad")


def test_stock_planning_command_reports_dsm_errors_without_traceback(good_dataset: Path, tmp_path: Path) -> None:
    """The stock command shows our error as the nnunetv2_dsm command does: message, no traceback."""
    import subprocess
    import sys

    raw = tmp_path / "raw"
    make_bad_dataset(good_dataset, raw / "Dataset992_CheckBad")
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res")}
    env.pop("DSM_SKIP_CHECKS", None)
    env.pop("DSM_DEBUG", None)
    command = [str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", "992", "-pl",
               "DSMPlannerCPU", "-c", "2d", "-np", "1"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "error: " in proc.stderr and "input problems found" in proc.stderr and "How to fix" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pre" / "Dataset992_CheckBad" / "DSMPlansCPU.json").exists()
    proc = subprocess.run(command, env={**env, "DSM_DEBUG": "1"}, capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
