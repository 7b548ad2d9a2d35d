"""File layout checks: nnU-Net case naming, channel files, 2D/3D fit to a configuration, output folders."""

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import SimpleITK as sitk
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_dsm.checks._common import _CHANNEL_FILE, _CHANNEL_STEM, _MAX_LISTED, PathLike, Plans, _listing
from nnunetv2_dsm.errors import InputError


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
