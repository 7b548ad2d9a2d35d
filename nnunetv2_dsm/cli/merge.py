"""``nnunetv2_dsm merge``: merge nnU-Net raw datasets into one DSM dataset with partial labels."""

import argparse
import json
from pathlib import Path

from nnunetv2_dsm.data.merge import MergeSource, merge_datasets
from nnunetv2_dsm.data.raw_dataset import nnunet_raw_folder


def _split_assignment(text: str, option: str) -> tuple[str | None, str]:
    key, sep, value = text.partition("=")
    if not sep:
        return None, text
    if not key or not value:
        raise SystemExit(f"{option} {text!r}: expected PREFIX=VALUE")
    return key, value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge nnU-Net raw datasets into one DSM dataset",
        description="Merge nnU-Net raw datasets whose labels are canonical DSM names (or renamed with a JSON "
        "table) into one DSM raw dataset: union vocabulary, remapped labels, region syntax, per-case "
        "class availability and source-prefixed case ids.",
    )
    p.add_argument(
        "--source", action="append", required=True, metavar="[PREFIX=]FOLDER",
        help="source raw dataset folder, optionally with its case-id prefix (repeat per source)",
    )
    p.add_argument(
        "--rename", action="append", default=[], metavar="PREFIX_OR_FOLDER=TABLE.json",
        help='rename table for one source: JSON {"source label": "canonical name" or null to drop}',
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="output raw dataset folder")
    where.add_argument("-d", "--dataset-id", type=int, help="write $nnUNet_raw/DatasetXXX_NAME (needs --name)")
    p.add_argument("--name", default="DSMMerged", help="dataset name (default DSMMerged)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    renames: dict[str, dict] = {}
    for item in args.rename:
        key, table = _split_assignment(item, "--rename")
        if key is None:
            raise SystemExit(f"--rename {item!r}: expected PREFIX_OR_FOLDER=TABLE.json")
        try:
            renames[key] = json.loads(Path(table).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--rename {item!r}: cannot read the JSON table {table}: {e}") from e
    sources = []
    for item in args.source:
        prefix, folder = _split_assignment(item, "--source")
        table = renames.pop(prefix, None) if prefix else None
        table = renames.pop(folder, table)
        sources.append(MergeSource(Path(folder), prefix, table))
    if renames:
        raise SystemExit(f"--rename for {sorted(renames)} matches no --source prefix or folder")
    out = args.out if args.out is not None else nnunet_raw_folder(args.dataset_id, args.name)
    merge_datasets(sources, out, dataset_name=out.name, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
