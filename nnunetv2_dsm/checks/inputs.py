"""Catalogue of bad inputs: every check raises :class:`InputError` naming the file and how to fix it.

Training and prediction on clinical data run for days, so problems are found up front: unreadable or
truncated images
(NIfTI, DICOM series), NaN/Inf voxels, image/label grids that differ, undeclared or empty label
maps, missing channel files, 2D/3D mix-ups, and output folders that cannot be written or would
overwrite an input. The checks only read; none of them writes anything.

Folder-level entry points:
- :func:`check_raw_dataset` returns every problem of an nnU-Net raw dataset (``nnunetv2_dsm check``);
- :func:`check_prediction_inputs` checks every case of a prediction input folder, and the output
  folder, before any output is written, and raises one error listing all problems.
"""

import copy
import gzip
import json
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pandas as pd
import SimpleITK as sitk
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
from tqdm import tqdm

from nnunetv2_dsm.dataset_checks import DSMDatasetError, check_dsm_dataset_json
from nnunetv2_dsm.errors import InputError, InputErrors, raise_input_errors
from nnunetv2_dsm.io.orientation import CANONICAL as CANONICAL_ORIENTATION
from nnunetv2_dsm.io.orientation import image_orientation, mixed_orientations

PathLike = str | os.PathLike
Plans = dict | PathLike | PlansManager  # plans dict, plans.json path or nnU-Net's PlansManager

REEXPORT = "re-export or re-download the file"
GEOMETRY_TOL = 1e-3  # mm for spacing and origin, unitless for direction cosines
REQUIRED_DATASET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL_STEM = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")
_CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})\.[^_]+")
# Names that look like images; other files in a prediction input folder are left alone, as nnU-Net does.
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".tif", ".tiff", ".bmp")
_MAX_LISTED = 10


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _sitk_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1].removeprefix("sitk::ERROR: ") if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------- reading


def _gzip_payload_size(path: Path) -> int:
    """Decompressed size of a gzip file; truncated or corrupt streams raise InputError.

    Hand-written because SimpleITK's NIfTI reader fills the missing part of a truncated ``.nii.gz``
    silently; only a full pass over the stream (end marker, CRC and length) finds it.
    """
    size = 0
    buffer = bytearray(1 << 22)
    try:
        with gzip.open(path, "rb") as stream:
            while n := stream.readinto(buffer):
                size += n
    except EOFError as e:
        raise InputError(
            path, f"is truncated: its gzip stream stops before the end marker ({path.stat().st_size} bytes on "
            "disk; an interrupted download, copy or export).", REEXPORT
        ) from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(path, f"is not a valid gzip file ({e}); it is corrupt.", REEXPORT) from e
    return size


def _check_nifti_size(path: Path, payload_size: int) -> None:
    """The voxel data the NIfTI header promises must be in the file (SimpleITK does not check)."""
    try:
        image = nibabel.load(str(path))  # header only; voxels stay on disk
    except Exception:  # nibabel rejects some headers that ITK reads; SimpleITK decides about those
        return
    header = image.header
    expected = int(image.dataobj.offset) + int(np.prod(header.get_data_shape(), dtype=np.int64)) * int(
        header.get_data_dtype().itemsize
    )
    if payload_size < expected:
        raise InputError(
            path, f"is truncated: its NIfTI header declares {tuple(header.get_data_shape())} voxels of "
            f"{header.get_data_dtype()} ({expected} bytes with the header) but the "
            f"{'decompressed ' if path.name.endswith('.gz') else ''}file holds {payload_size} bytes.", REEXPORT
        )


def _check_slice_positions(folder: Path, files: Sequence[str], reader: sitk.ImageSeriesReader,
                           image: sitk.Image) -> None:
    """Evenly spaced slices; a gap means a missing or unreadable slice that GDCM left out silently."""
    key = "0020|0032"  # Image Position (Patient)
    if image.GetDimension() != 3 or len(files) < 3 or not all(
        reader.HasMetaDataKey(i, key) for i in range(len(files))
    ):
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    positions = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")] for i in range(len(files))])
    steps = np.diff(positions @ normal)
    median = float(np.median(steps))
    # 10 % (at least 0.01 mm) tolerates the rounding of positions that scanners write
    uneven = np.flatnonzero(np.abs(steps - median) > max(0.1 * abs(median), 0.01))
    if median == 0 or uneven.size:
        where = [f"{Path(files[i]).name} -> {Path(files[i + 1]).name}: {steps[i]:.3g} mm" for i in uneven]
        raise InputError(
            folder, f"is a DICOM series whose slices are not evenly spaced (usual step {median:.3g} mm; "
            f"{_listing(where)}): slices are missing, duplicated or unreadable.",
            "re-export or re-download the complete series"
        )


