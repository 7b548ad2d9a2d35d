"""Image orientation: one canonical orientation for DSM datasets, and the way back for predictions.

nnU-Net's default reader (``SimpleITKIO``) trains on the voxel array as stored and ignores the
direction cosines, so cases stored in different orientations (DICOM-converted LPS next to NIfTI RAS,
say) train on flipped anatomy. DSM datasets therefore store every case in :data:`CANONICAL`
orientation, RAS (NIfTI's canonical orientation, the one nibabel's ``as_closest_canonical`` and
TotalSegmentator produce): direction diag(-1, -1, 1) in SimpleITK's LPS physical space.

Reorientation is ``sitk.DICOMOrient``: a permutation and flip of the voxel axes with the origin and
direction updated, so the physical position of every voxel is unchanged, and no value is
interpolated (label maps stay exact). Orientation codes follow ITK/DICOM: the letters name the
direction each voxel axis (i, j, k) points *to* in patient space ("LPS": identity direction).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.errors import WriteError
from nnunetv2_dsm.io.atomic import atomic_path

CANONICAL = "RAS"
# Key in dataset.json["dsm"] and in DSM plans naming the orientation the model trains in.
ORIENTATION_KEY = "orientation"


def orientation_code(direction: Sequence[float]) -> str:
    """ITK orientation code ("LPS", "RAS", ...) of the closest axis-aligned orientation of a direction."""
    d = np.asarray(direction, dtype=float)
    dim = int(round(np.sqrt(d.size)))
    if dim == 2:
        # A 2d image: the code of its in-plane axes, as for a 3d image with an identity third axis.
        d = np.array([[d[0], d[1], 0], [d[2], d[3], 0], [0, 0, 1]], dtype=float).ravel()
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(d.tolist())[:dim]


def image_orientation(image: sitk.Image) -> str:
    return orientation_code(image.GetDirection())


def file_orientation(path: str | Path) -> str:
    """Orientation code from the header alone (the voxels are not read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return orientation_code(reader.GetDirection())


def reorient(image: sitk.Image, code: str = CANONICAL) -> sitk.Image:
    """The same image stored in orientation ``code``: voxel axes permuted and flipped, nothing resampled.

    2d images and images already in ``code`` are returned unchanged (the same object).
    """
    if image.GetDimension() != 3 or image_orientation(image) == code:
        return image
    return sitk.DICOMOrient(image, code)


def restore_geometry(image: sitk.Image, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
                     direction: Sequence[float]) -> sitk.Image:
    """``image``, on the grid (size, spacing, origin, direction) but stored in another orientation,
    stored exactly on that grid.

    Permutes/flips back to the grid's orientation and sets its header, so size, spacing, origin and
    direction match bit for bit (reorientation alone can round the origin); voxel values are moved,
    never interpolated.
    """
    if image.GetDimension() == 3:
        image = sitk.DICOMOrient(image, orientation_code(direction))
    if tuple(image.GetSize()) != tuple(size):
        raise ValueError(f"cannot map an image of size {image.GetSize()} back onto a grid of size {tuple(size)}")
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(direction))
    return image


def reorient_files(files: Sequence[str | Path], code: str, folder: str | Path) -> tuple[list[Path], dict] | None:
    """Channel files of one case written to ``folder`` in orientation ``code``.

    Returns the new paths and the original grid (``size``, ``spacing``, ``origin``, ``direction`` of
    the first file, for :func:`restore_geometry`), or None when the files already are in ``code``.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(files[0]))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3 or orientation_code(reader.GetDirection()) == code:
        return None
    grid = {"size": reader.GetSize(), "spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
            "direction": reader.GetDirection()}
    out = []
    for f in files:
        target = Path(folder) / Path(f).name
        image = reorient(sitk.ReadImage(str(f)), code)
        try:
            with atomic_path(target, check=lambda tmp: sitk.ReadImage(str(tmp))) as tmp:
                sitk.WriteImage(image, str(tmp))
        except RuntimeError as err:
            raise WriteError(target, str(err).strip().splitlines()[-1] if str(err).strip() else "SimpleITK failed") from err
        out.append(target)
    return out, grid


def mixed_orientations(orientations: Mapping[str, str]) -> dict[str, list[str]] | None:
    """``{code: [cases]}`` when ``orientations`` (case -> code) holds more than one code, else None."""
    groups: dict[str, list[str]] = {}
    for case, code in sorted(orientations.items()):
        groups.setdefault(code, []).append(case)
    return groups if len(groups) > 1 else None
