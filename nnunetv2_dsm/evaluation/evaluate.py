"""Evaluate a predictions folder against reference labels: DSC per class, AUROC and FPR95 from score maps.

Inputs follow nnU-Net: label maps ``<case><file_ending>`` in the predictions folder and the
reference folder, ``dataset.json`` for labels (regions allowed: class c's mask is
``isin(label_map, ids_c)``), DSM's per-case class availability, and optionally the images folder
(``<case>_0000<file_ending>``) for the body region of interest. Score maps are optional:
``<case>_<class><file_ending>`` (class probability), ``<case>_anomaly<file_ending>`` (anomaly map,
evaluated against every class that is not an organ) or nnU-Net's ``<case>.npz`` written by
``--save_probabilities``; a per-class file wins over the npz channel.
"""

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_dsm.checks.inputs import InputError, check_intensities, check_label_values, read_image_checked
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.evaluation.metrics import (
    ROI_NOT_ANNOTATED,
    Metric,
    body_mask,
    dice,
    roc_metrics,
)
from nnunetv2_dsm.evaluation.roi import ROI_DESCRIPTIONS, ROI_MODES
from nnunetv2_dsm.io import atomic as atomic_io
from nnunetv2_dsm.vocabulary import ORGANS, TUMOUR_PARENTS

ANOMALY = "anomaly"
METRICS_JSON = "metrics.json"
PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_CSV = "metrics_summary.csv"
FORMAT = "nnunetv2_dsm.metrics/1"

# Score-map metrics, keyed by the score source they come from.
PROB_METRICS = ("auroc", "fpr95")
ANOMALY_METRICS = ("anomaly_auroc", "anomaly_fpr95")
METRIC_KEYS = ("dsc", *PROB_METRICS, *ANOMALY_METRICS)

# Geometry tolerances: resampled outputs differ from their references by float rounding only.
_SPACING_ATOL = 1e-3
_ORIGIN_ATOL = 1e-3
_DIRECTION_ATOL = 1e-4


class EvaluationError(DSMError, ValueError):
    """Bad evaluation input; the message names the file and the fix."""


@dataclass(frozen=True)
class DatasetLabels:
    """Classes of a dataset.json: name -> label ids whose union is the class mask."""

    classes: dict[str, tuple[int, ...]]
    file_ending: str
    ignore_label: int | None
    availability: dict[str, frozenset[str]] = field(default_factory=dict)

    def available(self, case: str) -> frozenset[str]:
        """Classes annotated in ``case``; a case missing from the table annotates every class."""
        return self.availability.get(case, frozenset(self.classes))


