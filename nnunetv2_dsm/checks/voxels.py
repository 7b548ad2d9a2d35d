"""Voxel-level checks: finite intensities, image/label geometry, declared and non-empty label values."""

from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import SimpleITK as sitk
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_dsm.checks._common import GEOMETRY_TOL, PathLike, _listing
from nnunetv2_dsm.errors import InputError


def _nifti_nonfinite(path: Path) -> tuple[int, int] | None:
    """(NaN count, Inf count) of the voxels stored in a floating-point NIfTI file; None for other files.

    Read with nibabel because ITK's NIfTI reader replaces NaN and Inf by 0 without a word, so the
    SimpleITK image (and nnU-Net's SimpleITKIO) never shows them.
    """
    if not path.name.endswith((".nii", ".nii.gz")) or not path.is_file():
        return None
    try:
        image = nibabel.load(str(path))
    except Exception:  # unreadable headers are read_image_checked's business
        return None
    if image.header.get_data_dtype().kind not in "fc":
        return None
    data = np.asanyarray(image.dataobj)
    n_nan = int(np.count_nonzero(np.isnan(data)))
    return n_nan, int(data.size - np.count_nonzero(np.isfinite(data))) - n_nan


def check_intensities(image: sitk.Image, path: PathLike) -> None:
    """No NaN or infinite voxels (nnU-Net's normalisation would spread them over the whole prediction).

    For NIfTI files the stored voxels are checked too: SimpleITK reads NaN/Inf there as 0, which for CT
    is water inside what was meant to be air or outside the scan.
    """
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind not in "fc":
        return
    n_nan = int(np.count_nonzero(np.isnan(array)))
    n_inf = int(array.size - np.count_nonzero(np.isfinite(array))) - n_nan
    stored = None if n_nan or n_inf else _nifti_nonfinite(Path(path))
    if stored:
        n_nan, n_inf = stored
    if n_nan or n_inf:
        raise InputError(
            path, f"has {n_nan} NaN and {n_inf} infinite voxels (of {array.size})"
            f"{'; SimpleITK, and nnU-Net with it, reads them as 0 silently' if stored else ''}; nnU-Net's "
            "normalisation and the network need finite values.",
            "replace them in the exported image, e.g. with the lowest intensity of the scan (-1024 HU for CT) "
            "via numpy.nan_to_num, or re-export the scan"
        )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def check_same_geometry(image: sitk.Image, image_path: PathLike, label: sitk.Image, label_path: PathLike,
                        tol: float = GEOMETRY_TOL) -> None:
    """Same voxel grid: size exactly, spacing/origin/direction within ``tol``."""
    differences = []
    if image.GetDimension() != label.GetDimension():
        differences.append(f"dimension {image.GetDimension()} vs {label.GetDimension()}")
    else:
        if image.GetSize() != label.GetSize():
            differences.append(f"size {image.GetSize()} vs {label.GetSize()}")
        for field in ("Spacing", "Origin", "Direction"):
            a, b = getattr(image, f"Get{field}")(), getattr(label, f"Get{field}")()
            if not np.allclose(a, b, rtol=0, atol=tol):
                differences.append(f"{field.lower()} {_fmt(a)} vs {_fmt(b)}")
    if differences:
        raise InputError(
            [image_path, label_path], f"are not on the same voxel grid ({'; '.join(differences)}, "
            f"first vs second file, tolerance {tol}).",
            f"resample {Path(label_path).name} onto the grid of {Path(image_path).name} (nearest-neighbour for "
            "label maps) or re-export both from the same scan; if the voxels already line up and only the header "
            "differs, copy the header with SimpleITK's CopyInformation"
        )


def allowed_label_ids(dataset_json: dict) -> list[int]:
    """Label values a label map may contain: nnU-Net's label ids (regions expanded) plus the ignore label."""
    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    ids = [int(i) for i in manager.all_labels]
    return ids + [int(manager.ignore_label)] if manager.has_ignore_label else ids


def check_label_values(label: sitk.Image, path: PathLike, allowed_ids: Iterable[int],
                       dataset_json_path: PathLike) -> None:
    """Every value of the label map is a label id declared in dataset.json."""
    allowed = sorted({int(i) for i in allowed_ids})
    array = sitk.GetArrayViewFromImage(label)
    # pandas' hash-based unique, as nnU-Net's own dataset check uses: np.unique sorts every voxel
    values = pd.unique(np.asarray(array).ravel())
    bad = sorted(v.item() for v in values if not (float(v).is_integer() and int(v) in allowed))
    if bad:
        n_voxels = int(array.size - np.count_nonzero(np.isin(array, allowed)))
        shown = [int(v) if float(v).is_integer() else v for v in bad]
        raise InputError(
            path, f"contains label values [{_listing(shown)}] ({n_voxels} voxels) that are not label ids of "
            f"{dataset_json_path} (declared: {allowed}).",
            f"relabel the file to the declared ids, or declare the classes under 'labels' in {dataset_json_path}"
        )


def check_label_not_empty(label: sitk.Image, path: PathLike) -> None:
    """A DSM training case must annotate at least one voxel of some class."""
    if not np.any(sitk.GetArrayViewFromImage(label)):
        raise InputError(
            path, "contains only background (0): the label map annotates nothing, so the case cannot teach "
            "DSM any class.",
            "fix the export that produced the empty label map, or remove the case (image and label files, and "
            "lower numTraining in dataset.json)"
        )
