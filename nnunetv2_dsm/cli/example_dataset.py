"""``example-dataset`` subcommand: the real example CT as an nnU-Net raw dataset."""

import argparse
import sys


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
    from nnunetv2_dsm.data.raw_dataset import nnunet_raw_folder
    from nnunetv2_dsm.data.totalseg_example import build_example_dataset

    try:
        output = args.output or nnunet_raw_folder(args.dataset_id, "TSExample")
        out = build_example_dataset(output, args.classes, overwrite=args.overwrite)
    except (FetchError, FileExistsError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0
