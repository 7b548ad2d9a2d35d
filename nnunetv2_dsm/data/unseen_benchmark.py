"""Recipe: the unseen-tumour benchmark, split by patient, from the TotalSegmentator example CT.

- Training set (an nnU-Net raw dataset, ``imagesTr``/``labelsTr``): ``train_variants`` synthetic
  versions of patient A (``tsexample_A``) with *seen* tumour types (liver, kidney) inserted. Its classes
  are the organs and the seen tumours only: no unseen tumour name occurs in the training data.
- Test set (a folder outside the dataset: ``images/``, ``labels/``, ``dataset.json``): the held-out
  patients with *unseen* tumour types, in several sizes and contrasts (:data:`TEST_VARIANTS`):
  patient B (``tsexample_B``, contrast-enhanced upper abdomen, another scanner) with spleen and
  stomach tumours, patient C (``tsexample_C``, chest CT angiogram) with aortic lesions. The test
  ``dataset.json`` is the training classes (same label ids) plus the unseen types; per-case
  availability says what each test label map annotates (C: the aorta and its lesions only);
  ``clean/<patient>_0000.nii.gz`` is each test patient's CT before any lesion was inserted.

Organ labels are TotalSegmentator model output; the tumours are synthetic
(:func:`~nnunetv2_dsm.data.synthesis.synthesize_lesions`). Every case is stored RAS.
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_dsm.data.fetch import example_ct_dir
from nnunetv2_dsm.data.raw_dataset import (
    assign_ids,
    dsm_dataset_json,
    staged_dataset,
    write_image,
    write_json_atomic,
)
from nnunetv2_dsm.data.synthesis import DEFAULT_LESION_CONFIGS, LesionConfig, synthesize_lesions
from nnunetv2_dsm.data.totalseg_example import _cases, _to_canonical, label_on_image_grid, read_ct
from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.vocabulary import TUMOUR_PARENTS

ORGANS = ("liver", "spleen", "stomach", "aorta", "pancreas", "kidney_right", "kidney_left")
SEEN = ("liver_tumor", "kidney_tumor")
# Held-out patient -> the unseen tumour types inserted into it.
# Patient B's pancreas (TotalSegmentator label, 20 slices of 2 mm) holds no lesion of 4 mm or more (its
# largest inscribed sphere is 8.8 mm across; the lesion shapes do not fit), so B carries no pancreas tumour.
UNSEEN = {"tsexample_B": ("spleen_tumor", "stomach_tumor"), "tsexample_C": ("aortic_tumor",)}
# Lesion counts, shape and erosion per unseen type (sizes and contrasts come from the test variant).
UNSEEN_CONFIGS: dict[str, LesionConfig] = {
    "spleen_tumor": DEFAULT_LESION_CONFIGS["spleen_tumor"],
    "stomach_tumor": LesionConfig(count=(1, 2), erosion_mm=2.0),
    "aortic_tumor": LesionConfig(count=(1, 2), erosion_mm=1.0, elongation=0.4),
}
# Test variant -> (equivalent diameter range in mm, HU shift from the host organ's median).
TEST_VARIANTS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "small_faint": ((5.0, 9.0), (-35.0, -15.0)),
    "medium_hypodense": ((8.0, 16.0), (-70.0, -35.0)),
    "large_hyperdense": ((12.0, 24.0), (25.0, 60.0)),
}
TEST_IMAGES, TEST_LABELS, TEST_CLEAN = "images", "labels", "clean"


def _patient_c(src: Path) -> tuple[sitk.Image, np.ndarray]:
    """Patient C's CT and a label array holding only its aorta (value 1)."""
    ct = read_ct(src / "aorta_report" / "example_ct.nii.gz")
    label_path = src / "aorta_report" / "test_result" / "models" / "aorta.nii.gz"
    aorta = label_on_image_grid(sitk.ReadImage(str(label_path)), ct, label_path)
    return ct, (sitk.GetArrayFromImage(aorta) > 0).astype(np.uint8)


def _write_case(image: np.ndarray, label: np.ndarray, like: sitk.Image, image_path: Path, label_path: Path) -> None:
    ct = sitk.GetImageFromArray(image.astype(np.int16))
    ct.CopyInformation(like)
    seg = sitk.GetImageFromArray(label.astype(np.uint8))
    seg.CopyInformation(like)
    write_image(ct, image_path)
    write_image(seg, label_path)


def _insert(image: np.ndarray, label: np.ndarray, tumours: Sequence[str], ids: Mapping[str, int],
            spacing: np.ndarray, rng: np.random.Generator, configs: Mapping[str, LesionConfig]):
    placed = {}
    for tumour in tumours:
        organ_ids = [ids[p] for p in TUMOUR_PARENTS[tumour] if p in ids and (label == ids[p]).any()]
        if not organ_ids:
            continue
        image, label, info = synthesize_lesions(image, label, organ_ids, ids[tumour], spacing, rng, configs[tumour])
        placed[tumour] = info["lesions"]
    return image, label, placed


