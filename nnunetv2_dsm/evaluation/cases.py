"""Evaluation inputs: dataset labels, the case files of a predictions folder, and their checks."""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from nnunetv2_dsm.checks.inputs import (
    InputError,
    check_intensities,
    check_label_values,
    check_same_geometry,
    check_scalar_image,
    read_image_checked,
)
from nnunetv2_dsm.dataset import DSMDataset, DSMDatasetError
from nnunetv2_dsm.errors import DSMError

ANOMALY = "anomaly"
METRICS_JSON = "metrics.json"
PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_CSV = "metrics_summary.csv"
FORMAT = "nnunetv2_dsm.metrics/1"

# Score-map metrics, keyed by the score source they come from.
PROB_METRICS = ("auroc", "fpr95")
ANOMALY_METRICS = ("anomaly_auroc", "anomaly_fpr95")
METRIC_KEYS = ("dsc", *PROB_METRICS, *ANOMALY_METRICS)


class EvaluationError(DSMError, ValueError):
    """Bad evaluation input; the message names the file and the fix."""


# The evaluation's view of a dataset is the project's one dataset model.
DatasetLabels = DSMDataset


def load_dataset_labels(dataset_json: Mapping[str, Any], source: str = "dataset.json") -> DSMDataset:
    """Parse labels, regions, prompts, ignore label and DSM class availability (``DSMDataset``)."""
    try:
        return DSMDataset.from_json(dataset_json, source)
    except DSMDatasetError as err:
        raise EvaluationError(str(err)) from err


def _read_image(path: Path, what: str) -> sitk.Image:
    """Read with the input checks' reader, which also finds truncated and empty files."""
    if not path.is_file():
        raise EvaluationError(f"{what} {path} not found")
    try:
        return read_image_checked(path)
    except InputError as err:
        raise EvaluationError(f"{what} {err}") from err


def _check_labels(image: sitk.Image, path: Path, labels: "DatasetLabels", what: str) -> None:
    """Label maps hold only declared ids (background, the classes' ids, the ignore label), as integers."""
    allowed = {0, *(i for ids in labels.classes.values() for i in ids)}
    if labels.ignore_label is not None:
        allowed.add(labels.ignore_label)
    try:
        check_label_values(image, path, allowed, "dataset.json")
    except InputError as err:
        raise EvaluationError(f"{what} {err}") from err


def _check_scores(image: sitk.Image, path: Path) -> None:
    try:
        check_intensities(image, path)
    except InputError as err:
        raise EvaluationError(f"score map {err}") from err


def _check_geometry(image: sitk.Image, path: Path, reference: sitk.Image, ref_path: Path) -> None:
    """The input checks' grid comparison (size, spacing, origin, direction), as an evaluation error."""
    try:
        check_scalar_image(image, path)
        check_same_geometry(image, path, reference, ref_path)
    except InputError as err:
        raise EvaluationError(
            f"{path} does not match the geometry of reference {ref_path}: {err.problem} Predictions and score "
            "maps must be written in the reference image's geometry (nnUNetv2_predict does this)."
        ) from err


@dataclass(frozen=True)
class CaseFiles:
    """Prediction-side files of one case; score maps are keyed by class name or ``anomaly``."""

    label_map: Path
    score_maps: dict[str, Path]
    npz: Path | None


def discover_cases(
    predictions: Path,
    references: Path,
    labels: DatasetLabels,
    chill: bool = False,
    scores: Path | None = None,
) -> dict[str, CaseFiles]:
    """Map case id -> prediction files; every file with the dataset's ending must be accounted for.

    Score maps are looked up in ``scores`` when given (a separate folder keeps the predictions
    folder readable by nnU-Net's own evaluation, which takes every image file for a label map),
    else next to the label maps. Without ``chill`` every reference case needs a predicted label
    map (nnU-Net's rule); with it only predicted cases are evaluated, as for one fold.
    """
    ending = labels.file_ending
    if not predictions.is_dir():
        raise EvaluationError(f"predictions folder {predictions} not found")
    if scores is not None and not scores.is_dir():
        raise EvaluationError(f"score maps folder {scores} not found")
    if not references.is_dir():
        raise EvaluationError(f"reference folder {references} not found")
    ref_cases = sorted(p.name[: -len(ending)] for p in references.iterdir() if p.name.endswith(ending))
    if not ref_cases:
        raise EvaluationError(f"reference folder {references} holds no *{ending} label maps")
    ref_set = set(ref_cases)
    suffixes = {f"_{name}": name for name in labels.classes} | {f"_{ANOMALY}": ANOMALY}

    label_maps: dict[str, Path] = {}
    score_maps: dict[str, dict[str, Path]] = {}
    candidates = sorted(predictions.iterdir())
    if scores is not None and scores.resolve() != predictions.resolve():
        candidates += sorted(scores.iterdir())
    for path in candidates:
        if not path.name.endswith(ending):
            continue
        stem = path.name[: -len(ending)]
        if stem in ref_set:
            if path.parent != predictions:
                raise EvaluationError(
                    f"{path} is named like a label map but lies in the score maps folder; move it to {predictions}"
                )
            label_maps[stem] = path
            continue
        owner = next(
            (
                (stem[: -len(s)], key)
                for s, key in suffixes.items()
                if stem.endswith(s) and stem[: -len(s)] in ref_set
            ),
            None,
        )
        if owner is None:
            raise EvaluationError(
                f"{path} has no reference {references / path.name} and is not a score map "
                f"named <case>_<class>{ending} or <case>_{ANOMALY}{ending} for a reference case; "
                "remove it or add its reference label map"
            )
        score_maps.setdefault(owner[0], {})[owner[1]] = path

    orphans = sorted(set(score_maps) - set(label_maps))
    if orphans:
        raise EvaluationError(
            f"score maps found for case(s) {orphans} in {predictions} without their label map "
            f"<case>{ending}; write the predicted label maps too"
        )
    if not label_maps:
        raise EvaluationError(
            f"predictions folder {predictions} holds no label map matching a case of {references}"
        )
    missing = [c for c in ref_cases if c not in label_maps]
    if missing and not chill:
        raise EvaluationError(
            f"{len(missing)} reference case(s) have no prediction in {predictions}, e.g. "
            f"{predictions / (missing[0] + ending)}; predict them or pass --chill to evaluate only predicted cases"
        )
    cases = {}
    for case, path in label_maps.items():
        npz = predictions / f"{case}.npz"
        cases[case] = CaseFiles(path, score_maps.get(case, {}), npz if npz.is_file() else None)
    return cases


def _npz_channels(dataset_json: Mapping[str, Any], labels: DatasetLabels) -> dict[str, int]:
    """Class name -> channel of nnU-Net's saved probabilities, following nnU-Net's own label manager."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    if manager.has_regions:
        order = [tuple(r) if isinstance(r, list | tuple) else (r,) for r in manager.all_regions]
        return {name: order.index(ids) for name, ids in labels.classes.items()}
    return {name: ids[0] for name, ids in labels.classes.items()}
