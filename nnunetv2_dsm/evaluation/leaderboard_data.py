"""The leaderboard's data: results of nnU-Net folds (``summary.json``, ``metrics.json``) collected and
pooled into entries of mean ± std cells. Rendering and writing live in ``leaderboard``."""

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.evaluation.evaluate import METRICS_JSON

SUMMARY_JSON = "summary.json"
_DATASET_RE = re.compile(r"^Dataset\d{3}_.+")
_TRAINER_RE = re.compile(r"^(?P<trainer>[^_].*?)__(?P<plans>.+)__(?P<configuration>[^_].*)$")
_FOLD_RE = re.compile(r"^fold_(?P<fold>\d+|all)$")

# metrics.json key -> column kind; table order is DSC, then these.
_ROC_KINDS = {
    "auroc": "AUROC",
    "fpr95": "FPR95",
    "anomaly_auroc": "anomaly AUROC",
    "anomaly_fpr95": "anomaly FPR95",
}
_KIND_ORDER = ("DSC", *_ROC_KINDS.values())


class LeaderboardError(DSMError, ValueError):
    """No usable results, or inconsistent ones; the message names the folders."""


class Column(NamedTuple):
    """A metric column: its kind (DSC, AUROC, FPR95, ...) and class; class None is the foreground mean."""

    kind: str
    cls: str | None = None

    @property
    def label(self) -> str:
        return f"mean {self.kind}" if self.cls is None else f"{self.kind} {self.cls}"

    @property
    def lower_is_better(self) -> bool:
        return "FPR95" in self.kind

    @property
    def header(self) -> str:
        return f"{self.label} {'↓' if self.lower_is_better else '↑'}"


MEAN_DSC = Column("DSC")


@dataclass
class FoldResult:
    """Per-case values of one fold folder: column -> values over its cases."""

    dataset: str
    trainer: str
    plans: str
    configuration: str
    fold: str
    folder: Path
    values: dict[Column, list[float]]
    sources: list[str]
    n_cases: int

    @property
    def entry(self) -> tuple[str, str, str, str]:
        return self.dataset, self.trainer, self.plans, self.configuration


@dataclass
class Cell:
    mean: float
    std: float
    n: int
    best: bool = False


@dataclass
class Entry:
    """One row of a dataset's table: a trainer/plans/configuration with its folds pooled."""

    dataset: str
    trainer: str
    plans: str
    configuration: str
    folds: list[str]
    n_cases: int
    sources: list[str]
    cells: dict[Column, Cell] = field(default_factory=dict)
    # metric kind -> macro mean over this entry's per-class cells (std over classes, n = classes)
    summary: dict[str, Cell] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.trainer}__{self.plans}__{self.configuration}"


@dataclass
class Leaderboard:
    """dataset -> (ordered metric columns, entries)."""

    datasets: dict[str, tuple[list[Column], list[Entry]]]
    # fold folders found without summary.json or metrics.json (unfinished or failed runs), not counted
    skipped: list[Path] = field(default_factory=list)


def _label_names(dataset_json: Path) -> dict[Any, str]:
    """nnU-Net summary key (int label or tuple region) -> class name, from a results dataset.json."""
    if not dataset_json.is_file():
        return {}
    names = {}
    for name, ids in DSMDataset.from_json(json.loads(dataset_json.read_text()), dataset_json).classes.items():
        names[ids] = name
        if len(ids) == 1:
            names[ids[0]] = name
    return names


