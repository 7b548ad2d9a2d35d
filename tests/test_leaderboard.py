import argparse
import csv
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunetv2_dsm.cli import leaderboard as cli_leaderboard
from nnunetv2_dsm.evaluation import leaderboard as lb
from nnunetv2_dsm.evaluation.evaluate import evaluate_folder
from nnunetv2_dsm.evaluation.leaderboard import (
    MEAN_DSC,
    Column,
    LeaderboardError,
    build_leaderboard,
    collect_results,
    make_leaderboard,
)

SHAPE = (6, 8, 8)
LABELS = {"background": 0, "liver": [1, 3], "spleen": 2, "liver_tumor": 3}
REGIONS = [(1, 3), 2, 3]  # what nnU-Net's label manager evaluates for these labels
FOLDS = {"0": ["t0", "t3"], "1": ["t1", "t2"]}
STOCK = "nnUNetTrainer__nnUNetPlans__3d_fullres"
DSM = "DSMTrainer__DSMPlans__3d_fullres"
DSM_2D = "DSMTrainer__DSMPlans__2d"


def _write(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def _reference(i: int) -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:5, 1:5, 1:6] = 1
    ref[2:4, 2:4, 2 + i % 2 : 4 + i % 2] = 3
    ref[1:5, 5:8, 5:8] = 2
    if i == 3:
        ref[ref == 3] = 1  # t3 annotates organs only: its tumour is unknown, not absent
    return ref


