"""Folder-level checks: a raw dataset (``nnunetv2_dsm check``), source cases of merge/recipe, prediction inputs."""

import copy
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import SimpleITK as sitk
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
from tqdm import tqdm

from nnunetv2_dsm.checks._common import (
    _IMAGE_SUFFIXES,
    _MAX_LISTED,
    REQUIRED_DATASET_KEYS,
    PathLike,
    Plans,
    _listing,
)
from nnunetv2_dsm.checks.layout import (
    _is_2d_image,
    _misnamed_error,
    _plans_manager,
    check_channels,
    check_dimensionality,
    check_output_writable,
    check_scalar_image,
    group_case_files,
)
from nnunetv2_dsm.checks.reading import read_image_checked
from nnunetv2_dsm.checks.voxels import (
    allowed_label_ids,
    check_intensities,
    check_label_not_empty,
    check_label_values,
    check_same_geometry,
)
from nnunetv2_dsm.dataset import DSMDataset, DSMDatasetError
from nnunetv2_dsm.errors import InputError, InputErrors, raise_input_errors
from nnunetv2_dsm.io.orientation import CANONICAL as CANONICAL_ORIENTATION
from nnunetv2_dsm.io.orientation import image_orientation, mixed_orientations


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
                DSMDataset.from_json(dataset_json, str(path)).require_prompts()
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
