"""Partial-label masking of nnU-Net's validation ``summary.json``.

nnU-Net scores every region of every case; for a class that a case does not annotate that score
is meaningless (usually a Dice of 0 against an empty reference). Those entries become nan and the
means are recomputed over the annotated (case, class) pairs only.
"""

import os
from pathlib import Path

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import load_summary_json, save_summary_json

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.io.atomic import atomic_path

NAN_METRICS = ("Dice", "IoU")


def mask_unannotated(summary_file: str | os.PathLike, dataset: DSMDataset, class_names: list[str],
                     regions: list) -> dict:
    """Rewrite ``summary_file`` with unannotated (case, class) metrics set to nan; returns the new summary.

    ``regions`` are the label manager's foreground regions, in the order of ``class_names``.
    """
    summary = load_summary_json(str(summary_file))
    ending = dataset.file_ending
    cases = [Path(entry["reference_file"]).name[: -len(ending)] for entry in summary["metric_per_case"]]
    available = dataset.availability_mask(cases, class_names)
    keys = [tuple(r) if isinstance(r, (list, tuple)) and len(r) > 1 else (r[0] if isinstance(r, (list, tuple)) else r)
            for r in regions]
    for entry, row in zip(summary["metric_per_case"], available):
        for key, annotated in zip(keys, row):
            metrics = entry["metrics"].get(key)
            if metrics is None:
                continue
            metrics["annotated"] = bool(annotated)
            if not annotated:
                for name in NAN_METRICS:
                    metrics[name] = float("nan")
    for key in keys:
        if key not in summary["mean"]:
            continue
        for name in NAN_METRICS:
            values = [e["metrics"][key][name] for e in summary["metric_per_case"] if key in e["metrics"]]
            summary["mean"][key][name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    for name in NAN_METRICS:
        means = [summary["mean"][k][name] for k in keys if k in summary["mean"]]
        summary["foreground_mean"][name] = float(np.nanmean(means)) if np.isfinite(means).any() else float("nan")
    with atomic_path(summary_file, suffix=".json") as tmp:
        save_summary_json(summary, str(tmp))
    return summary