def _prediction(ref: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pred = ref.copy()
    pred[2:4, 2:4, 2:4] = 3  # every trainer predicts a tumour, also in t3
    flip = rng.random(SHAPE) < noise
    pred[flip] = rng.integers(0, 4, SHAPE, dtype=np.uint8)[flip]
    return pred


def _score(ref: np.ndarray, separation: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ((ref == 3) * separation + rng.normal(0, 1, SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """$nnUNet_results with two datasets, three trainers (stock included), two configurations, folds."""
    root = tmp_path_factory.mktemp("nnUNet_results")
    raw = tmp_path_factory.mktemp("raw")
    dataset_json = {
        "labels": LABELS,
        "regions_class_order": [1, 2, 3],
        "file_ending": ".nii.gz",
        "channel_names": {"0": "CT"},
        "numTraining": 4,
        "dsm": {"class_availability": {"t3": ["liver", "spleen"]}},
    }
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    refs = {f"t{i}": _reference(i) for i in range(4)}
    for case, ref in refs.items():
        _write(ref, raw / "labelsTr" / f"{case}.nii.gz")

    # nnU-Net's own evaluation writes summary.json for both stock folds and DSM fold 0; DSM fold 1
    # and the 2d configuration have only metrics.json. Each call spawns a worker process (a few
    # seconds of imports), so the calls run concurrently and are kept few.
    jobs = []
    for trainer, noise in ((STOCK, 0.3), (DSM, 0.05), (DSM_2D, 0.1)):
        tdir = root / "Dataset001_Toy" / trainer
        tdir.mkdir(parents=True)
        shutil.copy(raw / "dataset.json", tdir / "dataset.json")  # nnU-Net copies it there
        for fold, cases in FOLDS.items():
            val = tdir / f"fold_{fold}" / "validation"
            for case in cases:
                seed = int(case[1:]) + 10 * len(trainer)
                _write(_prediction(refs[case], noise, seed), val / f"{case}.nii.gz")
            if trainer == STOCK or (trainer == DSM and fold == "0"):
                jobs.append(val)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(
                compute_metrics_on_folder,
                str(raw / "labelsTr"),
                str(val),
                str(val / "summary.json"),
                SimpleITKIO(),
                ".nii.gz",
                REGIONS,
                None,
                1,
            )
            for val in jobs
        ]
        for future in futures:
            future.result()
    # A second dataset holding one of those nnU-Net summaries, without a dataset.json (label ids
    # then name the columns).
    other = root / "Dataset002_Other" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_all" / "validation"
    other.mkdir(parents=True)
    shutil.copy(jobs[0] / "summary.json", other / "summary.json")

    # Score maps and metrics.json for the DSM trainers only (after nnU-Net's evaluation, which
    # would take every .nii.gz in the folder for a label map).
    for trainer, separation in ((DSM, 3.0), (DSM_2D, 0.5)):
        for fold, cases in FOLDS.items():
            val = root / "Dataset001_Toy" / trainer / f"fold_{fold}" / "validation"
            for case in cases:
                _write(_score(refs[case], separation, int(case[1:])), val / f"{case}_liver_tumor.nii.gz")
            evaluate_folder(
                val, raw / "labelsTr", raw / "dataset.json", roi="image", chill=True, progress=False
            )
    return root


def _summary_dice(root: Path, trainer: str, key: str, folds=tuple(FOLDS)) -> list[float]:
    values = []
    for fold in folds:
        data = json.loads(
            (root / "Dataset001_Toy" / trainer / f"fold_{fold}" / "validation" / "summary.json").read_text()
        )
        values += [c["metrics"][key]["Dice"] for c in data["metric_per_case"]]
    return values


def _metrics_values(root: Path, trainer: str, cls: str, key: str) -> list[float]:
    values = []
    for fold in FOLDS:
        data = json.loads(
            (root / "Dataset001_Toy" / trainer / f"fold_{fold}" / "validation" / "metrics.json").read_text()
        )
        values += [c[cls][key] for c in data["per_case"].values() if c[cls][key] is not None]
    return values


def _metrics_by_case(root: Path, trainer: str, cls: str, key: str, fold: str) -> dict[str, float]:
    path = root / "Dataset001_Toy" / trainer / f"fold_{fold}" / "validation" / "metrics.json"
    return {case: m[cls][key] for case, m in json.loads(path.read_text())["per_case"].items()}


def _entries(board, dataset="Dataset001_Toy"):
    columns, entries = board.datasets[dataset]
    return columns, {e.name: e for e in entries}


def test_values_pool_folds_and_cases(results):
    board = build_leaderboard(collect_results([results]))
    assert set(board.datasets) == {"Dataset001_Toy", "Dataset002_Other"}
    columns, entries = _entries(board)
    assert set(entries) == {STOCK, DSM, DSM_2D}
    assert entries[STOCK].folds == ["0", "1"] and entries[STOCK].n_cases == 4
    assert entries[STOCK].sources == ["summary.json"]
    assert entries[DSM].sources == ["metrics.json (ROI image)", "summary.json"]
    assert entries[DSM_2D].sources == ["metrics.json (ROI image)"]

    # stock trainer: nnU-Net's summary.json, every case counted (it knows nothing of partial labels)
    for cls, key in (("liver", "(1, 3)"), ("spleen", "2"), ("liver_tumor", "3")):
        expected = _summary_dice(results, STOCK, key)
        cell = entries[STOCK].cells[Column("DSC", cls)]
        assert cell.mean == pytest.approx(np.mean(expected)) and cell.std == pytest.approx(np.std(expected))
        assert cell.n == 4
    # DSM: metrics.json leaves the unannotated tumour of t3 out instead of scoring it 0
    assert 0.0 in _summary_dice(results, DSM, "3", ["0"])
    tumour = entries[DSM].cells[Column("DSC", "liver_tumor")]
    assert tumour.n == 3 and tumour.mean == pytest.approx(
        np.mean(_metrics_values(results, DSM, "liver_tumor", "dsc"))
    )
    # on annotated pairs our DSC equals nnU-Net's
    dsm_fold0 = list(_metrics_by_case(results, DSM, "liver", "dsc", "0").values())
    assert dsm_fold0 == pytest.approx(_summary_dice(results, DSM, "(1, 3)", ["0"]))
    for kind, key in (("AUROC", "auroc"), ("FPR95", "fpr95")):
        cell = entries[DSM].cells[Column(kind, "liver_tumor")]
        assert (
            cell.mean == pytest.approx(np.mean(_metrics_values(results, DSM, "liver_tumor", key)))
            and cell.n == 3
        )
    assert Column("AUROC", "liver_tumor") not in entries[STOCK].cells

    # per-case foreground mean pooled over folds
    per_case = np.nanmean(np.array([_summary_dice(results, STOCK, k) for k in ("(1, 3)", "2", "3")]), axis=0)
    assert entries[STOCK].cells[MEAN_DSC].mean == pytest.approx(per_case.mean())
    assert columns[0] == MEAN_DSC
    assert [c.kind for c in columns] == ["DSC"] * 4 + ["AUROC", "FPR95"]
    assert [c.cls for c in columns[1:4]] == ["liver", "spleen", "liver_tumor"]  # dataset.json order

    other_columns, other = _entries(board, "Dataset002_Other")
    assert other["nnUNetTrainer__nnUNetPlans__2d"].folds == ["all"]
    assert Column("DSC", "label (1, 3)") in other_columns and Column("DSC", "label 2") in other_columns


def test_best_marking_higher_and_lower_is_better(results):
    board = build_leaderboard(collect_results([results]))
    columns, entries = _entries(board)
    for column in columns:
        cells = {name: e.cells[column] for name, e in entries.items() if column in e.cells}
        pick = min if column.kind == "FPR95" else max
        best = pick(cells, key=lambda n: cells[n].mean)
        assert [n for n, c in cells.items() if c.best] == [best]
    fpr = Column("FPR95", "liver_tumor")
    assert entries[DSM].cells[fpr].best and entries[DSM].cells[fpr].mean < entries[DSM_2D].cells[fpr].mean
    assert entries[DSM].cells[Column("AUROC", "liver_tumor")].best
    assert entries[DSM].cells[MEAN_DSC].best and not entries[STOCK].cells[MEAN_DSC].best


def test_summary_is_the_macro_mean_and_best_needs_full_class_coverage(results):
    board = build_leaderboard(collect_results([results]))
    columns, entries = _entries(board)
    for entry in entries.values():
        for kind, cell in entry.summary.items():
            means = [entry.cells[c].mean for c in columns if c.kind == kind and c.cls is not None and c in entry.cells]
            assert cell.n == len(means) and cell.mean == pytest.approx(np.mean(means))
            assert cell.std == pytest.approx(np.std(means))
    assert entries[STOCK].summary["DSC"].n == 3 and "AUROC" not in entries[STOCK].summary
    assert entries[DSM].summary["AUROC"].n == 1
    dsc = {name: e.summary["DSC"] for name, e in entries.items()}
    assert [n for n, c in dsc.items() if c.best] == [max(dsc, key=lambda n: dsc[n].mean)]
    # An entry scored on fewer classes cannot win, even with perfect scores on the classes it has.
    dsm = entries[DSM]
    class_columns = [c for c in columns if c.kind == "DSC" and c.cls is not None]
    del dsm.cells[class_columns[0]]
    for column in class_columns[1:]:
        dsm.cells[column].mean = 1.0
    for entry in entries.values():
        entry.summary.clear()
    lb._summarise(list(entries.values()))
    assert dsm.summary["DSC"].n == 2 and dsm.summary["DSC"].mean == 1.0 and not dsm.summary["DSC"].best
    assert sum(e.summary["DSC"].best for e in entries.values()) == 1


def test_written_tables_and_plots(results, tmp_path):
    board, paths = make_leaderboard([results], tmp_path)
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html"):
        assert (tmp_path / name).is_file()
    for dataset in ("Dataset001_Toy", "Dataset002_Other"):
        png = tmp_path / f"leaderboard_{dataset}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # not a blank canvas
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind

    _, entries = _entries(board)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "## Dataset001_Toy" in md and "## Dataset002_Other" in md
    assert "FPR95 liver_tumor ↓" in md and "AUROC liver_tumor ↑" in md
    toy = md.split("## Dataset001_Toy")[1].split("## Dataset002_Other")[0]
    summary_md, per_class_md = toy.split("### Per class")
    assert "### Summary" in summary_md and "| DSC ↑ | AUROC ↑ | FPR95 ↓ |" in summary_md
    dsm_summary = next(
        line for line in summary_md.splitlines() if line.startswith("| DSMTrainer | DSMPlans | 3d_fullres")
    )
    dsc = entries[DSM].summary["DSC"]
    assert f"{dsc.mean:.4f} ± {dsc.std:.4f} (3)" in dsm_summary
    dsm_row = next(
        line for line in per_class_md.splitlines() if line.startswith("| DSMTrainer | DSMPlans | 3d_fullres")
    )
    fpr = entries[DSM].cells[Column("FPR95", "liver_tumor")]
    assert f"**{fpr.mean:.4f} ± {fpr.std:.4f}**" in dsm_row
    assert dsm_row.endswith("| metrics.json (ROI image)+summary.json |")
    stock_row = next(
        line for line in per_class_md.splitlines() if line.startswith("| nnUNetTrainer | nnUNetPlans | 3d_fullres")
    )
    assert stock_row.count("–") == 2  # no AUROC/FPR95 for the stock trainer
    assert "| 0,1 | 4 |" in stock_row

    rows = list(csv.DictReader((tmp_path / "leaderboard.csv").open()))
    best = {(r["dataset"], r["metric"]) for r in rows if r["best"] == "True"}
    assert len(best) == len({(r["dataset"], r["metric"]) for r in rows})  # one best per column
    fpr_rows = {r["configuration"]: float(r["mean"]) for r in rows if r["metric"] == "FPR95 liver_tumor"}
    assert fpr_rows["3d_fullres"] == pytest.approx(fpr.mean)
    html = (tmp_path / "leaderboard.html").read_text()
    assert html.count("<b>") == sum(r["best"] == "True" for r in rows)
    assert 'src="leaderboard_Dataset001_Toy.png"' in html


def test_errors(results, tmp_path):
    with pytest.raises(LeaderboardError, match="no results found"):
        collect_results([tmp_path])
    with pytest.raises(LeaderboardError, match="not found"):
        collect_results([tmp_path / "nope"])
    with pytest.raises(LeaderboardError, match="same dataset, trainer"):
        collect_results([results, results / "Dataset001_Toy"])
    # a dataset folder alone is a valid root
    assert {f.dataset for f in collect_results([results / "Dataset002_Other"])} == {"Dataset002_Other"}


def test_cli_subcommand(results, tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    cli_leaderboard.register(parser.add_subparsers())
    args = parser.parse_args(["leaderboard", str(results), "-o", str(tmp_path / "lb")])
    assert args.func(args) == 0
    assert (tmp_path / "lb" / "leaderboard.md").is_file()
    assert "Dataset001_Toy: 3 entries" in capsys.readouterr().out
    monkeypatch.setenv("nnUNet_results", str(results))
    args = parser.parse_args(["leaderboard", "-o", str(tmp_path / "env")])
    assert args.func(args) == 0 and (tmp_path / "env" / "leaderboard.csv").is_file()
    args = parser.parse_args(["leaderboard", str(tmp_path / "missing")])
    assert args.func(args) == 2
    assert "not found" in capsys.readouterr().err


def test_fold_without_results_is_reported_not_silently_skipped(results, tmp_path, capsys):
    trainer_dir = next(p for p in (results / "Dataset001_Toy").iterdir() if p.is_dir() and "__" in p.name)
    unfinished = trainer_dir / "fold_3"
    (unfinished / "validation").mkdir(parents=True)
    try:
        parser = argparse.ArgumentParser()
        cli_leaderboard.register(parser.add_subparsers())
        args = parser.parse_args(["leaderboard", str(results), "-o", str(tmp_path / "lb")])
        assert args.func(args) == 0
        err = capsys.readouterr().err
        assert f"warning: {unfinished} has no validation/summary.json" in err
        markdown = (tmp_path / "lb" / "leaderboard.md").read_text()
        assert "Not counted: 1 fold folder(s)" in markdown and str(unfinished) in markdown
    finally:
        shutil.rmtree(unfinished)