def _write_clean(folder: Path, patients) -> None:
    """The test patients' CT before any lesion was inserted: ``<folder>/<patient>_0000.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    for patient, ct in patients:
        image = sitk.GetImageFromArray(sitk.GetArrayFromImage(ct).astype(np.int16))
        image.CopyInformation(ct)
        write_image(image, folder / f"{patient}_0000.nii.gz")  # the test cases' orientation and type


def write_clean_images(test_dir: str | Path, src: str | Path | None = None) -> Path:
    """Add the lesion-free CT of the test patients (``clean/``) to a test folder built without it.

    The true healthy image of every test case is its patient's clean CT (lesions are the only change),
    which measures how healthy a pseudo-healthy image is (DiffuGTS).
    """
    src = Path(src) if src is not None else example_ct_dir()
    cases = {name: ct for name, ct, _ in _cases(src)}
    _write_clean(Path(test_dir) / TEST_CLEAN, (("tsexample_B", cases["tsexample_B"]),
                                                ("tsexample_C", _patient_c(src)[0])))
    return Path(test_dir) / TEST_CLEAN


def build_unseen_benchmark(dataset_dir: str | Path, test_dir: str | Path, train_variants: int = 4, seed: int = 0,
                           src: str | Path | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the training dataset ``dataset_dir`` (e.g. ``$nnUNet_raw/Dataset991_UnseenTumours``) and the
    test folder ``test_dir``; both are staged and appear complete or not at all. Returns both paths.

    Variant ``v`` of a case uses the generator seeded with ``(seed, patient index, split, v)``.
    """
    src = Path(src) if src is not None else example_ct_dir()
    dataset_dir, test_dir = Path(dataset_dir), Path(test_dir)
    train_ids = assign_ids(list(ORGANS) + list(SEEN), "unseen benchmark")
    unseen_all = [t for types in UNSEEN.values() for t in types]
    test_ids = {**train_ids, **{t: len(train_ids) + 1 + i for i, t in enumerate(unseen_all)}}
    cases = {name: (ct, sitk.GetArrayFromImage(seg)) for name, ct, seg in _cases(src)}
    a_ct, a_seg = cases["tsexample_A"]
    b_ct, b_seg = cases["tsexample_B"]
    c_ct, c_aorta = _patient_c(src)
    lesions: dict[str, dict] = {}

    train_availability = {}
    with staged_dataset(dataset_dir, overwrite=overwrite) as stage:
        image = sitk.GetArrayFromImage(a_ct).astype(np.int16)
        label = _to_canonical(a_seg, train_ids)
        spacing = np.array(a_ct.GetSpacing()[::-1])
        for v in tqdm(range(train_variants), desc="unseen benchmark: training cases", unit="case"):
            rng = np.random.default_rng([seed, 0, 0, v])
            img, lab, placed = _insert(image, label, SEEN, train_ids, spacing, rng, DEFAULT_LESION_CONFIGS)
            case = f"unseen_A_{v:02d}"
            _write_case(img, lab, a_ct, stage / "imagesTr" / f"{case}_0000.nii.gz", stage / "labelsTr" / f"{case}.nii.gz")
            train_availability[case] = list(train_ids)
            lesions[case] = placed
        write_json_atomic(stage / "dataset.json", dsm_dataset_json(
            train_ids, train_variants, train_availability,
            {"tsexample": "totalsegmentator==2.18.0 tests/reference_files, synthetic seen tumours"},
            dataset_dir.name,
            "Patient A of the TotalSegmentator example CT with synthetic liver and kidney tumours; organ labels "
            "are TotalSegmentator model output. Test patients B and C with unseen tumour types are in a "
            "separate folder (nnunetv2_dsm.data.unseen_benchmark).",
            extra_dsm={"benchmark": {"seen_tumours": list(SEEN), "lesions_placed": lesions, "seed": seed}},
        ))

    test_availability, test_lesions = {}, {}
    with atomic.staged_folder(test_dir, existing="replace" if overwrite else "refuse") as stage:
        (stage / TEST_IMAGES).mkdir()
        (stage / TEST_LABELS).mkdir()
        for i, (patient, ct, label) in enumerate((
            ("tsexample_B", b_ct, _to_canonical(b_seg, test_ids)),
            ("tsexample_C", c_ct, c_aorta * np.uint8(test_ids["aorta"])),
        )):
            image = sitk.GetArrayFromImage(ct).astype(np.int16)
            spacing = np.array(ct.GetSpacing()[::-1])
            present = [n for n in ORGANS if (label == test_ids[n]).any()]
            for v, (variant, (diameter, shift)) in enumerate(TEST_VARIANTS.items()):
                rng = np.random.default_rng([seed, i + 1, 1, v])
                configs = {t: replace(UNSEEN_CONFIGS[t], diameter_mm=diameter, attenuation_hu=shift)
                           for t in UNSEEN[patient]}
                img, lab, placed = _insert(image, label, UNSEEN[patient], test_ids, spacing, rng, configs)
                case = f"unseen_{patient[-1]}_{variant}"
                _write_case(img, lab, ct, stage / TEST_IMAGES / f"{case}_0000.nii.gz",
                            stage / TEST_LABELS / f"{case}.nii.gz")
                test_availability[case] = present + list(placed)
                test_lesions[case] = {"patient": patient, "variant": variant, "lesions": placed}
        _write_clean(stage / TEST_CLEAN, (("tsexample_B", b_ct), ("tsexample_C", c_ct)))
        write_json_atomic(stage / "dataset.json", dsm_dataset_json(
            test_ids, 0, test_availability,
            {"tsexample": "totalsegmentator==2.18.0 tests/reference_files, synthetic unseen tumours"},
            test_dir.name,
            "Held-out patients B and C with synthetic tumour types absent from training; labels are "
            "TotalSegmentator model output (C: aorta only) plus the synthetic lesions.",
            extra_dsm={"benchmark": {"unseen_tumours": UNSEEN, "variants": {k: {"diameter_mm": d, "shift_hu": s}
                                                                            for k, (d, s) in TEST_VARIANTS.items()},
                                     "lesions_placed": test_lesions, "seed": seed}},
        ))
    return dataset_dir, test_dir
