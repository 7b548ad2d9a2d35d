"""Recipes converting public CT segmentation datasets into DSM raw datasets (nnU-Net v2 format).

Each recipe reads the dataset in its documented download layout, maps its documented label ids to
canonical DSM names (:mod:`nnunetv2_dsm.vocabulary`) and writes ``imagesTr``/``labelsTr``/
``dataset.json`` with region syntax and per-case availability. Case ids carry the recipe name as
source prefix (``msd09_spleen_010``, ``kits23_00042``) so recipe outputs merge without renaming.

Images are copied byte for byte (``.nii`` files are re-encoded as ``.nii.gz``); labels are written
on the image's voxel grid (same geometry as the image, which nnU-Net requires).

Left/right: DSM has ``kidney_right``/``kidney_left`` (and adrenal glands), while KiTS and
AbdomenCT-1K have one "kidney" label and WORD one "adrenal" label. These recipes split such a label
by side: every connected component (26-neighbourhood) of the organ together with its tumours is
assigned whole to the patient's left when its centroid lies at a larger physical LPS x than the
body midline (the x centroid of voxels above -500 HU), to the right otherwise. LPS +x is the
patient's left, so this follows the image header, not the array orientation.

Datasets with a merged class DSM does not have are mapped explicitly: AMOS id 15
"prostate/uterus" is dropped (set to background, class unavailable) because it is not prostate in
female patients.
"""

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from nnunetv2_dsm.data.raw_dataset import (
    Geometry,
    assign_ids,
    case_paths,
    copy_image,
    dsm_dataset_json,
    label_dtype,
    read_array,
    remap_labels,
    staged_dataset,
    write_array,
    write_json_atomic,
)
from nnunetv2_dsm.data.totalseg_names import TOTALSEG_TO_CANONICAL
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.vocabulary import TUMOUR_PARENTS, is_tumour

BODY_HU = -500.0


class RecipeError(DSMError, ValueError):
    pass


@dataclass(frozen=True)
class SourceCase:
    """One case of a public dataset: a label map, or (TotalSegmentator) one binary mask per structure."""

    case_id: str
    image: Path
    label: Path | None = None
    structures: Mapping[str, Sequence[Path]] | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    layout: str
    find_cases: Callable[[Path], list[SourceCase]]
    # Source label id -> canonical name, a key of ``split`` (split by side) or None (dropped).
    label_ids: Mapping[int, str | None] = field(default_factory=dict)
    # Single label covering both sides -> (right canonical name, left canonical name).
    split: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    def classes(self) -> set[str]:
        names = {n for n in self.label_ids.values() if n is not None and n not in self.split}
        return names | {s for pair in self.split.values() for s in pair}


def _visible(files: Sequence[Path]) -> list[Path]:
    """Drop hidden files, e.g. the macOS ``._name`` copies shipped inside the MSD archives."""
    return sorted(f for f in files if not f.name.startswith("."))


def _nii_stem(path: Path) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", path.name)


def _check_source_json(src: Path, expected_ids: Sequence[int]) -> None:
    """Guard against converting the wrong folder: a shipped dataset.json must list the documented ids."""
    path = src / "dataset.json"
    if not path.is_file():
        return
    labels = json.loads(path.read_text()).get("labels", {})
    ids = {int(k) for k in labels} - {0}
    if ids != set(expected_ids):
        raise RecipeError(
            f"{path}: label ids {sorted(ids)} differ from the documented ids {sorted(expected_ids)} of this "
            "dataset; is --src the right dataset folder?"
        )


def _msd_finder(task: str, label_ids: Sequence[int], prefix: str) -> Callable[[Path], list[SourceCase]]:
    def find(src: Path) -> list[SourceCase]:
        _check_source_json(src, label_ids)
        cases = []
        for image in _visible(list((src / "imagesTr").glob(f"{task}_*.nii.gz"))):
            m = re.fullmatch(rf"{task}_(\d+)", _nii_stem(image))
            if m:
                label = src / "labelsTr" / image.name
                cases.append(SourceCase(f"{prefix}_{task}_{int(m.group(1)):03d}", image, label))
        return cases

    return find


def _find_btcv(src: Path) -> list[SourceCase]:
    cases = []
    for image in _visible(list(src.rglob("img*.nii.gz"))):
        m = re.fullmatch(r"img(\d+)", _nii_stem(image))
        label = image.parent.parent / "label" / f"label{m.group(1)}.nii.gz" if m else None
        if m and image.parent.name == "img" and label.is_file():
            cases.append(SourceCase(f"btcv_{m.group(1)}", image, label))
    return cases


