"""``anomaly-maxlogit`` subcommand: max-logit anomaly maps from nnU-Net's saved probabilities."""

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "anomaly-maxlogit",
        help="anomaly maps -max over organ channels from nnUNetv2_predict --save_probabilities output",
        description=(
            "MaxQuery-style unseen-tumour baseline for any model, stock nnU-Net or DSM: for every <case>.npz "
            "in the predictions folder write SCORES/<case>_anomaly.nii.gz = -max over the organ channels of the "
            "predicted probabilities (tumour classes excluded), in the geometry of the input image. Evaluate "
            "with `nnunetv2_dsm evaluate PRED REF -d dataset.json -i IMAGES -s SCORES`."
        ),
    )
    parser.add_argument("-i", "--input", required=True, type=Path,
                        help="predictions folder holding <case>.npz (nnUNetv2_predict --save_probabilities)")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="folder for the anomaly maps (not the predictions folder)")
    parser.add_argument("--images", required=True, type=Path,
                        help="folder of the input images <case>_0000.nii.gz the predictions were made from")
    parser.add_argument("-d", "--dataset-json", required=True, type=Path, help="the dataset's dataset.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: SimpleITK and NumPy would slow down every other subcommand's start.
    from nnunetv2_dsm.evaluation.maxlogit import MaxLogitError, write_anomaly_maps

    try:
        dataset_json = json.loads(args.dataset_json.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: cannot read dataset.json {args.dataset_json}: {err}", file=sys.stderr)
        return 2
    try:
        written = write_anomaly_maps(args.input, args.images, args.output, dataset_json)
    except MaxLogitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} anomaly map(s) to {args.output}")
    return 0
