"""``example-dataset`` subcommand: the real example CT as an nnU-Net raw dataset."""

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "example-dataset", help="write real example CT (TotalSegmentator sdist) as an nnU-Net raw dataset",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-d", "--dataset-id", type=int, default=990)
    parser.add_argument("-o", "--output", default=None,
                        help="dataset folder (default: $nnUNet_raw/Dataset<ID>_TSExample)")
    parser.add_argument("--classes", nargs="+", default=None, help="canonical class names to keep (default: all)")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnunetv2_dsm.data.fetch import FetchError
    from nnunetv2_dsm.data.totalseg_example import build_example_dataset

    if args.output is None:
        raw = os.environ.get("nnUNet_raw")
        if not raw:
            print("error: nnUNet_raw is not set. Export it (e.g. `export nnUNet_raw=/data/nnUNet_raw`) or pass "
                  "--output.", file=sys.stderr)
            return 2
        args.output = Path(raw) / f"Dataset{args.dataset_id:03d}_TSExample"
    try:
        out = build_example_dataset(args.output, args.classes, overwrite=args.overwrite)
    except (FetchError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0
