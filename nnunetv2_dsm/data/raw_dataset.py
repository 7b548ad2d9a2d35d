"""Writing nnU-Net v2 raw datasets in the DSM conventions.

Layout: ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz`` (and ``imagesTs``/``labelsTs``),
``dataset.json`` with canonical class names. Organs contain their tumours, so when a tumour class
is present its parent organs are nnU-Net regions: ``"liver": [liver_id, liver_tumor_id]``.

A tumour with several possible parent organs (``kidney_tumor`` in ``kidney_right`` or
``kidney_left``) keeps ONE label id, and the region of every parent organ present includes it.
Label maps cannot say which kidney a tumour voxel lies in once both share an id, so a tumour voxel
counts towards each parent region present in the dataset; which organ the tumour really belongs to
is only known in the source (e.g. a recipe that split kidneys by side). Single-parent tumours
(liver, pancreas, spleen, ...) are exact.

Per-case class availability (partial labels) is ``dataset.json["dsm"]["class_availability"]``;
source prefixes of case ids are ``dataset.json["dsm"]["sources"]``.

Nothing is half-written: datasets are assembled in a staging folder next to the target and moved
into place with ``os.replace``; ``dataset.json`` is written to a temporary file and renamed.
"""

import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_dsm.errors import DSMError, InputError, WriteError
from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.io.orientation import CANONICAL as CANONICAL_ORIENTATION
from nnunetv2_dsm.io.orientation import ORIENTATION_KEY, orientation_code, reorient
from nnunetv2_dsm.vocabulary import ORGANS, TUMOUR_PARENTS, TUMOURS, check_canonical

FILE_ENDING = ".nii.gz"


def ordered_classes(names: Iterable[str], source: str = "class list") -> list[str]:
    """Canonical names, organs first in vocabulary order, then tumours in vocabulary order."""
    unique = set(names)
    check_canonical(sorted(unique), source)
    return [n for n in ORGANS if n in unique] + [n for n in TUMOURS if n in unique]


def assign_ids(names: Iterable[str], source: str = "class list") -> dict[str, int]:
    """Consecutive label ids 1..n in :func:`ordered_classes` order."""
    return {n: i + 1 for i, n in enumerate(ordered_classes(names, source))}


def labels_and_regions(class_ids: Mapping[str, int]) -> tuple[dict, list[int] | None]:
    """nnU-Net ``labels`` dict (region syntax where an organ contains a present tumour) and
    ``regions_class_order`` (None without regions)."""
    labels: dict = {"background": 0}
    for name, idx in sorted(class_ids.items(), key=lambda kv: kv[1]):
        contained = sorted(
            class_ids[t] for t, parents in TUMOUR_PARENTS.items() if name in parents and t in class_ids
        )
        labels[name] = [idx, *contained] if contained else idx
    if not any(isinstance(v, list) for v in labels.values()):
        return labels, None
    return labels, [class_ids[n] for n in labels if n != "background"]


def dsm_dataset_json(
    class_ids: Mapping[str, int],
    num_training: int,
    class_availability: Mapping[str, Sequence[str]],
    sources: Mapping[str, str],
    name: str,
    description: str = "",
    extra_dsm: Mapping | None = None,
) -> dict:
    """A complete ``dataset.json`` in the DSM conventions for a single-channel CT dataset."""
    labels, order = labels_and_regions(class_ids)
    out: dict = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": description,
    }
    if order is not None:
        out["regions_class_order"] = order
    out["dsm"] = {
        "class_availability": {k: list(v) for k, v in class_availability.items()},
        "sources": dict(sources),
        ORIENTATION_KEY: CANONICAL_ORIENTATION,
        **(dict(extra_dsm) if extra_dsm else {}),
    }
    return out


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    atomic.write_json(path, obj, strict=False)


class UndeclaredLabelError(InputError):
    """A source label map holds values its dataset does not declare."""


class OutputOverlapsInputError(DSMError, ValueError):
    """An output folder equal to, inside, or a parent of an input."""


def check_output_apart(final: Path, inputs: Iterable[Path]) -> None:
    """``final`` may not be an input, lie inside one, or contain one: writing (or ``--overwrite``
    replacing) it would destroy the data being read."""
    final = Path(final).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if final == source or final in source.parents or source in final.parents:
            relation = ("is" if final == source else "contains" if final in source.parents else "lies inside")
            raise OutputOverlapsInputError(
                f"output folder {final} {relation} the input {source}; writing it would overwrite or remove the "
                "input. Choose an output folder outside every input (e.g. a new $nnUNet_raw/DatasetXXX_Name)."
            )


