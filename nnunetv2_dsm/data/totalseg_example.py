"""Recipe: an nnU-Net raw dataset from the real example CT of the TotalSegmentator sdist.

The sdist holds CT of two patients with organ labels (TotalSegmentator model output, not manual
annotation), mapped to DSM's canonical names (``totalseg_names``):

- patient A: ``example_ct.nii.gz`` (abdomen and pelvis, 122x101x112 at 3 mm) with
  ``example_seg_fast_force_split.nii.gz``, case ``tsexample_A``. (``example_ct_sm.nii.gz`` is a crop of
  the same scan and is not used: it would put patient A on both sides of a split.)
- patient B: the DICOM series ``example_ct_dicom/`` (upper abdomen, another scanner, 512x512x20) with
  ``example_seg_dicom.nii.gz``, case ``tsexample_B``.

Patient C, ``aorta_report/example_ct.nii.gz`` (chest CT angiogram, neck to celiac level, 1.5 mm), is
labelled for the aorta only (``aorta_report/test_result/models/aorta.nii.gz``, on a cropped grid) and
shares no other class with A. It is a test patient, never in a training set:
:func:`write_test_patient_c` writes it outside the nnU-Net dataset.

``dataset.json`` lists the patients (``dsm.patients``, B first), so the DSM planners write
patient-level folds: fold 0 trains on A and validates on B, fold 1 the reverse
(:mod:`nnunetv2_dsm.planners.patient_splits`). Every case is stored RAS.
"""

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_dsm.data.fetch import example_ct_dir
from nnunetv2_dsm.data.raw_dataset import staged_dataset, write_image, write_json_atomic
from nnunetv2_dsm.data.totalseg_names import TOTALSEG_TO_CANONICAL, TOTALSEG_TOTAL_IDS
from nnunetv2_dsm.io.orientation import CANONICAL as CANONICAL_ORIENTATION
from nnunetv2_dsm.io.orientation import ORIENTATION_KEY
from nnunetv2_dsm.vocabulary import CANONICAL


def read_ct(path: Path) -> sitk.Image:
    """Read a NIfTI file or a DICOM series folder, with an error naming the file on failure."""
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise RuntimeError("no DICOM series found in the folder")
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise RuntimeError(f"Cannot read {path}: {str(e).strip().splitlines()[-1]}. "
                           "Check that the file is complete (re-download or re-export it).") from e


def label_on_image_grid(label: sitk.Image, image: sitk.Image, label_path: Path) -> sitk.Image:
    """Bring ``label`` onto ``image``'s voxel grid.

    Exporters often write the same grid with flipped axes (DICOM vs NIfTI orientation); nearest-
    neighbour resampling onto the image grid is exact then. Grids that do not overlap are an error.
    """
    if (label.GetSize() == image.GetSize() and np.allclose(label.GetSpacing(), image.GetSpacing())
            and np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
            and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-5)):
        label.CopyInformation(image)
        return label
    resampled = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    if sitk.GetArrayViewFromImage(resampled).any() or not sitk.GetArrayViewFromImage(label).any():
        return resampled
    raise ValueError(f"{label_path} does not overlap its image in physical space; image and label geometry differ.")


def _to_canonical(seg: np.ndarray, class_ids: dict[str, int]) -> np.ndarray:
    out = np.zeros(seg.shape, dtype=np.uint8)
    for ts_id, ts_name in TOTALSEG_TOTAL_IDS.items():
        name = TOTALSEG_TO_CANONICAL[ts_name]
        if name in class_ids:
            out[seg == ts_id] = class_ids[name]
    return out


# Case id -> patient, in the order of dsm.patients (fold k validates on the k-th patient).
PATIENTS = {"tsexample_B": "B", "tsexample_A": "A"}


