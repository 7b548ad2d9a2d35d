"""``nnunetv2_dsm synth``: real CT with synthetic seen/unseen tumours as an nnU-Net raw dataset."""

import argparse
from pathlib import Path

from nnunetv2_dsm.data.fetch import example_ct_dir
from nnunetv2_dsm.data.synthesis import RealCase, build_tumour_benchmark, example_cases


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="build the synthetic-tumour benchmark (seen tumours for training, unseen for zero-shot tests)",
        description="Insert synthetic lesions (deformed ellipsoids with noise texture, Hu et al. 2023) into "
        "real CT with TotalSegmentator 'total' labels. Training cases get the seen tumour types, the test "
        "split (imagesTs/labelsTs) the unseen ones. Default input: the TotalSegmentator example CT.",
    )
    p.add_argument("--out", type=Path, required=True, help="output raw dataset folder")
    p.add_argument(
        "--case", nargs=3, action="append", metavar=("NAME", "CT", "SEG"),
        help="real case: name, CT file, TotalSegmentator 'total' segmentation (repeatable); "
        "default: the TotalSegmentator example CT cases",
    )
    p.add_argument("--variants", type=int, default=3, help="synthetic variants per real case and split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seen", nargs="+", default=["liver_tumor", "kidney_tumor"])
    p.add_argument("--unseen", nargs="+", default=["pancreas_tumor", "spleen_tumor"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.case:
        cases = [RealCase(n, Path(ct), Path(seg)) for n, ct, seg in args.case]
    else:
        cases = example_cases(example_ct_dir())
    out = build_tumour_benchmark(
        args.out, cases, variants=args.variants, seed=args.seed, seen=args.seen, unseen=args.unseen,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0
