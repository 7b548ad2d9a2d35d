"""Each public-dataset recipe on a tiny fabricated copy of the dataset's documented layout."""

import argparse
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

from nnunetv2_dsm.cli import recipe as recipe_cli
from nnunetv2_dsm.data.public_recipes import RECIPES, RecipeError, convert, left_side
from nnunetv2_dsm.data.raw_dataset import Geometry, OutputOverlapsInputError
from nnunetv2_dsm.data.totalseg_names import TOTALSEG_TO_CANONICAL
from nnunetv2_dsm.io.orientation import image_orientation

SHAPE = (16, 16, 16)
SPACING = (1.5, 1.25, 2.0)


def write_nii(path: Path, array: np.ndarray, direction: tuple | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((-10.0, 5.0, 30.0))
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


def ct() -> np.ndarray:
    image = np.full(SHAPE, -1000, dtype=np.int16)
    image[:, 1:15, 1:15] = 40
    return image


def fabricated_label(ids: list[int], split_id: int | None = None, members: tuple[int, ...] = ()):
    """Label map with one 2x2x2 block per id; ``split_id`` gets a right (low x) and a left (high x)
    blob, ``members`` (tumours) touch the left blob. Returns the map and {voxel: source id, side}."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    where: dict[tuple, tuple[int, str]] = {}
    plain = [i for i in ids if i != split_id and i not in members]
    for k, v in enumerate(plain):
        z, x = 1 + 3 * (k // 4), 1 + 3 * (k % 4)
        label[z : z + 2, 8:10, x : x + 2] = v
        where[(z, 8, x)] = (v, "")
    if split_id is not None:
        label[12:15, 2:5, 2:5] = split_id
        label[12:15, 2:5, 10:13] = split_id
        where[(13, 3, 3)] = (split_id, "right")
        where[(13, 3, 11)] = (split_id, "left")
        for k, m in enumerate(members):
            label[12:14, 2:4, 13 - 4 * k : 14 - 4 * k] = m
            where[(12, 2, 13 - 4 * k)] = (m, "")
    return label, where


def _msd(task: str, stem: str, labels: dict):
    def make(src: Path):
        root = src / task
        label, where = fabricated_label(list(labels))
        for n in (1, 10):
            write_nii(root / "imagesTr" / f"{stem}_{n}.nii.gz", ct())
            write_nii(root / "labelsTr" / f"{stem}_{n}.nii.gz", label)
        write_nii(root / "imagesTs" / f"{stem}_5.nii.gz", ct())
        (root / "imagesTr" / f"._{stem}_1.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        dj = {"labels": {"0": "background", **{str(k): v for k, v in labels.items()}}, "modality": {"0": "CT"}}
        (root / "dataset.json").write_text(json.dumps(dj))
        return root, {f"{{}}_{stem}_001": where, f"{{}}_{stem}_010": where}

    return make


def _btcv(src: Path):
    label, where = fabricated_label(list(range(1, 14)))
    root = src / "Abdomen" / "RawData"
    write_nii(root / "Training" / "img" / "img0001.nii.gz", ct())
    write_nii(root / "Training" / "label" / "label0001.nii.gz", label)
    write_nii(root / "Testing" / "img" / "img0061.nii.gz", ct())
    return src, {"btcv_0001": where}


def _lits(src: Path):
    label, where = fabricated_label([1, 2])
    write_nii(src / "Training Batch 1" / "volume-0.nii", ct())
    write_nii(src / "Training Batch 1" / "segmentation-0.nii", label)
    write_nii(src / "Training Batch 2" / "volume-28.nii", ct())
    write_nii(src / "Training Batch 2" / "segmentation-28.nii", label)
    write_nii(src / "Test" / "test-volume-0.nii", ct())
    return src, {"lits_000": where, "lits_028": where}


def _kits(folder: str, seg_name: str, ids: list[int]):
    def make(src: Path):
        label, where = fabricated_label(ids, split_id=1, members=tuple(ids[1:]))
        write_nii(src / folder / "case_00000" / "imaging.nii.gz", ct())
        write_nii(src / folder / "case_00000" / seg_name, label)
        write_nii(src / folder / "case_00210" / "imaging.nii.gz", ct())
        return src, {"{}_00000": where}

    return make


def _totalseg(src: Path):
    names = sorted(TOTALSEG_TO_CANONICAL)
    expected = {}
    for case in ("s0001", "s0002"):
        where: dict[tuple, tuple[int, str]] = {}
        write_nii(src / case / "ct.nii.gz", ct())
        for k, name in enumerate([*names, "vertebrae_L1"]):
            if case == "s0002" and name.startswith("kidney_cyst"):
                continue
            mask = np.zeros(SHAPE, dtype=np.uint8)
            z, y, x = k // 16, (k // 4) % 4 * 3 + 1, k % 4 * 3 + 1
            mask[z, y, x] = 1
            if name in TOTALSEG_TO_CANONICAL:
                where[(z, y, x)] = (0, TOTALSEG_TO_CANONICAL[name])
            write_nii(src / case / "segmentations" / f"{name}.nii.gz", mask)
        expected[f"totalseg_{case}"] = where
    return src, expected


def _amos(src: Path):
    label, where = fabricated_label(list(range(1, 16)))
    for split, n in (("Tr", "0001"), ("Tr", "0507"), ("Va", "0010")):
        write_nii(src / f"images{split}" / f"amos_{n}.nii.gz", ct())
        write_nii(src / f"labels{split}" / f"amos_{n}.nii.gz", label)
    dj = {"labels": {str(i): f"class{i}" for i in range(16)}}
    (src / "dataset.json").write_text(json.dumps(dj))
    return src, {"amos22_0001": where, "amos22_0010": where}


def _word(src: Path):
    ids = [i for i in range(1, 17) if i != 12]
    label, where = fabricated_label([*ids, 12], split_id=12)
    root = src / "WORD-V0.1.0"
    for split, n in (("Tr", "0002"), ("Val", "0010"), ("Ts", "0120")):
        write_nii(root / f"images{split}" / f"word_{n}.nii.gz", ct())
        write_nii(root / f"labels{split}" / f"word_{n}.nii.gz", label)
    return root, {"word_0002": where, "word_0010": where, "word_0120": where}


def _abdomenct1k(src: Path):
    label, where = fabricated_label([1, 2, 3, 4], split_id=2)
    write_nii(src / "AbdomenCT-1K-ImagePart1" / "Case_00001_0000.nii.gz", ct())
    write_nii(src / "Mask" / "Case_00001.nii.gz", label)
    return src, {"abdomenct1k_case_00001": where}


# recipe -> (fabricator, documented source id -> canonical name; "R|L" pairs for side-split labels)
CASES = {
    "msd03": (_msd("Task03_Liver", "liver", {1: "liver", 2: "cancer"}), {1: "liver", 2: "liver_tumor"}),
    "msd06": (_msd("Task06_Lung", "lung", {1: "cancer"}), {1: "lung_tumor"}),
    "msd07": (_msd("Task07_Pancreas", "pancreas", {1: "pancreas", 2: "cancer"}), {1: "pancreas", 2: "pancreas_tumor"}),
    "msd08": (
        _msd("Task08_HepaticVessel", "hepaticvessel", {1: "Vessel", 2: "Tumour"}),
        {1: "hepatic_vessel", 2: "hepatic_vessel_tumor"},
    ),
    "msd09": (_msd("Task09_Spleen", "spleen", {1: "spleen"}), {1: "spleen"}),
    "msd10": (_msd("Task10_Colon", "colon", {1: "colon cancer primaries"}), {1: "colon_tumor"}),
    "btcv": (_btcv, {
        1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
        7: "stomach", 8: "aorta", 9: "postcava", 10: "portal_vein_and_splenic_vein", 11: "pancreas",
        12: "adrenal_gland_right", 13: "adrenal_gland_left",
    }),
    "lits": (_lits, {1: "liver", 2: "liver_tumor"}),
    "kits19": (_kits("data", "segmentation.nii.gz", [1, 2]), {1: "kidney_right|kidney_left", 2: "kidney_tumor"}),
    "kits21": (
        _kits("kits21/data", "aggregated_MAJ_seg.nii.gz", [1, 2, 3]),
        {1: "kidney_right|kidney_left", 2: "kidney_tumor", 3: "kidney_cyst"},
    ),
    "kits23": (
        _kits("dataset", "segmentation.nii.gz", [1, 2, 3]),
        {1: "kidney_right|kidney_left", 2: "kidney_tumor", 3: "kidney_cyst"},
    ),
    "totalseg": (_totalseg, {}),
    "amos22": (_amos, {
        1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
        7: "stomach", 8: "aorta", 9: "postcava", 10: "pancreas", 11: "adrenal_gland_right",
        12: "adrenal_gland_left", 13: "duodenum", 14: "bladder", 15: None,
    }),
    "word": (_word, {
        1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "stomach", 6: "gallbladder",
        7: "esophagus", 8: "pancreas", 9: "duodenum", 10: "colon", 11: "intestine",
        12: "adrenal_gland_right|adrenal_gland_left", 13: "rectum", 14: "bladder", 15: "femur_head_left",
        16: "femur_head_right",
    }),
    "abdomenct1k": (_abdomenct1k, {1: "liver", 2: "kidney_right|kidney_left", 3: "spleen", 4: "pancreas"}),
}


def own_id(labels: dict, name: str) -> int:
    value = labels[name]
    return value[0] if isinstance(value, list) else value


def verify_integrity(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net's verify_dataset_integrity, run in full. Its worker pool is started with fork instead
    of spawn, which re-imports torch in every worker (seconds per call); the checks are the same."""
    real = multiprocessing.get_context
    monkeypatch.setattr(vdi.multiprocessing, "get_context", lambda method=None: real("fork"))
    vdi.verify_dataset_integrity(str(folder), num_processes=1)


def test_every_recipe_has_a_test():
    assert set(CASES) == set(RECIPES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fabricate, id_map = CASES[name]
    src, expected = fabricate(tmp_path / "src")
    out = convert(name, src, tmp_path / f"Dataset001_{name}")
    dj = json.loads((out / "dataset.json").read_text())
    labels = dj["labels"]

    expected_ids = {k.format(name): v for k, v in expected.items()}
    assert sorted(dj["dsm"]["class_availability"]) == sorted(expected_ids)
    assert dj["numTraining"] == len(expected_ids)
    assert list(dj["dsm"]["sources"]) == [name]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(f"{c}_0000.nii.gz" for c in expected_ids)

    canonical = {n for v in id_map.values() if v for n in v.split("|")}
    if name == "totalseg":
        canonical = set(TOTALSEG_TO_CANONICAL.values())
    assert set(labels) - {"background"} == canonical
    # Region syntax: every organ lists its own id and the ids of its tumours present in the dataset.
    for tumour, parent in (("liver_tumor", "liver"), ("kidney_tumor", "kidney_left"), ("kidney_cyst", "kidney_right"),
                           ("pancreas_tumor", "pancreas"), ("hepatic_vessel_tumor", "hepatic_vessel")):
        if tumour in labels and parent in labels:
            assert labels[parent] == sorted(labels[parent]) and labels[tumour] in labels[parent]
    if any(isinstance(v, list) for v in labels.values()):
        assert dj["regions_class_order"] == [own_id(labels, n) for n in labels if n != "background"]

    for case_id, where in expected_ids.items():
        seg = sitk.ReadImage(str(out / "labelsTr" / f"{case_id}.nii.gz"))
        img = sitk.ReadImage(str(out / "imagesTr" / f"{case_id}_0000.nii.gz"))
        assert seg.GetSpacing() == pytest.approx(SPACING) and seg.GetOrigin() == img.GetOrigin()
        # Every output is stored in the canonical orientation; voxels are compared in the source's (LPS).
        assert image_orientation(seg) == image_orientation(img) == "RAS"
        assert dj["dsm"]["orientation"] == "RAS"
        arr = sitk.GetArrayFromImage(sitk.DICOMOrient(seg, "LPS"))
        for voxel, (source_id, side) in where.items():
            if name == "totalseg":
                assert arr[voxel] == own_id(labels, side)
                continue
            target = id_map[source_id]
            if target is None:
                assert arr[voxel] == 0
            elif "|" in target:
                right, left = target.split("|")
                assert arr[voxel] == own_id(labels, left if side == "left" else right), (voxel, side)
            else:
                assert arr[voxel] == own_id(labels, target)
        # Kidney tumours and cysts touch the left kidney: no right kidney voxel is lost to them.
        if name.startswith("kits"):
            assert (arr == own_id(labels, "kidney_right")).sum() == 27
    if name == "totalseg":
        avail = dj["dsm"]["class_availability"]
        assert "kidney_cyst" in avail["totalseg_s0001"] and "kidney_cyst" not in avail["totalseg_s0002"]
    verify_integrity(out, monkeypatch)


def test_lits_nii_images_are_recompressed_with_their_geometry(tmp_path: Path):
    src, _ = _lits(tmp_path / "src")
    out = convert("lits", src, tmp_path / "out")
    original = sitk.ReadImage(str(src / "Training Batch 1" / "volume-0.nii"))
    copied = sitk.ReadImage(str(out / "imagesTr" / "lits_000_0000.nii.gz"))
    assert image_orientation(copied) == "RAS"
    back = sitk.DICOMOrient(copied, image_orientation(original))
    assert np.array_equal(sitk.GetArrayFromImage(original), sitk.GetArrayFromImage(back))
    assert back.GetDirection() == original.GetDirection()
    assert np.allclose(back.GetOrigin(), original.GetOrigin(), atol=1e-6)


def test_side_split_follows_the_physical_axis_not_the_array():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[4:8, 4:8, 1:4] = True
    mask[4:8, 4:8, 12:15] = True
    flipped = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    for direction, low_x_is_left in (((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), False), (flipped, True)):
        g = Geometry(SHAPE, SPACING, (0.0, 0.0, 0.0), tuple(float(d) for d in direction))
        midline = float(g.physical_points(np.array([[7.5, 7.5, 7.5]]))[0, 0])
        left = left_side(mask, g, midline)
        assert left[5, 5, 2] == low_x_is_left and left[5, 5, 13] != low_x_is_left
        assert not left[~mask].any()


def test_undeclared_label_value_is_a_clear_error_and_nothing_is_written(tmp_path: Path):
    src, _ = _lits(tmp_path / "src")
    bad = np.zeros(SHAPE, dtype=np.uint8)
    bad[3, 3, 3] = 7
    write_nii(src / "Training Batch 2" / "segmentation-28.nii", bad)
    with pytest.raises(ValueError, match=r"segmentation-28\.nii .*voxel values \[7\]"):
        convert("lits", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_wrong_folder_and_empty_folder_are_clear_errors(tmp_path: Path):
    src, _ = _msd("Task03_Liver", "liver", {1: "liver", 2: "cancer"})(tmp_path / "a")
    with pytest.raises(RecipeError, match="documented ids"):
        convert("msd09", src, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no labelled .* cases found; expected layout"):
        convert("kits23", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(RecipeError, match="unknown recipe"):
        convert("brats", tmp_path / "empty", tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path: Path):
    src, _ = _btcv(tmp_path / "src")
    out = convert("btcv", src, tmp_path / "out")
    with pytest.raises(FileExistsError):
        convert("btcv", src, out)
    assert convert("btcv", src, out, overwrite=True, limit=1) == out
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1


def test_cli(tmp_path: Path):
    src, _ = _kits("kits23/dataset", "segmentation.nii.gz", [1, 2, 3])(tmp_path / "src")
    parser = argparse.ArgumentParser()
    recipe_cli.register(parser.add_subparsers())
    args = parser.parse_args(["recipe", "kits23", "--src", str(src), "--out", str(tmp_path / "Dataset220_KiTS23")])
    assert args.func(args) == 0
    dj = json.loads((tmp_path / "Dataset220_KiTS23" / "dataset.json").read_text())
    assert list(dj["dsm"]["class_availability"]) == ["kits23_00000"]
    assert dj["labels"]["kidney_right"] == [1, 3, 4] and dj["labels"]["kidney_left"] == [2, 3, 4]


@pytest.mark.parametrize("inside", [False, True])
def test_output_equal_to_or_inside_the_source_is_refused(tmp_path: Path, inside: bool):
    src, _ = _lits(tmp_path / "src")
    before = sorted(str(p) for p in src.rglob("*"))
    with pytest.raises(OutputOverlapsInputError, match="overwrite or remove the input"):
        convert("lits", src, src / "out" if inside else src, overwrite=True)
    assert sorted(str(p) for p in src.rglob("*")) == before


def test_truncated_and_nan_sources_are_refused_before_anything_is_written(tmp_path: Path):
    from nnunetv2_dsm.checks.inputs import InputErrors

    src, _ = _lits(tmp_path / "src")
    volumes = sorted(src.rglob("volume-*.nii"))
    nan_ct = ct().astype(np.float32)
    nan_ct[2, 2, 2] = np.nan
    write_nii(volumes[0], nan_ct)
    whole = volumes[1].read_bytes()
    volumes[1].write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputErrors) as err:
        convert("lits", src, tmp_path / "out")
    message = str(err.value)
    assert f"{volumes[0].name}: has 1 NaN" in message and f"{volumes[1].name}: is truncated" in message
    assert not (tmp_path / "out").exists()
