"""``leaderboard`` subcommand: tables and bar plots across datasets, trainers, configurations and folds."""

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "leaderboard",
        help="leaderboard.md/.csv/.html and bar plots from nnU-Net results folders",
        description=(
            "Collect DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/fold_<k>/ results (nnU-Net's "
            "validation/summary.json, and metrics.json from `nnunetv2_dsm evaluate` where present) and "
            "write mean ± std over folds and cases per metric, best entry per column marked."
        ),
    )
    parser.add_argument(
        "results",
        nargs="*",
        help="nnU-Net results root(s) or DatasetXXX_Name folder(s) (default: $nnUNet_results)",
    )
    parser.add_argument("-o", "--output", default=".", help="output folder (default: current folder)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: matplotlib and scikit-learn would slow down every other subcommand's start.
    from nnunetv2_dsm.evaluation.leaderboard import LeaderboardError, make_leaderboard

    roots = args.results or ([os.environ["nnUNet_results"]] if os.environ.get("nnUNet_results") else [])
    if not roots:
        print("error: pass a results folder or set nnUNet_results", file=sys.stderr)
        return 2
    try:
        board, paths = make_leaderboard(roots, args.output)
    except LeaderboardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for folder in board.skipped:
        print(f"warning: {folder} has no validation/summary.json or metrics.json (unfinished or failed run); "
              "not counted", file=sys.stderr)
    for dataset, (_, entries) in board.datasets.items():
        print(f"{dataset}: {len(entries)} entries")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0
