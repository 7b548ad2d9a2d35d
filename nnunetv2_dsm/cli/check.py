"""``check`` subcommand: every bad input of an nnU-Net raw dataset, each with the file and the fix."""

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="list every problem of a raw dataset (unreadable/truncated files, NaN, grids, labels, channels)",
        description=(
            "Check an nnU-Net raw dataset before planning and training: dataset.json (required keys, "
            "channel_names, labels, file_ending, DSM class names), file naming and pairing, and every image "
            "and label file (readable and complete, no NaN/Inf, image and label on one grid, declared label "
            "values, no all-background label). Prints every problem, not only the first; exits with 2 if "
            "there is any."
        ),
    )
    parser.add_argument(
        "dataset",
        metavar="DATASET_FOLDER_OR_ID",
        help="raw dataset folder, or a dataset ID / DatasetXXX_Name found under $nnUNet_raw",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: SimpleITK and nnU-Net would slow down every other subcommand's start.
    from nnunetv2_dsm.checks.inputs import InputError, check_raw_dataset, resolve_raw_dataset

    try:
        folder = resolve_raw_dataset(args.dataset)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = check_raw_dataset(folder, progress=not args.no_progress)
    for problem in problems:
        print(f"- {problem}")
    if problems:
        print(f"{len(problems)} problem(s) found in {folder}", file=sys.stderr)
        return 2
    print(f"no problems found in {folder}")
    return 0