def _read_dicom_series(folder: Path) -> sitk.Image:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as e:
        raise InputError(folder, f"cannot be scanned for DICOM files ({_sitk_reason(e)}).", REEXPORT) from e
    if not series:
        raise InputError(
            folder, "is a folder without a readable DICOM series (a folder is read as one DICOM series; "
            "other images are single files such as case_0000.nii.gz).",
            "put the DICOM files of one series in the folder, re-export or re-download the series, "
            "or pass the image file instead of the folder"
        )
    if len(series) > 1:
        raise InputError(
            folder, f"holds {len(series)} DICOM series ({_listing(series)}); one folder must hold one series.",
            "move each series into its own folder"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    members = {Path(f).resolve() for f in files}
    strays = sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and p.resolve() not in members
    )
    if strays:
        raise InputError(
            strays[:_MAX_LISTED], f"{'is' if len(strays) == 1 else 'are'} in the DICOM series folder {folder} "
            f"but not part of its series ({len(strays)} of {len(strays) + len(files)} files): truncated or "
            "corrupt slices, or files that do not belong there.",
            "re-export or re-download the series, and move files that are not slices of it out of the folder"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise InputError(folder, f"is a DICOM series that cannot be read ({_sitk_reason(e)}).", REEXPORT) from e
    _check_slice_positions(folder, files, reader, image)
    return image


def read_image_checked(path: PathLike) -> sitk.Image:
    """Read an image file (or a DICOM series folder) with SimpleITK; anything unreadable is an InputError.

    Beyond SimpleITK's own errors this finds empty files, truncated or corrupt gzip streams, NIfTI files
    shorter than their header says, and DICOM folders with unreadable (truncated) or missing slices,
    all of which SimpleITK would otherwise read without complaint.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "does not exist.", "check the path, or re-export or re-download the file")
    if path.is_dir():
        return _read_dicom_series(path)
    if not os.access(path, os.R_OK):
        raise InputError(path, "cannot be opened: permission denied.", "make it readable for this user (chmod/chown)")
    if path.stat().st_size == 0:
        raise InputError(path, "is an empty file (0 bytes), e.g. from an interrupted copy or export.", REEXPORT)
    payload = _gzip_payload_size(path) if path.name.endswith(".gz") else path.stat().st_size
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti_size(path, payload)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise InputError(path, f"cannot be read as an image ({_sitk_reason(e)}).", REEXPORT) from e


# ---------------------------------------------------------------------------------------------- voxels


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


# ---------------------------------------------------------------------------------------------- layout


def split_case_file_name(file_name: str, file_ending: str) -> tuple[str, int] | None:
    """``"case_0001.nii.gz"`` -> ``("case", 1)``; None if the name is not ``<case>_<4 digits><ending>``."""
    if not file_name.endswith(file_ending):
        return None
    match = _CHANNEL_STEM.fullmatch(file_name[: -len(file_ending)])
    return (match["case"], int(match["channel"])) if match else None


def group_case_files(folder: PathLike, file_ending: str) -> tuple[dict[str, list[str]], list[Path]]:
    """Files of an nnU-Net images folder by case (sorted by channel), and entries that are misnamed.

    Hand-written instead of nnU-Net's ``create_lists_from_splitted_dataset_folder``, which drops
    misnamed files without a word (and starts a 12-process pool for a regular expression).
    """
    cases: dict[str, list[tuple[int, str]]] = {}
    misnamed = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.name.startswith("."):
            continue
        parts = split_case_file_name(entry.name, file_ending) if entry.is_file() else None
        if parts is None:
            misnamed.append(entry)
        else:
            cases.setdefault(parts[0], []).append((parts[1], str(entry)))
    return {c: [f for _, f in sorted(files)] for c, files in sorted(cases.items())}, misnamed


def _misnamed_error(entries: Sequence[Path], file_ending: str, label_folder: bool) -> InputError:
    pattern = f"<case>{file_ending}" if label_folder else f"<case>_<channel, 4 digits>{file_ending}"
    one = len(entries) == 1
    return InputError(
        entries[:_MAX_LISTED], f"{'does' if one else 'do'} not follow nnU-Net's naming {pattern}"
        f"{'' if one else f' ({len(entries)} entries)'}; nnU-Net ignores {'it' if one else 'them'} without a word.",
        f"rename to {pattern} (converting other formats to {file_ending}), or move {'it' if one else 'them'} out "
        "of the folder"
    )


def check_channels(case_files: Sequence[PathLike], expected_channels: int, dataset_json_path: PathLike) -> None:
    """A case has exactly the channel files ``<case>_0000 ... <case>_{n-1:04d}`` that channel_names declares."""
    names = [Path(f).name for f in case_files]
    found = sorted(int(m["channel"]) for n in names if (m := _CHANNEL_FILE.fullmatch(n)))
    expected = list(range(expected_channels))
    if found == expected and len(found) == len(names):
        return
    missing = [f"_{i:04d}" for i in expected if i not in found]
    extra = [n for n in names if not (m := _CHANNEL_FILE.fullmatch(n)) or int(m["channel"]) >= expected_channels]
    duplicated = sorted({f"_{i:04d}" for i in found if found.count(i) > 1})
    details = "; ".join(
        part for part in (
            f"missing {_listing(missing)}" if missing else "",
            f"unexpected {_listing(extra)}" if extra else "",
            f"duplicated {_listing(duplicated)}" if duplicated else "",
        ) if part
    )
    raise InputError(
        list(case_files) or [dataset_json_path],
        f"{'have' if len(names) != 1 else 'has'} {len(names)} channel file(s) but 'channel_names' in "
        f"{dataset_json_path} declares {expected_channels} (_0000 to _{expected_channels - 1:04d}): {details}.",
        "add the missing channel files, remove or rename the extra ones, or correct 'channel_names' in dataset.json"
    )


def check_scalar_image(image: sitk.Image, path: PathLike) -> None:
    """One scalar 2D or 3D image per file; nnU-Net takes channels as separate files."""
    if image.GetDimension() not in (2, 3) or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            path, f"is a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} value(s) per "
            f"voxel (size {image.GetSize()}); nnU-Net expects one scalar 2D or 3D image per channel file.",
            "split channels or time points into separate files <case>_0000, <case>_0001, ... and declare them "
            "under 'channel_names' in dataset.json"
        )


def _plans_manager(plans: Plans) -> PlansManager:
    return plans if isinstance(plans, PlansManager) else PlansManager(plans if isinstance(plans, dict) else str(plans))


def _is_2d_image(image: sitk.Image) -> bool:
    # nnU-Net stores 2D images as 3D files with one slice
    return image.GetDimension() == 2 or 1 in image.GetSize()


def check_dimensionality(image: sitk.Image, path: PathLike, configuration: str, plans: Plans) -> None:
    """A 3D configuration needs a 3D image; a model trained on 2D images needs a 2D image.

    ``plans`` is a plans dict, a path to plans.json or an nnU-Net ``PlansManager``.
    """
    check_scalar_image(image, path)
    manager = _plans_manager(plans)
    if configuration not in manager.available_configurations:
        raise InputError(
            plans if isinstance(plans, (str, os.PathLike)) else path,
            f"has no configuration {configuration!r} in plans {manager.plans.get('plans_name', '')!r} "
            f"(available: {manager.available_configurations}).",
            "pass one of the available configurations"
        )
    patch = manager.get_configuration(configuration).patch_size
    if "original_median_shape_after_transp" in manager.plans:
        dataset_2d = manager.original_median_shape_after_transp[0] == 1  # nnU-Net planner's own rule
    else:
        dataset_2d = not any(len(manager.get_configuration(c).patch_size) == 3 for c in manager.available_configurations)
    if len(patch) == 3 and _is_2d_image(image):
        raise InputError(
            path, f"is a 2D image (size {image.GetSize()}) but configuration {configuration!r} is a 3D model "
            f"(patch size {tuple(patch)}).",
            "supply the complete 3D volume (every slice of the scan), or predict with a 2d configuration"
        )
    if len(patch) == 2 and dataset_2d and not _is_2d_image(image):
        raise InputError(
            path, f"is a 3D volume (size {image.GetSize()}) but configuration {configuration!r} was trained on "
            "2D images.",
            "supply 2D images like the training data (one slice per file), or use a model trained on 3D volumes"
        )


def check_output_writable(folder: PathLike, inputs: Iterable[PathLike] = ()) -> None:
    """The output folder can be created and written, and holds none of ``inputs``.

    Nothing is left behind: a missing folder is not created, the write probe is a temporary file
    in the deepest existing parent that is removed at once.
    """
    folder = Path(folder).absolute()
    target = folder.resolve()
    clashes = [Path(p) for p in inputs if Path(p).resolve() == target or target in Path(p).resolve().parents]
    if clashes:
        raise InputError(
            [folder, *clashes[:_MAX_LISTED]], f"the output folder is, or contains, {len(clashes)} input file(s); "
            "prediction never overwrites an input.",
            "choose an output folder outside the input folder"
        )
    existing = folder
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(
            folder, f"cannot be created: {existing} is a file, not a folder.",
            "remove or rename that file, or choose another output folder"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".dsm-write-probe-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(
            folder, f"cannot be written: creating a file in {existing} failed ({e.strerror}).",
            "choose a folder this user can write to, fix its permissions (chmod/chown) or free disk space"
        ) from e


# ---------------------------------------------------------------------------------------------- datasets


def _load_dataset_json(path: Path) -> tuple[dict | None, list[InputError]]:
    """dataset.json and its problems; None when the rest of the dataset cannot be checked without it."""
    if not path.is_file():
        return None, [InputError(path, "does not exist.", "write a dataset.json (nnU-Net raw dataset format)")]
    try:
        dataset_json = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [InputError(path, f"is not valid JSON ({e}).", "fix the JSON syntax")]
    if not isinstance(dataset_json, dict):
        return None, [InputError(path, "is not a JSON object.", "write an object with " + ", ".join(REQUIRED_DATASET_KEYS))]
    problems = []
    missing = [k for k in REQUIRED_DATASET_KEYS if k not in dataset_json]
    if missing:
        problems.append(InputError(path, f"lacks the keys {missing} that nnU-Net requires.", "add them"))
    fatal = [k for k in missing if k != "numTraining"]
    channels = dataset_json.get("channel_names")
    if "channel_names" not in missing and (
        not isinstance(channels, dict) or not channels or set(channels) != {str(i) for i in range(len(channels))}
    ):
        problems.append(InputError(path, f"has channel_names {channels!r}; it must map '0', '1', ... to names.",
                                   'write e.g. "channel_names": {"0": "CT"}'))
        fatal.append("channel_names")
    ending = dataset_json.get("file_ending")
    if "file_ending" not in missing and not (isinstance(ending, str) and ending.startswith(".")):
        problems.append(InputError(path, f"has file_ending {ending!r}.", 'write e.g. "file_ending": ".nii.gz"'))
        fatal.append("file_ending")
    if "labels" not in missing:
        try:
            allowed_label_ids(dataset_json)
        except (AssertionError, TypeError, ValueError, AttributeError) as e:
            problems.append(InputError(path, f"has 'labels' nnU-Net cannot use ({str(e) or type(e).__name__}).",
                                       'write "labels": {"background": 0, "<class>": 1, ...}'))
            fatal.append("labels")
        else:
            shared = _labels_sharing_an_id(dataset_json["labels"])
            if shared:
                problems.append(InputError(
                    path, f"gives several labels one id ({shared}); each voxel value must name one class.",
                    "give every label its own id, or write regions as lists (\"liver\": [1, 2]) with "
                    "regions_class_order"
                ))
            try:
                check_dsm_dataset_json(dataset_json, str(path))
            except DSMDatasetError as e:
                problems.append(InputError(
                    path, str(e).removeprefix(f"{path}: "),
                    "edit dataset.json as described (DSM labels use the canonical names of nnunetv2_dsm.vocabulary)"
                ))
    return (None if fatal else dataset_json), problems


def _labels_sharing_an_id(labels: dict) -> str:
    """'1: liver, spleen' for plain (non-region) labels that give one id to several names; '' if none."""
    by_id: dict[int, list[str]] = {}
    for name, value in labels.items():
        if isinstance(value, int) and not isinstance(value, bool):
            by_id.setdefault(value, []).append(name)
    return "; ".join(f"{i}: {', '.join(names)}" for i, names in sorted(by_id.items()) if len(names) > 1)


def _mixed_dimensionality_error(two_d: list[str], three_d: list[str]) -> InputError | None:
    """A dataset whose cases mix single-slice (2D) images and 3D volumes: nnU-Net plans one kind."""
    if not two_d or not three_d:
        return None
    minority, kind = (two_d, "2D (one slice)") if len(two_d) <= len(three_d) else (three_d, "3D volumes")
    return InputError(
        minority, f"are {kind} while the other {len(two_d) + len(three_d) - len(minority)} case(s) are "
        f"{'3D volumes' if kind.startswith('2D') else '2D (one slice)'}; nnU-Net plans a dataset as all 2D or all 3D.",
        "supply the complete volume of every case (or only 2D slices), e.g. the whole scan instead of one slice"
    )


def _check_case_images(files: Sequence[str], n_channels: int, json_path: Path, configuration: str | None = None,
                       plans: Plans | None = None, listed: bool = False) -> tuple[sitk.Image | None, list[InputError]]:
    """All checks of one case's channel files; returns channel 0 (None if unreadable) and the problems.

    ``listed``: the files come from dataset.json's "dataset" lists, where names need not carry _0000.
    """
    problems = []
    if listed and len(files) != n_channels:
        problems.append(InputError(
            list(files) or [json_path], f"{'are' if len(files) != 1 else 'is'} the {len(files)} image file(s) "
            f"listed for a case in {json_path}, which declares {n_channels} channel(s) in 'channel_names'.",
            "list one image per channel in the case's 'images', or correct 'channel_names'"
        ))
    elif not listed:
        try:
            check_channels(files, n_channels, json_path)
        except InputError as e:
            problems.append(e)
    first, first_path = None, None
    for f in files:
        try:
            image = read_image_checked(f)
            check_scalar_image(image, f)
            check_intensities(image, f)
            if plans is not None:
                check_dimensionality(image, f, configuration, plans)
            if first is None:
                first, first_path = image, f
            else:
                check_same_geometry(first, first_path, image, f)
        except InputError as e:
            problems.append(e)
    return first, problems


def check_source_cases(cases: Iterable[tuple[PathLike, Sequence[PathLike]]], progress: bool = True,
                       what: str = "source cases") -> None:
    """Cases a converter is about to copy, as (image, label files) pairs: each file readable and complete,
    the image finite, every label on the image's grid. All problems are raised together (``InputErrors``),
    before anything is written; label values are checked where they are mapped to the new ids."""
    problems: list[InputError] = []
    for image_path, label_paths in tqdm(list(cases), desc=f"Checking {what}", unit="case", disable=not progress):
        try:
            image = read_image_checked(image_path)
            check_scalar_image(image, image_path)
            check_intensities(image, image_path)
        except InputError as e:
            problems.append(e)
            continue
        for label_path in label_paths:
            try:
                check_same_geometry(image, image_path, read_image_checked(label_path), label_path)
            except InputError as e:
                problems.append(e)
    raise_input_errors(problems)


def _check_label(label_path: Path, image: sitk.Image | None, image_path: str, allowed: list[int],
                 json_path: Path) -> list[InputError]:
    try:
        label = read_image_checked(label_path)
        check_label_values(label, label_path, allowed, json_path)
        check_label_not_empty(label, label_path)
        if image is not None:
            check_same_geometry(image, image_path, label, label_path)
    except InputError as e:
        return [e]
    return []


def _training_cases(folder: Path, dataset_json: dict) -> tuple[dict[str, dict], int, list[InputError]]:
    """case -> {'images': [...], 'label': path}, the number of image cases nnU-Net would count, and
    layout problems (orphans, misnamed files)."""
    ending = dataset_json["file_ending"]
    if "dataset" in dataset_json:
        cases = get_filenames_of_train_images_and_targets(str(folder), copy.deepcopy(dataset_json))
        return cases, len(cases), []
    problems = []
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for sub in (images_dir, labels_dir):
        if not sub.is_dir():
            problems.append(InputError(sub, "does not exist.", "create it with the training cases (nnU-Net raw format)"))
    if problems:
        return {}, 0, problems
    images, misnamed = group_case_files(images_dir, ending)
    if misnamed:
        problems.append(_misnamed_error(misnamed, ending, label_folder=False))
    labels = {}
    misnamed_labels = []
    for entry in sorted(labels_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith(ending):
            labels[entry.name[: -len(ending)]] = entry
        else:
            misnamed_labels.append(entry)
    if misnamed_labels:
        problems.append(_misnamed_error(misnamed_labels, ending, label_folder=True))
    for case in sorted(set(labels) - set(images)):
        problems.append(InputError(
            labels[case], f"has no image {case}_0000{ending} in {images_dir}.",
            "add the image files of the case, or remove the label file"
        ))
    no_label = sorted(set(images) - set(labels))
    if no_label:
        problems.append(InputError(
            [images[c][0] for c in no_label[:_MAX_LISTED]],
            f"{'has' if len(no_label) == 1 else 'have'} no label file in {labels_dir} ({len(no_label)} case(s): "
            f"{_listing(no_label)}; expected {labels_dir}/<case>{ending}).",
            "add the label files, or move the images of unlabelled cases to imagesTs"
        ))
    cases = {c: {"images": images[c], "label": str(labels[c])} for c in sorted(set(images) & set(labels))}
    return cases, len(images), problems


def check_raw_dataset(dataset_folder: PathLike, progress: bool = True) -> list[InputError]:
    """Every problem of an nnU-Net raw dataset (imagesTr, labelsTr, imagesTs, dataset.json); [] when sound.

    Checks dataset.json (required keys, channel_names, labels, file_ending, DSM class names), the
    file layout (naming, images without labels and vice versa, numTraining), and every file: readable
    and complete, no NaN/Inf, channel files of a case and its label on one grid, label values declared
    in dataset.json, no all-background training label.
    """
    folder = Path(dataset_folder)
    if not folder.is_dir():
        return [InputError(folder, "is not a folder.",
                           "pass an nnU-Net raw dataset folder ($nnUNet_raw/DatasetXXX_Name) or its ID")]
    json_path = folder / "dataset.json"
    dataset_json, problems = _load_dataset_json(json_path)
    if dataset_json is None:
        return problems
    n_channels = len(dataset_json["channel_names"])
    allowed = allowed_label_ids(dataset_json)
    cases, n_image_cases, layout = _training_cases(folder, dataset_json)
    problems += layout
    n_training = dataset_json.get("numTraining")
    if n_training is not None and n_training != n_image_cases:
        problems.append(InputError(
            json_path, f"declares numTraining {n_training} but the training images hold {n_image_cases} case(s).",
            f"set numTraining to {n_image_cases}, or add the missing cases"
        ))
    orientations: dict[str, str] = {}
    dimensionality: dict[bool, list[str]] = {True: [], False: []}
    for entry in tqdm(cases.values(), desc="Checking training cases", unit="case", disable=not progress):
        image, case_problems = _check_case_images(entry["images"], n_channels, json_path,
                                                  listed="dataset" in dataset_json)
        problems += case_problems
        if image is not None:
            orientations[entry["images"][0]] = image_orientation(image)
            dimensionality[_is_2d_image(image)].append(entry["images"][0])
        problems += _check_label(Path(entry["label"]), image, entry["images"][0] if entry["images"] else "",
                                 allowed, json_path)
    test_dir = folder / "imagesTs"
    if test_dir.is_dir():
        test_cases, misnamed = group_case_files(test_dir, dataset_json["file_ending"])
        if misnamed:
            problems.append(_misnamed_error(misnamed, dataset_json["file_ending"], label_folder=False))
        for files in tqdm(test_cases.values(), desc="Checking test cases", unit="case", disable=not progress):
            image, case_problems = _check_case_images(files, n_channels, json_path)
            problems += case_problems
            if image is not None:
                orientations[files[0]] = image_orientation(image)
    mixed = _mixed_dimensionality_error(dimensionality[True], dimensionality[False])
    if mixed is not None:
        problems.append(mixed)
    mixed = mixed_orientation_error(orientations)
    if mixed is not None:
        problems.append(mixed)
    return problems


def mixed_orientation_error(orientations: dict[str, str]) -> InputError | None:
    """An error listing the cases per orientation when image files (path -> code) mix orientations."""
    groups = mixed_orientations(orientations)
    if groups is None:
        return None
    summary = "; ".join(f"{code}: {len(files)} case(s), e.g. {_listing([Path(f).name for f in files])}"
                        for code, files in groups.items())
    return InputError(
        [files[0] for files in groups.values()],
        f"mix image orientations ({summary}). nnU-Net's SimpleITK reader ignores the direction cosines, so "
        "the network would train on flipped or transposed anatomy.",
        f"store every case in one orientation: `nnunetv2_dsm merge`, `recipe` and `example-dataset` write "
        f"{CANONICAL_ORIENTATION}; for an existing dataset reorient each file losslessly, e.g. "
        f"sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(f), '{CANONICAL_ORIENTATION}'), f), images and "
        "labels alike",
    )


def check_prediction_inputs(input_folder: PathLike, dataset_json: dict | PathLike, plans: Plans,
                            configuration: str, output_folder: PathLike | None = None,
                            progress: bool = True) -> list[list[str]]:
    """Check every case of a prediction input folder before any output is written.

    Returns nnU-Net's list of cases (one list of channel files per case, sorted by case and channel).
    Raises one InputError (an :class:`InputErrors` listing all when there are several) for unreadable or
    truncated images, wrong channel counts, NaN/Inf voxels, images that do not fit the configuration's
    dimensionality, channels on different grids, misnamed files, and, with ``output_folder``, an output
    folder that cannot be written or holds input files. ``plans`` is a plans dict, plans.json path or
    PlansManager; ``dataset_json`` a dict or a dataset.json path.
    """
    input_folder = Path(input_folder)
    if isinstance(dataset_json, dict):
        json_path = Path("dataset.json")
    else:
        json_path = Path(dataset_json)
        dataset_json, json_problems = _load_dataset_json(json_path)
        if dataset_json is None:
            raise json_problems[0] if len(json_problems) == 1 else InputErrors(json_problems)
    ending = dataset_json["file_ending"]
    if not input_folder.is_dir():
        raise InputError(input_folder, "is not an existing folder.", f"pass the folder holding <case>_0000{ending} files")
    cases, misnamed = group_case_files(input_folder, ending)
    misnamed = [m for m in misnamed if m.is_dir() or m.name.lower().endswith((ending, *_IMAGE_SUFFIXES))]
    problems = [_misnamed_error(misnamed, ending, label_folder=False)] if misnamed else []
    if not cases and not misnamed:
        raise InputError(input_folder, f"holds no images named <case>_0000{ending}.",
                         f"put the images to predict there in nnU-Net's naming, one file per channel ({ending})")
    n_channels = len(dataset_json["channel_names"])
    manager = _plans_manager(plans)
    for files in tqdm(cases.values(), desc="Checking inputs", unit="case", disable=not progress):
        problems += _check_case_images(files, n_channels, json_path, configuration, manager)[1]
    if output_folder is not None:
        try:
            check_output_writable(output_folder, [f for files in cases.values() for f in files])
        except InputError as e:
            problems.append(e)
    raise_input_errors(problems)
    return list(cases.values())


def resolve_raw_dataset(dataset_folder_or_id: str) -> Path:
    """A raw dataset folder from a path, a dataset ID (``"3"``) or a name (``"Dataset003_Liver"``)."""
    candidate = Path(dataset_folder_or_id)
    if candidate.is_dir():
        return candidate
    looks_like_path = os.sep in dataset_folder_or_id or candidate.exists()
    if looks_like_path:
        raise InputError(candidate, "is not an existing folder.", "pass an nnU-Net raw dataset folder or its ID")
    if not nnUNet_raw.is_set():
        raise InputError(
            dataset_folder_or_id, "is not a folder, and nnUNet_raw is not set, so it cannot be resolved as a "
            "dataset ID or name.", "export nnUNet_raw=/path/to/nnUNet_raw, or pass the dataset folder itself"
        )
    try:
        name = maybe_convert_to_dataset_name(dataset_folder_or_id)
    except (RuntimeError, ValueError) as e:
        raise InputError(
            dataset_folder_or_id, f"names no dataset under nnUNet_raw={nnUNet_raw.get()} "
            f"({str(e).splitlines()[0]}).",
            "pass an existing dataset ID or DatasetXXX_Name, or the dataset folder itself"
        ) from e
    folder = Path(nnUNet_raw.get()) / name
    if not folder.is_dir():
        raise InputError(folder, "does not exist (the dataset is known only from preprocessed or results folders).",
                         "put the raw dataset there, or pass its folder")
    return folder
