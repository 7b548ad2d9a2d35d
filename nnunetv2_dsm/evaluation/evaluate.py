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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_dsm.evaluation.cases import (  # noqa: F401 - re-exported
    ANOMALY,
    ANOMALY_METRICS,
    FORMAT,
    METRIC_KEYS,
    METRICS_JSON,
    PER_CASE_CSV,
    PROB_METRICS,
    SUMMARY_CSV,
    CaseFiles,
    DatasetLabels,
    EvaluationError,
    _check_geometry,
    _check_labels,
    _check_scores,
    _npz_channels,
    _read_image,
    discover_cases,
    load_dataset_labels,
)
from nnunetv2_dsm.evaluation.metrics import (
    ROI_NOT_ANNOTATED,
    Metric,
    body_mask,
    dice,
    roc_metrics,
)
from nnunetv2_dsm.evaluation.roi import ROI_DESCRIPTIONS, ROI_MODES
from nnunetv2_dsm.io import atomic as atomic_io


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
        parents = ctx.labels.parent_organs(name)
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

    anomaly_targets = [n for n in labels.classes if labels.is_tumour(n)]
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