def load_dataset_labels(dataset_json: Mapping[str, Any], source: str = "dataset.json") -> DatasetLabels:
    """Parse labels, regions, ignore label and DSM class availability from a dataset.json dict."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise EvaluationError(f"{source}: 'labels' must map label names to ids, got {labels!r}")
    classes: dict[str, tuple[int, ...]] = {}
    ignore_label = None
    for name, value in labels.items():
        if name == "ignore":
            ignore_label = int(value)
            continue
        ids = tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)
        if name == "background" or ids == (0,):
            continue
        classes[name] = ids
    if not classes:
        raise EvaluationError(f"{source}: 'labels' has no foreground class")

    table = dataset_json.get("dsm", {}).get("class_availability", {})
    if not isinstance(table, Mapping):
        raise EvaluationError(
            f"{source}: ['dsm']['class_availability'] must map case ids to lists of label names"
        )
    availability = {}
    for case, names in table.items():
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise EvaluationError(
                f"{source}: ['dsm']['class_availability'][{case!r}] must be a list of label names, got {names!r}"
            )
        unknown = sorted(set(names) - set(classes) - {"background"})
        if unknown:
            raise EvaluationError(
                f"{source}: ['dsm']['class_availability'][{case!r}] names unknown classes {unknown}; "
                f"use only these label names: {list(classes)}"
            )
        availability[case] = frozenset(n for n in names if n in classes)
    return DatasetLabels(classes, dataset_json.get("file_ending", ".nii.gz"), ignore_label, availability)


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
    problems = []
    if image.GetSize() != reference.GetSize():
        problems.append(f"size {image.GetSize()} vs {reference.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        problems.append(f"{image.GetNumberOfComponentsPerPixel()} components per voxel instead of 1")
    if not np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=_SPACING_ATOL, rtol=0):
        problems.append(f"spacing {image.GetSpacing()} vs {reference.GetSpacing()}")
    if not np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=_ORIGIN_ATOL, rtol=0):
        problems.append(f"origin {image.GetOrigin()} vs {reference.GetOrigin()}")
    if not np.allclose(image.GetDirection(), reference.GetDirection(), atol=_DIRECTION_ATOL, rtol=0):
        problems.append(f"direction {image.GetDirection()} vs {reference.GetDirection()}")
    if problems:
        raise EvaluationError(
            f"{path} does not match the geometry of reference {ref_path}: {'; '.join(problems)}. "
            "Predictions and score maps must be written in the reference image's geometry "
            "(nnUNetv2_predict does this)."
        )


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


@dataclass
class _Case:
    """Arrays of one case, with masks and ROIs built on first use."""

    case: str
    ref_path: Path
    ref_image: sitk.Image
    ref: np.ndarray
    labels: DatasetLabels
    image_path: Path | None
    _masks: dict[str, np.ndarray] = field(default_factory=dict)
    _body: np.ndarray | None = None

    @property
    def ignore(self) -> np.ndarray | None:
        if self.labels.ignore_label is None:
            return None
        return self.ref == self.labels.ignore_label

    def mask(self, name: str) -> np.ndarray:
        if name not in self._masks:
            self._masks[name] = np.isin(self.ref, self.labels.classes[name])
        return self._masks[name]

    def body(self) -> np.ndarray:
        if self._body is None:
            ct_image = _read_image(self.image_path, "image")
            _check_geometry(ct_image, self.image_path, self.ref_image, self.ref_path)
            self._body = body_mask(sitk.GetArrayFromImage(ct_image))
        return self._body


def _roi(ctx: _Case, name: str, mode: str) -> tuple[np.ndarray | None, str, bool]:
    """(mask, label, annotated) of the ROI for class ``name``; mask None means every voxel."""
    if mode == "parent":
        parents = [p for p in TUMOUR_PARENTS.get(name, ()) if p in ctx.labels.classes]
        if parents:
            label = f"parent({'+'.join(parents)})"
            if not set(parents) <= ctx.labels.available(ctx.case):
                return None, label, False
            roi = np.logical_or.reduce([ctx.mask(p) for p in parents])
            return roi, label, True
        mode = "body" if ctx.image_path is not None else "image"
    if mode == "body":
        return ctx.body(), "body", True
    return None, "image", True


def _with_ignore(roi: np.ndarray | None, ignore: np.ndarray | None) -> np.ndarray | None:
    if ignore is None:
        return roi
    return ~ignore if roi is None else roi & ~ignore


def _put(entry: dict[str, Any], key: str, metric: Metric) -> None:
    entry[key] = None if math.isnan(metric.value) else metric.value
    entry[f"{key}_note"] = metric.note


def evaluate_case(
    case: str,
    files: CaseFiles,
    ref_path: Path,
    labels: DatasetLabels,
    roi_mode: str = "body",
    image_path: Path | None = None,
    npz_channels: Callable[[], dict[str, int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics of one case: class name -> {available, n_ref, n_pred, dsc, roi, auroc, fpr95, ...}.

    Each metric ``m`` comes with ``m_note`` (why it is None); AUROC and FPR95 keys appear only
    for classes with a score map, together with ``roi`` and ``score_file``.
    """
    if roi_mode not in ROI_MODES:
        raise EvaluationError(f"unknown ROI {roi_mode!r}; choose one of {ROI_MODES}")
    ref_image = _read_image(ref_path, "reference label map")
    pred_image = _read_image(files.label_map, "predicted label map")
    _check_geometry(pred_image, files.label_map, ref_image, ref_path)
    _check_labels(ref_image, ref_path, labels, "reference label map")
    _check_labels(pred_image, files.label_map, labels, "predicted label map")
    ctx = _Case(case, ref_path, ref_image, sitk.GetArrayFromImage(ref_image), labels, image_path)
    pred = sitk.GetArrayFromImage(pred_image)
    ignore = ctx.ignore
    available = labels.available(case)

    results: dict[str, dict[str, Any]] = {}
    for name, ids in labels.classes.items():
        pred_mask = np.isin(pred, ids)
        entry: dict[str, Any] = {
            "available": name in available,
            "n_ref": int(np.count_nonzero(ctx.mask(name))),
            "n_pred": int(np.count_nonzero(pred_mask)),
        }
        _put(entry, "dsc", dice(ctx.mask(name), pred_mask, name in available, ignore))
        results[name] = entry

    scores: dict[str, tuple[np.ndarray, str]] = {}
    for name, path in files.score_maps.items():
        score_image = _read_image(path, "score map")
        _check_geometry(score_image, path, ref_image, ref_path)
        _check_scores(score_image, path)
        scores[name] = (sitk.GetArrayFromImage(score_image).astype(np.float32, copy=False), path.name)
    if files.npz is not None and npz_channels is not None:
        probabilities = np.load(files.npz)["probabilities"]
        if not np.isfinite(probabilities).all():
            raise EvaluationError(f"{files.npz}: 'probabilities' holds NaN or infinite values; predict the case again")
        channels = npz_channels()
        if probabilities.shape[1:] != ctx.ref.shape or probabilities.shape[0] <= max(channels.values()):
            raise EvaluationError(
                f"{files.npz}: probabilities of shape {probabilities.shape} do not fit reference {ref_path} "
                f"(shape {ctx.ref.shape}) and {len(channels)} classes; was it written for this dataset?"
            )
        for name, channel in channels.items():
            if name not in scores:
                scores[name] = (probabilities[channel], f"{files.npz.name}[{channel}]")
    if roi_mode == "body" and scores and image_path is None:
        raise EvaluationError(
            f"score maps for case {case} are evaluated inside the body, which needs the CT: pass the images "
            "folder (-i imagesTr) or choose another region of interest (--roi image or --roi parent)"
        )

    anomaly_targets = [n for n in labels.classes if n not in ORGANS]
    for name in labels.classes:
        sources = []
        if name in scores:
            sources.append((PROB_METRICS, "score_file", *scores[name]))
        if ANOMALY in scores and name in anomaly_targets:
            sources.append((ANOMALY_METRICS, "anomaly_score_file", *scores[ANOMALY]))
        if not sources:
            continue
        roi, roi_label, roi_annotated = _roi(ctx, name, roi_mode)
        entry = results[name]
        entry["roi"] = roi_label
        for keys, file_key, score, score_file in sources:
            entry[file_key] = score_file
            if not roi_annotated and name in available:
                pair = (Metric.undefined(ROI_NOT_ANNOTATED),) * 2
            else:
                pair = roc_metrics(ctx.mask(name), score, _with_ignore(roi, ignore), name in available)
            for key, metric in zip(keys, pair):
                _put(entry, key, metric)
    return results


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarize(per_case: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Per class and metric: mean, std (population) and n over defined values, plus undefined counts.

    ``foreground_mean`` averages the per-class means, as nnU-Net's summary.json does.
    """
    classes: dict[str, dict[str, Any]] = {}
    for case_metrics in per_case.values():
        for name, entry in case_metrics.items():
            per_class = classes.setdefault(name, {})
            for key in METRIC_KEYS:
                if f"{key}_note" not in entry:
                    continue
                slot = per_class.setdefault(key, {"values": [], "undefined": {}, "roi": set()})
                if entry[key] is None:
                    note = entry[f"{key}_note"]
                    slot["undefined"][note] = slot["undefined"].get(note, 0) + 1
                else:
                    slot["values"].append(entry[key])
                if "roi" in entry and key != "dsc":
                    slot["roi"].add(entry["roi"])
    summary: dict[str, Any] = {}
    for name, per_class in classes.items():
        summary[name] = {}
        for key in METRIC_KEYS:
            if key not in per_class:
                continue
            slot = per_class[key]
            stats = _stats(slot["values"]) | {"undefined": dict(sorted(slot["undefined"].items()))}
            if key != "dsc":
                stats["roi"] = sorted(slot["roi"])
            summary[name][key] = stats
    foreground: dict[str, Any] = {}
    for key in METRIC_KEYS:
        means = [s[key]["mean"] for s in summary.values() if key in s and s[key]["mean"] is not None]
        if means:
            foreground[key] = _stats(means) | {"n_classes": len(means)}
    return {"per_class": summary, "foreground_mean": foreground}


_CSV_CASE_HEADER = (
    "case",
    "class",
    "available",
    "n_ref",
    "n_pred",
    "roi",
    *[col for key in METRIC_KEYS for col in (key, f"{key}_note")],
)


def _blank(value: Any) -> Any:
    return "" if value is None else value


def write_reports(result: Mapping[str, Any], output_dir: Path) -> dict[str, Path]:
    """Write metrics.json, metrics_per_case.csv and metrics_summary.csv atomically; return their paths."""
    paths = {
        "json": output_dir / METRICS_JSON,
        "per_case_csv": output_dir / PER_CASE_CSV,
        "summary_csv": output_dir / SUMMARY_CSV,
    }
    default_roi = result["roi"]["mode"]
    rows = []
    for case, case_metrics in result["per_case"].items():
        for name, entry in case_metrics.items():
            row = [case, name, entry["available"], entry["n_ref"], entry["n_pred"], entry.get("roi", "")]
            for key in METRIC_KEYS:
                row += [_blank(entry.get(key)), _blank(entry.get(f"{key}_note"))]
            rows.append(row)
    summary_rows = []
    for name, per_class in result["summary"]["per_class"].items():
        for key, stats in per_class.items():
            undefined = ";".join(f"{note}={count}" for note, count in stats["undefined"].items())
            roi = "+".join(stats.get("roi", [])) or ("" if key == "dsc" else default_roi)
            summary_rows.append(
                [name, key, _blank(stats["mean"]), _blank(stats["std"]), stats["n"], undefined, roi]
            )
    for key, stats in result["summary"]["foreground_mean"].items():
        summary_rows.append(
            ["foreground_mean", key, _blank(stats["mean"]), _blank(stats["std"]), stats["n"], "", ""]
        )
    atomic_io.write_json(paths["json"], result)
    atomic_io.write_csv(paths["per_case_csv"], _CSV_CASE_HEADER, rows)
    atomic_io.write_csv(
        paths["summary_csv"], ("class", "metric", "mean", "std", "n", "undefined", "roi"), summary_rows
    )
    return paths


def evaluate_folder(
    predictions: str | os.PathLike,
    references: str | os.PathLike,
    dataset_json: str | os.PathLike,
    images: str | os.PathLike | None = None,
    roi: str = "body",
    output_dir: str | os.PathLike | None = None,
    chill: bool = False,
    progress: bool = True,
    scores: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate every predicted case and write the reports into ``output_dir`` (default: predictions).

    Returns the content of metrics.json: ``per_case`` (case -> class -> metrics), ``summary``
    (per class mean/std/n and foreground mean) and ``roi`` (the region of interest used).
    """
    predictions, references = Path(predictions), Path(references)
    dataset_json = Path(dataset_json)
    if roi not in ROI_MODES:
        raise EvaluationError(f"unknown ROI {roi!r}; choose one of {ROI_MODES}")
    if not dataset_json.is_file():
        raise EvaluationError(f"dataset.json {dataset_json} not found")
    try:
        dataset = json.loads(dataset_json.read_text())
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{dataset_json} is not valid JSON: {err}") from err
    labels = load_dataset_labels(dataset, str(dataset_json))
    images_dir = Path(images) if images is not None else None
    if images_dir is not None and not images_dir.is_dir():
        raise EvaluationError(f"images folder {images_dir} not found")
    scores_dir = Path(scores) if scores is not None else None
    cases = discover_cases(predictions, references, labels, chill, scores_dir)

    channels: dict[str, int] | None = None

    def npz_channels() -> dict[str, int]:
        nonlocal channels
        if channels is None:
            channels = _npz_channels(dataset, labels)
        return channels

    per_case = {}
    for case, files in tqdm(cases.items(), desc="evaluate", unit="case", disable=not progress):
        image_path = images_dir / f"{case}_0000{labels.file_ending}" if images_dir is not None else None
        per_case[case] = evaluate_case(
            case, files, references / f"{case}{labels.file_ending}", labels, roi, image_path, npz_channels
        )
    result = {
        "format": FORMAT,
        "roi": {
            "mode": roi,
            "description": ROI_DESCRIPTIONS[roi],
            "images": str(images_dir) if images_dir else None,
        },
        "predictions": str(predictions),
        "scores": str(scores_dir or predictions),
        "references": str(references),
        "dataset_json": str(dataset_json),
        "classes": {name: list(ids) for name, ids in labels.classes.items()},
        "per_case": per_case,
        "summary": summarize(per_case),
    }
    write_reports(result, Path(output_dir) if output_dir is not None else predictions)
    return result