def _find_lits(src: Path) -> list[SourceCase]:
    segs = {}
    for f in _visible(list(src.rglob("segmentation-*.nii*"))):
        m = re.fullmatch(r"segmentation-(\d+)", _nii_stem(f))
        if m:
            segs[int(m.group(1))] = f
    cases = []
    for image in _visible(list(src.rglob("volume-*.nii*"))):
        m = re.fullmatch(r"volume-(\d+)", _nii_stem(image))
        if m and int(m.group(1)) in segs:
            cases.append(SourceCase(f"lits_{int(m.group(1)):03d}", image, segs[int(m.group(1))]))
    return cases


def _kits_finder(prefix: str, label_name: str) -> Callable[[Path], list[SourceCase]]:
    def find(src: Path) -> list[SourceCase]:
        cases = []
        for image in _visible(list(src.rglob("case_*/imaging.nii.gz"))):
            m = re.fullmatch(r"case_(\d+)", image.parent.name)
            label = image.parent / label_name
            if m and label.is_file():
                cases.append(SourceCase(f"{prefix}_{m.group(1)}", image, label))
        return cases

    return find


def _find_totalseg(src: Path) -> list[SourceCase]:
    by_canonical: dict[str, list[str]] = {}
    for ts_name, canonical in TOTALSEG_TO_CANONICAL.items():
        by_canonical.setdefault(canonical, []).append(ts_name)
    cases = []
    for image in _visible(list(src.rglob("ct.nii.gz"))):
        seg_dir = image.parent / "segmentations"
        if not re.fullmatch(r"s\d+", image.parent.name) or not seg_dir.is_dir():
            continue
        structures = {}
        for canonical, ts_names in by_canonical.items():
            files = [seg_dir / f"{n}.nii.gz" for n in ts_names]
            present = [f.is_file() for f in files]
            if all(present):
                structures[canonical] = files
            elif any(present):
                missing = [str(f) for f, p in zip(files, present) if not p]
                raise RecipeError(f"{missing} missing: {canonical} needs all of {ts_names} in {seg_dir}")
        cases.append(SourceCase(f"totalseg_{image.parent.name}", image, structures=structures))
    return cases


def _split_folder_finder(
    pattern: str, prefix: str, splits: Sequence[tuple[str, str]], keep: Callable[[int], bool] = lambda n: True
) -> Callable[[Path], list[SourceCase]]:
    """Datasets with ``images*/labels*`` folder pairs and files ``{pattern}_NNNN.nii.gz``."""

    def find(src: Path) -> list[SourceCase]:
        cases = []
        for images_dir, labels_dir in splits:
            for image in _visible(list((src / images_dir).glob(f"{pattern}_*.nii.gz"))):
                m = re.fullmatch(rf"{pattern}_(\d+)", _nii_stem(image))
                label = src / labels_dir / image.name
                if m and keep(int(m.group(1))) and label.is_file():
                    cases.append(SourceCase(f"{prefix}_{m.group(1)}", image, label))
        return cases

    return find


def _find_abdomenct1k(src: Path) -> list[SourceCase]:
    masks = {_nii_stem(f): f for f in _visible(list(src.rglob("*.nii.gz"))) if not _nii_stem(f).endswith("_0000")}
    cases = []
    for image in _visible(list(src.rglob("*_0000.nii.gz"))):
        stem = _nii_stem(image)[: -len("_0000")]
        if stem in masks:
            cases.append(SourceCase("abdomenct1k_" + re.sub(r"[^a-z0-9]+", "_", stem.lower()), image, masks[stem]))
    return cases


_MSD = {
    "msd03": ("Task03_Liver", "liver", {1: "liver", 2: "liver_tumor"}),
    "msd06": ("Task06_Lung", "lung", {1: "lung_tumor"}),
    "msd07": ("Task07_Pancreas", "pancreas", {1: "pancreas", 2: "pancreas_tumor"}),
    "msd08": ("Task08_HepaticVessel", "hepaticvessel", {1: "hepatic_vessel", 2: "hepatic_vessel_tumor"}),
    "msd09": ("Task09_Spleen", "spleen", {1: "spleen"}),
    "msd10": ("Task10_Colon", "colon", {1: "colon_tumor"}),
}
_KIDNEY = {"kidney": ("kidney_right", "kidney_left")}
_KITS_IDS: dict[int, str | None] = {1: "kidney", 2: "kidney_tumor", 3: "kidney_cyst"}
_BTCV_IDS: dict[int, str | None] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
    7: "stomach", 8: "aorta", 9: "postcava", 10: "portal_vein_and_splenic_vein", 11: "pancreas",
    12: "adrenal_gland_right", 13: "adrenal_gland_left",
}
_AMOS_IDS: dict[int, str | None] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "esophagus", 6: "liver",
    7: "stomach", 8: "aorta", 9: "postcava", 10: "pancreas", 11: "adrenal_gland_right",
    12: "adrenal_gland_left", 13: "duodenum", 14: "bladder", 15: None,
}
_WORD_IDS: dict[int, str | None] = {
    1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "stomach", 6: "gallbladder",
    7: "esophagus", 8: "pancreas", 9: "duodenum", 10: "colon", 11: "intestine", 12: "adrenal", 13: "rectum",
    14: "bladder", 15: "femur_head_left", 16: "femur_head_right",
}