def _finite(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _from_summary(path: Path, names: Mapping[Any, str]) -> tuple[dict[Column, list[float]], int]:
    """DSC columns from nnU-Net's summary.json, read with nnU-Net's own loader."""
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    try:
        summary = load_summary_json(str(path))
    except (ValueError, KeyError, TypeError) as err:
        raise LeaderboardError(f"{path} is not an nnU-Net summary.json: {err!r}") from err
    values: dict[Column, list[float]] = {MEAN_DSC: []}
    for case in summary["metric_per_case"]:
        per_case = []
        for key, metrics in case["metrics"].items():
            if key in (0, (0,)):
                continue
            column = Column("DSC", names.get(key, f"label {key}"))
            values.setdefault(column, [])
            if _finite(metrics.get("Dice")):
                values[column].append(float(metrics["Dice"]))
                per_case.append(float(metrics["Dice"]))
        if per_case:
            values[MEAN_DSC].append(float(np.mean(per_case)))
    return values, len(summary["metric_per_case"])


def _from_metrics_json(path: Path) -> tuple[dict[Column, list[float]], int, str]:
    """DSC (partial-label aware), AUROC and FPR95 columns, case count and ROI mode from a metrics.json."""
    data = json.loads(path.read_text())
    if "per_case" not in data:
        raise LeaderboardError(f"{path} has no 'per_case'; write it with `nnunetv2_dsm evaluate`")
    values: dict[Column, list[float]] = {MEAN_DSC: []}
    for case_metrics in data["per_case"].values():
        per_case = []
        for name, entry in case_metrics.items():
            keys = [("dsc", Column("DSC", name))]
            keys += [(k, Column(kind, name)) for k, kind in _ROC_KINDS.items() if f"{k}_note" in entry]
            for key, column in keys:
                values.setdefault(column, [])
                if _finite(entry.get(key)):
                    values[column].append(float(entry[key]))
                    if key == "dsc":
                        per_case.append(float(entry[key]))
        if per_case:
            values[MEAN_DSC].append(float(np.mean(per_case)))
    return values, len(data["per_case"]), data.get("roi", {}).get("mode", "unknown")


def read_fold(
    fold_dir: Path, dataset: str, trainer: str, plans: str, configuration: str, fold: str
) -> FoldResult | None:
    """Metrics of one fold folder, or None when it holds neither summary.json nor metrics.json."""
    summary = fold_dir / "validation" / SUMMARY_JSON
    candidates = (fold_dir / METRICS_JSON, fold_dir / "validation" / METRICS_JSON)
    metrics = next((p for p in candidates if p.is_file()), None)
    if not summary.is_file() and metrics is None:
        return None
    values: dict[Column, list[float]] = {}
    sources = []
    n_cases = 0
    if summary.is_file():
        values, n_cases = _from_summary(summary, _label_names(fold_dir.parent / "dataset.json"))
        sources.append(SUMMARY_JSON)
    if metrics is not None:
        ours, n_cases, roi = _from_metrics_json(metrics)
        values = {k: v for k, v in values.items() if k.kind != "DSC"} | ours
        # The ROI travels with the source so that rows computed in different regions stand out.
        sources.append(f"{METRICS_JSON} (ROI {roi})")
    return FoldResult(dataset, trainer, plans, configuration, fold, fold_dir, values, sources, n_cases)


def _dataset_dirs(root: Path) -> list[Path]:
    if _DATASET_RE.match(root.name):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and _DATASET_RE.match(p.name))


