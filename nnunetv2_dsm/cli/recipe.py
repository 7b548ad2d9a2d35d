"""``nnunetv2_dsm recipe``: convert a public CT dataset into a DSM raw dataset."""

import argparse
from pathlib import Path

from nnunetv2_dsm.data.public_recipes import RECIPES, convert


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recipe",
        help="convert a public dataset (MSD, BTCV, LiTS, KiTS, TotalSegmentator, AMOS, WORD, AbdomenCT-1K)",
        description="Convert a public CT dataset, in its documented download layout, into an nnU-Net raw "
        "dataset with canonical DSM class names and per-case class availability.\n\nRecipes:\n"
        + "\n".join(f"  {k:12s} {r.description}\n  {'':12s} layout: {r.layout}" for k, r in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(RECIPES), metavar="NAME", help="recipe name (see list above)")
    p.add_argument("--src", type=Path, required=True, help="folder of the downloaded dataset")
    p.add_argument("--out", type=Path, required=True, help="output raw dataset folder, e.g. $nnUNet_raw/Dataset009_Spleen")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N cases")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = convert(args.name, args.src, args.out, overwrite=args.overwrite, limit=args.limit)
    print(f"wrote {out}")
    return 0