def _amos_find(src: Path) -> list[SourceCase]:
    _check_source_json(src, list(_AMOS_IDS))
    # AMOS numbers its CT scans below 500 and its MRI scans from 500 on.
    return _split_folder_finder(
        "amos", "amos22", [("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")], keep=lambda n: n < 500
    )(src)


RECIPES: dict[str, Recipe] = {
    **{
        key: Recipe(
            key,
            f"Medical Segmentation Decathlon {task}",
            f"{task}/imagesTr/{stem}_N.nii.gz, {task}/labelsTr/{stem}_N.nii.gz, dataset.json",
            _msd_finder(stem, list(ids), key),
            ids,
        )
        for key, (task, stem, ids) in _MSD.items()
    },
    "btcv": Recipe(
        "btcv", "BTCV Multi-Atlas Labeling Beyond the Cranial Vault, abdomen",
        "Abdomen/RawData/Training/img/imgNNNN.nii.gz, .../label/labelNNNN.nii.gz", _find_btcv, _BTCV_IDS,
    ),
    "lits": Recipe(
        "lits", "LiTS Liver Tumor Segmentation Challenge",
        "volume-N.nii and segmentation-N.nii (any sub-folders)", _find_lits, {1: "liver", 2: "liver_tumor"},
    ),
    "kits19": Recipe(
        "kits19", "KiTS19 Kidney Tumor Segmentation Challenge 2019",
        "data/case_NNNNN/imaging.nii.gz, segmentation.nii.gz", _kits_finder("kits19", "segmentation.nii.gz"),
        {1: "kidney", 2: "kidney_tumor"}, _KIDNEY,
    ),
    "kits21": Recipe(
        "kits21", "KiTS21 Kidney and Kidney Tumor Segmentation Challenge 2021 (majority-vote labels)",
        "kits21/data/case_NNNNN/imaging.nii.gz, aggregated_MAJ_seg.nii.gz",
        _kits_finder("kits21", "aggregated_MAJ_seg.nii.gz"), _KITS_IDS, _KIDNEY,
    ),
    "kits23": Recipe(
        "kits23", "KiTS23 Kidney and Kidney Tumor Segmentation Challenge 2023",
        "kits23/dataset/case_NNNNN/imaging.nii.gz, segmentation.nii.gz",
        _kits_finder("kits23", "segmentation.nii.gz"), _KITS_IDS, _KIDNEY,
    ),
    "totalseg": Recipe(
        "totalseg", "TotalSegmentator CT dataset (structures mapped by nnunetv2_dsm.data.totalseg_names)",
        "sNNNN/ct.nii.gz, sNNNN/segmentations/<structure>.nii.gz", _find_totalseg,
    ),
    "amos22": Recipe(
        "amos22", "AMOS22 abdominal multi-organ segmentation, CT scans",
        "imagesTr/amos_NNNN.nii.gz, labelsTr/amos_NNNN.nii.gz (and imagesVa/labelsVa)", _amos_find, _AMOS_IDS,
    ),
    "word": Recipe(
        "word", "WORD whole abdominal organ dataset",
        "imagesTr|imagesVal|imagesTs/word_NNNN.nii.gz with labelsTr|labelsVal|labelsTs",
        _split_folder_finder(
            "word", "word", [("imagesTr", "labelsTr"), ("imagesVal", "labelsVal"), ("imagesTs", "labelsTs")]
        ),
        _WORD_IDS, {"adrenal": ("adrenal_gland_right", "adrenal_gland_left")},
    ),
    "abdomenct1k": Recipe(
        "abdomenct1k", "AbdomenCT-1K (liver, kidney, spleen, pancreas)",
        "images <case>_0000.nii.gz and masks <case>.nii.gz (any sub-folders)", _find_abdomenct1k,
        {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}, _KIDNEY,
    ),
}


def body_midline_x(image: np.ndarray, geometry: Geometry) -> float:
    """Physical LPS x (mm) of the centroid of the body (voxels above -500 HU)."""
    body = image > BODY_HU
    if not body.any():
        raise RecipeError("no voxel above -500 HU: cannot locate the body midline to split left and right")
    centroid = np.array([ndimage.center_of_mass(body)])
    return float(geometry.physical_points(centroid)[0, 0])