def collect_results(roots: Iterable[str | os.PathLike], skipped: list[Path] | None = None) -> list[FoldResult]:
    """Every fold with results under the given nnU-Net results roots (or dataset folders).

    Fold folders without results are appended to ``skipped`` (when given), so they can be reported.
    """
    folds: list[FoldResult] = []
    seen: dict[tuple[str, ...], Path] = {}
    roots = [Path(r) for r in roots]
    for root in roots:
        if not root.is_dir():
            raise LeaderboardError(f"results folder {root} not found")
        for dataset_dir in _dataset_dirs(root):
            for trainer_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
                match = _TRAINER_RE.match(trainer_dir.name)
                if match is None:
                    continue
                for fold_dir in sorted(p for p in trainer_dir.iterdir() if p.is_dir()):
                    fold_match = _FOLD_RE.match(fold_dir.name)
                    if fold_match is None:
                        continue
                    result = read_fold(
                        fold_dir, dataset_dir.name, **match.groupdict(), fold=fold_match["fold"]
                    )
                    if result is None:
                        if skipped is not None:
                            skipped.append(fold_dir)
                        continue
                    key = (*result.entry, result.fold)
                    if key in seen:
                        raise LeaderboardError(
                            f"{fold_dir} and {seen[key]} are the same dataset, trainer, plans, configuration "
                            "and fold; pass only one of their results roots"
                        )
                    seen[key] = fold_dir
                    folds.append(result)
    if not folds:
        raise LeaderboardError(
            f"no results found under {[str(r) for r in roots]}: expected "
            "DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/fold_<k>/validation/summary.json "
            f"(written by nnUNetv2_train) or a {METRICS_JSON} (written by `nnunetv2_dsm evaluate`)"
        )
    return folds


def _fold_order(fold: str) -> tuple[int, int]:
    return (0, int(fold)) if fold.isdigit() else (1, 0)


def _column_order(column: Column) -> tuple[int, int]:
    return _KIND_ORDER.index(column.kind), 0 if column.cls is None else 1


def build_leaderboard(folds: Sequence[FoldResult]) -> Leaderboard:
    """Pool folds per entry, compute mean ± std per column and mark the best entry per column."""
    grouped: dict[tuple[str, str, str, str], list[FoldResult]] = {}
    for fold in folds:
        grouped.setdefault(fold.entry, []).append(fold)
    datasets: dict[str, tuple[list[Column], list[Entry]]] = {}
    for key in sorted(grouped):
        members = sorted(grouped[key], key=lambda f: _fold_order(f.fold))
        entry = Entry(
            *key,
            folds=[f.fold for f in members],
            n_cases=sum(f.n_cases for f in members),
            sources=sorted({s for f in members for s in f.sources}),
        )
        pooled: dict[Column, list[float]] = {}
        for fold in members:
            for column, values in fold.values.items():
                pooled.setdefault(column, []).extend(values)
        for column, values in pooled.items():
            if values:
                arr = np.asarray(values, dtype=np.float64)
                entry.cells[column] = Cell(float(arr.mean()), float(arr.std()), int(arr.size))
        order, entries = datasets.setdefault(key[0], ([], []))
        entries.append(entry)
        order.extend(c for c in pooled if c not in order)
    for order, entries in datasets.values():
        _summarise(entries)
        # A stable sort keeps the dataset.json class order within each metric kind.
        order.sort(key=_column_order)
        for column in order:
            cells = [e.cells[column] for e in entries if column in e.cells]
            if not cells:
                continue
            best = (min if column.lower_is_better else max)(c.mean for c in cells)
            for cell in cells:
                cell.best = math.isclose(cell.mean, best, rel_tol=0.0, abs_tol=1e-12)
    return Leaderboard(datasets)


def _summarise(entries: Sequence[Entry]) -> None:
    """Per metric kind, the macro mean over each entry's classes; best among the entries covering the most classes.

    An entry scored on fewer classes (a stock trainer without anomaly maps, a class without annotated
    validation cases) cannot win a summary column by what it leaves out.
    """
    for entry in entries:
        for kind in _KIND_ORDER:
            means = [c.mean for col, c in entry.cells.items() if col.kind == kind and col.cls is not None]
            if means:
                entry.summary[kind] = Cell(float(np.mean(means)), float(np.std(means)), len(means))
    for kind in _KIND_ORDER:
        cells = [e.summary[kind] for e in entries if kind in e.summary]
        if not cells:
            continue
        widest = max(c.n for c in cells)
        contenders = [c for c in cells if c.n == widest]
        best = (min if Column(kind).lower_is_better else max)(c.mean for c in contenders)
        for cell in contenders:
            cell.best = math.isclose(cell.mean, best, rel_tol=0.0, abs_tol=1e-12)
