"""Leaderboard across datasets, trainers, plans, configurations and folds of nnU-Net results folders.

Walks ``<results>/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/fold_<k>/`` and reads
nnU-Net's ``validation/summary.json`` (any trainer, stock ``nnUNetTrainer`` included) and, where
present, this package's ``metrics.json`` (in the fold folder or its ``validation`` folder).
metrics.json takes precedence for DSC because it leaves unannotated (case, class) pairs out
(partial labels), which summary.json cannot; it also carries AUROC and FPR95.

Every cell is mean ± std (population) over all validation cases of all folds of an entry.
"""

import html
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnunetv2_dsm.evaluation.evaluate import METRICS_JSON
from nnunetv2_dsm.evaluation.leaderboard_data import (  # noqa: F401 - re-exported
    _KIND_ORDER,
    MEAN_DSC,
    Cell,
    Column,
    Entry,
    FoldResult,
    Leaderboard,
    LeaderboardError,
    _summarise,
    build_leaderboard,
    collect_results,
    read_fold,
)
from nnunetv2_dsm.io import atomic as atomic_io


def _summary_kinds(entries: Sequence[Entry]) -> list[str]:
    return [k for k in _KIND_ORDER if any(k in e.summary for e in entries)]


def _summary_header(kind: str) -> str:
    return f"{kind} {'↓' if Column(kind).lower_is_better else '↑'}"


def _fmt(cell: Cell | None) -> str:
    return "–" if cell is None else f"{cell.mean:.4f} ± {cell.std:.4f}"


def _fmt_summary(cell: Cell | None) -> str:
    return "–" if cell is None else f"{cell.mean:.4f} ± {cell.std:.4f} ({cell.n})"


_FIXED = ("Trainer", "Plans", "Configuration", "Folds", "Cases")
_NOTE = (
    "Mean ± std over all validation cases of all folds; best per column in bold "
    "(↑ higher is better, ↓ lower is better). DSC comes from metrics.json (partial-label aware) where "
    "present, else from nnU-Net's summary.json. The Source column names the region of interest "
    "(ROI) in which AUROC/FPR95 were computed; compare only rows with the same ROI."
)


_SUMMARY_NOTE = (
    "Summary: per metric, the mean over classes of the per-class means below (± std over classes; the "
    "number of classes in brackets). Best in bold among the entries scored on the most classes."
)


def _fixed_cells(entry: Entry) -> list[str]:
    return [entry.trainer, entry.plans, entry.configuration, ",".join(entry.folds), str(entry.n_cases)]


# A rendered table: header, then rows of (text, marked best) cells.
_Table = tuple[list[str], list[list[tuple[str, bool]]]]


def _tables(columns: Sequence[Column], entries: Sequence[Entry]) -> tuple[_Table | None, _Table]:
    """A dataset's summary table (None without per-class metrics) and its per-class table."""

    def rows(cells_of, fmt, extra=lambda entry: []) -> list[list[tuple[str, bool]]]:
        return [
            [(v, False) for v in _fixed_cells(e)]
            + [(fmt(c), c is not None and c.best) for c in cells_of(e)]
            + [(v, False) for v in extra(e)]
            for e in entries
        ]

    kinds = _summary_kinds(entries)
    summary = (
        ([*_FIXED, *map(_summary_header, kinds)], rows(lambda e: [e.summary.get(k) for k in kinds], _fmt_summary))
        if kinds
        else None
    )
    per_class = (
        [*_FIXED, *(c.header for c in columns), "Source"],
        rows(lambda e: [e.cells.get(c) for c in columns], _fmt, lambda e: ["+".join(e.sources)]),
    )
    return summary, per_class


def _markdown_table(table: _Table) -> list[str]:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"**{text}**" if best else text for text, best in row]
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in cells) + " |")
    return lines


def _html_table(table: _Table) -> list[str]:
    header, rows = table
    parts = ["<table><tr>", *(f"<th>{html.escape(h)}</th>" for h in header), "</tr>"]
    for row in rows:
        cells = (f"<td><b>{html.escape(t)}</b></td>" if best else f"<td>{html.escape(t)}</td>" for t, best in row)
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return parts


def _skipped_note(board: Leaderboard) -> list[str]:
    if not board.skipped:
        return []
    return ["", f"Not counted: {len(board.skipped)} fold folder(s) without summary.json or {METRICS_JSON} "
                f"(unfinished or failed runs): " + ", ".join(f"`{p}`" for p in board.skipped)]