def left_side(mask: np.ndarray, geometry: Geometry, midline_x: float) -> np.ndarray:
    """Boolean map of the voxels of ``mask`` whose connected component lies on the patient's left."""
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    centroids = np.array(ndimage.center_of_mass(mask, components, range(1, n + 1)))
    is_left = np.concatenate([[False], geometry.physical_points(centroids)[:, 0] > midline_x])
    return is_left[components]


def _convert_label(recipe: Recipe, case: SourceCase, geometry: Geometry, ids: Mapping[str, int]) -> np.ndarray:
    """Label map of ``case`` in output ids on the image grid."""
    if case.structures is not None:
        out = np.zeros(geometry.array_shape, dtype=label_dtype(max(ids.values())))
        # Organs first, then tumours, so a tumour mask wins where structures overlap.
        for name in sorted(case.structures, key=is_tumour):
            for f in case.structures[name]:
                mask, _ = read_array(f)
                if mask.shape != out.shape:
                    raise RecipeError(f"{f}: shape {mask.shape} differs from the image {case.image} {out.shape}")
                out[mask > 0] = ids[name]
        return out

    src, _ = read_array(case.label)
    if src.shape != geometry.array_shape:
        raise RecipeError(
            f"{case.label}: label shape {src.shape} differs from image {case.image} shape {geometry.array_shape}"
        )
    lut = np.full(max(recipe.label_ids) + 1, -1, dtype=np.int64)
    lut[0] = 0
    for v, name in recipe.label_ids.items():
        lut[v] = 0 if name is None else ids[recipe.split[name][0] if name in recipe.split else name]
    out = remap_labels(src, lut, f"{case.label} ({recipe.description})").astype(label_dtype(max(ids.values())))
    for name, (right, left) in recipe.split.items():
        organ_values = [v for v, n in recipe.label_ids.items() if n == name]
        member_values = [
            v for v, n in recipe.label_ids.items() if n in TUMOUR_PARENTS and {right, left} <= set(TUMOUR_PARENTS[n])
        ]
        organ = np.isin(src, organ_values)
        if not organ.any():
            continue
        image, _ = read_array(case.image)
        left_mask = left_side(organ | np.isin(src, member_values), geometry, body_midline_x(image, geometry))
        out[organ & left_mask] = ids[left]
    return out


def find_cases(name: str, src: Path) -> list[SourceCase]:
    recipe = _recipe(name)
    src = Path(src)
    if not src.is_dir():
        raise RecipeError(f"--src {src} is not a folder")
    cases = recipe.find_cases(src)
    if not cases:
        raise RecipeError(f"{src}: no labelled {recipe.description} cases found; expected layout: {recipe.layout}")
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise RecipeError(f"{src}: case ids {dupes} occur more than once; point --src at a single copy of the data")
    return cases


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]


def convert(name: str, src: Path, out: Path, overwrite: bool = False, limit: int | None = None) -> Path:
    """Convert the public dataset ``name`` found under ``src`` into the raw dataset folder ``out``."""
    recipe = _recipe(name)
    cases = find_cases(name, src)[:limit]
    per_structure = [set(c.structures) for c in cases if c.structures is not None]
    ids = assign_ids(set().union(*per_structure) if per_structure else recipe.classes(), f"recipe {name}")
    availability: dict[str, list[str]] = {}
    out = Path(out)
    # Truncated or NaN images and labels off the image grid would be converted silently; stop before writing.
    # (Imported here: the checks import nnU-Net and torch, which `nnunetv2_dsm --help` must not.)
    from nnunetv2_dsm.checks.inputs import check_source_cases

    check_source_cases([(c.image, [c.label] if c.structures is None else [f for fs in c.structures.values() for f in fs])
                        for c in cases], what=f"{name} cases")
    with staged_dataset(out, overwrite=overwrite, inputs=[src]) as stage:
        for case in tqdm(cases, desc=f"recipe {name}", unit="case"):
            geometry = Geometry.of_file(case.image)
            label = _convert_label(recipe, case, geometry, ids)
            image_dst, label_dst = case_paths(stage, case.case_id)
            copy_image(case.image, image_dst)
            write_array(label, geometry, label_dst)
            annotated = set(case.structures) if case.structures is not None else set(ids)
            availability[case.case_id] = [n for n in ids if n in annotated]
        write_json_atomic(
            stage / "dataset.json",
            dsm_dataset_json(
                ids, len(cases), availability, {name: recipe.description}, out.name,
                f"{recipe.description}, converted by the nnunetv2_dsm recipe {name!r}",
            ),
        )
    return out