def _cases(src: Path) -> list[tuple[str, sitk.Image, sitk.Image]]:
    ct = read_ct(src / "example_ct.nii.gz")
    seg = label_on_image_grid(sitk.ReadImage(str(src / "example_seg_fast_force_split.nii.gz")), ct,
                              src / "example_seg_fast_force_split.nii.gz")
    dicom = read_ct(src / "example_ct_dicom")
    dicom_seg = label_on_image_grid(sitk.ReadImage(str(src / "example_seg_dicom.nii.gz")), dicom,
                                    src / "example_seg_dicom.nii.gz")
    return [("tsexample_A", ct, seg), ("tsexample_B", dicom, dicom_seg)]


TEST_PATIENT_C = "tsexample_C"


def write_test_patient_c(out_dir: str | os.PathLike, aorta_label: int, src: str | os.PathLike | None = None) -> Path:
    """Write patient C as ``out_dir/images/tsexample_C_0000.nii.gz`` and ``out_dir/labels/tsexample_C.nii.gz``.

    The label holds the aorta only (value ``aorta_label``; 0 is "not aorta", not "background" for other
    classes), so C measures the aorta alone. Stored RAS like the dataset's cases; returns ``out_dir``.
    """
    src = Path(src) if src is not None else example_ct_dir()
    out_dir = Path(out_dir)
    ct = read_ct(src / "aorta_report" / "example_ct.nii.gz")
    label_path = src / "aorta_report" / "test_result" / "models" / "aorta.nii.gz"
    aorta = label_on_image_grid(sitk.ReadImage(str(label_path)), ct, label_path)
    label = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(aorta) > 0).astype(np.uint8) * np.uint8(aorta_label))
    label.CopyInformation(ct)
    write_image(sitk.Cast(ct, sitk.sitkInt16), out_dir / "images" / f"{TEST_PATIENT_C}_0000.nii.gz")
    write_image(label, out_dir / "labels" / f"{TEST_PATIENT_C}.nii.gz")
    return out_dir


def _present_classes(cases: list[tuple[str, sitk.Image, sitk.Image]]) -> set[str]:
    ids = set().union(*(np.unique(sitk.GetArrayViewFromImage(label)).tolist() for _, _, label in cases))
    return {TOTALSEG_TO_CANONICAL[TOTALSEG_TOTAL_IDS[i]] for i in ids if i in TOTALSEG_TOTAL_IDS}


def build_example_dataset(out_dir: str | os.PathLike, classes: list[str] | None = None,
                          src: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write ``out_dir`` (e.g. ``$nnUNet_raw/Dataset990_TSExample``) in nnU-Net raw format.

    The dataset is assembled in a staging folder and moved into place only when complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True (--overwrite).")
    cases = _cases(Path(src) if src is not None else example_ct_dir())
    present = _present_classes(cases)
    classes = classes or sorted(present)
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"Classes {missing} do not occur in the example segmentations; choose from {sorted(present)}.")
    class_ids = {name: i + 1 for i, name in enumerate(c for c in CANONICAL if c in classes)}

    with staged_dataset(out_dir, overwrite=overwrite) as staging:
        for case_id, image, label in tqdm(cases, desc="Writing example cases", unit="case"):
            image = sitk.Cast(image, sitk.sitkInt16)
            canonical = sitk.GetImageFromArray(_to_canonical(sitk.GetArrayFromImage(label), class_ids))
            canonical.CopyInformation(image)
            write_image(image, staging / "imagesTr" / f"{case_id}_0000.nii.gz")
            write_image(canonical, staging / "labelsTr" / f"{case_id}.nii.gz")
        dataset_json = {
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, **class_ids},
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
            "name": out_dir.name,
            "description": "Real CT of two patients from the TotalSegmentator 2.18.0 source distribution "
                           "(tests/reference_files); labels are TotalSegmentator model output mapped to DSM "
                           "canonical names. Split by patient (dsm.patients).",
            "dsm": {"sources": {"tsexample": "totalsegmentator==2.18.0 tests/reference_files"},
                    "patients": {patient: [case] for case, patient in PATIENTS.items()},
                    ORIENTATION_KEY: CANONICAL_ORIENTATION},
        }
        write_json_atomic(staging / "dataset.json", dataset_json)
    return out_dir