def to_markdown(board: Leaderboard) -> str:
    lines = ["# Leaderboard", "", _NOTE, *_skipped_note(board)]
    for dataset, (columns, entries) in board.datasets.items():
        lines += ["", f"## {dataset}"]
        summary, per_class = _tables(columns, entries)
        if summary is not None:
            lines += ["", "### Summary", "", _SUMMARY_NOTE, "", *_markdown_table(summary), "", "### Per class"]
        lines += ["", *_markdown_table(per_class)]
    return "\n".join(lines) + "\n"


def to_html(board: Leaderboard, images: Mapping[str, str] | None = None) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>Leaderboard</title>',
        "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "td:nth-child(-n+3){text-align:left}</style></head><body>",
        "<h1>Leaderboard</h1>",
        f"<p>{html.escape(_NOTE)}</p>",
    ]
    for dataset, (columns, entries) in board.datasets.items():
        parts.append(f"<h2>{html.escape(dataset)}</h2>")
        summary, per_class = _tables(columns, entries)
        if summary is not None:
            parts += ["<h3>Summary</h3>", f"<p>{html.escape(_SUMMARY_NOTE)}</p>", *_html_table(summary),
                      "<h3>Per class</h3>"]
        parts += _html_table(per_class)
        if images and dataset in images:
            parts.append(f'<img src="{html.escape(images[dataset])}" alt="{html.escape(dataset)} bar plot">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


CSV_HEADER = (
    "dataset",
    "trainer",
    "plans",
    "configuration",
    "folds",
    "metric",
    "mean",
    "std",
    "n",
    "best",
    "source",
)


def to_csv_rows(board: Leaderboard) -> list[list[Any]]:
    """Long format: one row per (entry, metric column) that has values, then the summary ("macro <kind>", n = classes)."""
    rows = []
    for dataset, (columns, entries) in board.datasets.items():
        for entry in entries:
            labelled = [(c.label, entry.cells.get(c)) for c in columns]
            labelled += [(f"macro {kind}", entry.summary.get(kind)) for kind in _summary_kinds(entries)]
            for label, cell in labelled:
                if cell is not None:
                    rows.append([dataset, entry.trainer, entry.plans, entry.configuration, ";".join(entry.folds),
                                 label, cell.mean, cell.std, cell.n, cell.best, "+".join(entry.sources)])
    return rows


def plot_dataset(dataset: str, columns: Sequence[Column], entries: Sequence[Entry], target: Path) -> None:
    """Grouped bars (one per entry, error bar = std) for the DSC columns and, if any, AUROC/FPR95 ones."""
    groups = [
        g for g in ([c for c in columns if c.kind == "DSC"], [c for c in columns if c.kind != "DSC"]) if g
    ]
    widest = max(len(g) for g in groups)
    fig = Figure(
        figsize=(
            max(6.0, 2.0 + widest * (0.4 + 0.25 * len(entries))),
            3.6 * len(groups) + 0.3 * len(entries),
        ),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    width = 0.8 / len(entries)
    for row, group in enumerate(groups):
        ax = fig.add_subplot(len(groups), 1, row + 1)
        x = np.arange(len(group))
        for i, entry in enumerate(entries):
            cells = [entry.cells.get(c) for c in group]
            means = [c.mean if c else np.nan for c in cells]
            stds = [c.std if c else 0.0 for c in cells]
            ax.bar(
                x + (i - (len(entries) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=entry.name
            )
        ax.set_xticks(x, [c.header for c in group], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
        if row == 0:
            ax.set_title(dataset)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=8)
    with atomic_io.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_leaderboard(board: Leaderboard, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write leaderboard.md/.csv/.html and leaderboard_<dataset>.png, each atomically; return the paths."""
    out = Path(output_dir)
    paths: dict[str, Path] = {}
    images = {}
    for dataset, (columns, entries) in board.datasets.items():
        png = out / f"leaderboard_{dataset}.png"
        plot_dataset(dataset, columns, entries, png)
        paths[f"png:{dataset}"] = png
        images[dataset] = png.name
    paths["md"] = out / "leaderboard.md"
    paths["csv"] = out / "leaderboard.csv"
    paths["html"] = out / "leaderboard.html"
    atomic_io.write_text(paths["md"], to_markdown(board))
    atomic_io.write_csv(paths["csv"], CSV_HEADER, to_csv_rows(board))
    atomic_io.write_text(paths["html"], to_html(board, images))
    return paths


def make_leaderboard(
    roots: Iterable[str | os.PathLike], output_dir: str | os.PathLike
) -> tuple[Leaderboard, dict[str, Path]]:
    """Collect results under ``roots``, build the leaderboard and write it to ``output_dir``."""
    skipped: list[Path] = []
    board = build_leaderboard(collect_results(roots, skipped))
    board.skipped = skipped
    return board, write_leaderboard(board, output_dir)
