"""Reading images completely: truncated gzip streams, DICOM series with missing slices, unreadable files."""

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel
import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.checks._common import _MAX_LISTED, REEXPORT, PathLike, _listing, _sitk_reason
from nnunetv2_dsm.errors import InputError


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