@contextmanager
def staged_dataset(final: Path, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; on success it replaces ``final``.

    On any error the staging folder is removed and ``final`` is left untouched. ``final`` may not
    overlap any of ``inputs`` (``check_output_apart``), with or without ``overwrite``.
    """
    check_output_apart(final, inputs)
    with atomic.staged_folder(final, existing="replace" if overwrite else "refuse") as staging:
        for sub in ("imagesTr", "labelsTr"):
            (staging / sub).mkdir()
        yield staging


def nnunet_raw_folder(dataset_id: int, name: str) -> Path:
    """``$nnUNet_raw/DatasetXXX_Name``."""
    root = os.environ.get("nnUNet_raw")
    if not root:
        raise RuntimeError(
            "nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw or give an explicit output folder."
        )
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    return Path(root) / f"Dataset{dataset_id:03d}_{name}"


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a NIfTI file in SimpleITK (LPS, x-y-z) convention."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of_image(cls, image: sitk.Image) -> "Geometry":
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @classmethod
    def of_file(cls, path: Path) -> "Geometry":
        """Header only; the voxels are not read."""
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise RuntimeError(f"Cannot read image header of {path}: {e}") from e
        return cls(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())

    @property
    def orientation(self) -> str:
        """ITK orientation code of the grid ("RAS", "LPS", ...)."""
        return orientation_code(self.direction)

    @property
    def array_spacing(self) -> tuple[float, ...]:
        """Spacing in numpy array axis order (z, y, x)."""
        return tuple(reversed(self.spacing))

    @property
    def array_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.size))

    def physical_points(self, array_index: np.ndarray) -> np.ndarray:
        """(N, 3) continuous array indices (z, y, x) -> (N, 3) LPS physical points (x, y, z) in mm."""
        ijk = np.asarray(array_index, dtype=float)[:, ::-1]
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ d.T

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def read_array(path: Path) -> tuple[np.ndarray, Geometry]:
    """Voxel array in (z, y, x) order and its geometry."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise RuntimeError(f"Cannot read image {path}: {e}") from e
    return sitk.GetArrayFromImage(image), Geometry.of_image(image)


def write_image(image: sitk.Image, path: Path) -> None:
    """Write ``image`` in the canonical orientation (compressed NIfTI when the name ends in .nii.gz).

    Every image and label a DSM dataset writer produces goes through here, so all cases of a
    dataset share one orientation (:mod:`nnunetv2_dsm.io.orientation`); reorientation permutes and
    flips voxel axes only, so label values are preserved exactly. The file is read back before it
    takes its name (SimpleITK can return without error from a short write on a full disk).
    """
    try:
        with atomic.atomic_path(path, check=lambda tmp: sitk.ReadImage(str(tmp))) as tmp:
            sitk.WriteImage(reorient(image, CANONICAL_ORIENTATION), str(tmp), useCompression=True)
    except RuntimeError as err:
        raise WriteError(path, str(err).strip().splitlines()[-1] if str(err).strip() else "SimpleITK failed") from err


def write_array(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a (z, y, x) array with ``geometry``, stored in the canonical orientation."""
    if tuple(array.shape) != geometry.array_shape:
        raise ValueError(f"{path}: array shape {array.shape} does not match the image grid {geometry.array_shape}")
    write_image(geometry.apply(sitk.GetImageFromArray(array)), path)


def label_dtype(max_id: int) -> type:
    return np.uint8 if max_id < 256 else np.uint16


def remap_labels(array: np.ndarray, lut: np.ndarray, where: str) -> np.ndarray:
    """Apply the lookup table ``lut`` (source value -> output id, -1: undeclared) to a label map;
    undeclared values are an error naming ``where``."""
    bad = [v.item() for v in np.unique(array)
           if not float(v).is_integer() or v < 0 or v >= len(lut) or lut[int(v)] < 0]
    if bad:
        declared = [i for i in range(len(lut)) if lut[i] >= 0]
        raise UndeclaredLabelError(where, f"has voxel values {bad} that are not declared labels (declared: {declared}).",
                                   "relabel the file, or declare the values in the source's dataset.json or rename table")
    return lut[array.astype(np.int64)].astype(label_dtype(int(lut.max())))


def case_paths(root: Path, case_id: str, split: str = "Tr") -> tuple[Path, Path]:
    """(image, label) destination paths of a single-channel case in split ``Tr`` or ``Ts``."""
    return root / f"images{split}" / f"{case_id}_0000{FILE_ENDING}", root / f"labels{split}" / f"{case_id}{FILE_ENDING}"


def copy_image(src: Path, dst: Path) -> None:
    """Copy a compressed NIfTI in the canonical orientation byte for byte; reorient or re-encode
    anything else (another orientation, ``.nii``) with SimpleITK."""
    if str(src).endswith(FILE_ENDING) and Geometry.of_file(src).orientation == CANONICAL_ORIENTATION:
        shutil.copyfile(src, dst)
    else:
        try:
            write_image(sitk.ReadImage(str(src)), dst)
        except RuntimeError as e:
            raise RuntimeError(f"Cannot convert image {src} to {dst}: {e}") from e
