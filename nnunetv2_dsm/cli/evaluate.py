"""``evaluate`` subcommand: DSC, AUROC and FPR95 of a predictions folder against reference labels."""

import argparse
import sys

from nnunetv2_dsm.evaluation.roi import ROI_DESCRIPTIONS, ROI_MODES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="DSC per class (partial-label aware) and voxel AUROC/FPR95 of score maps",
        description=(
            "Evaluate nnU-Net-style predictions (<case>.nii.gz label maps; optional score maps "
            "<case>_<class>.nii.gz, <case>_anomaly.nii.gz or nnU-Net's <case>.npz) against a reference "
            "labels folder. Writes metrics.json, metrics_per_case.csv and metrics_summary.csv."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("predictions", help="folder with predicted label maps (and score maps)")
    parser.add_argument("references", help="folder with reference label maps, e.g. labelsTr")
    parser.add_argument("-d", "--dataset-json", required=True, help="the dataset's dataset.json")
    parser.add_argument(
        "-i", "--images", default=None, help="images folder (<case>_0000.nii.gz), needed for --roi body"
    )
    parser.add_argument(
        "--roi",
        choices=ROI_MODES,
        default="body",
        help="region of interest for AUROC/FPR95. " + " | ".join(ROI_DESCRIPTIONS.values()),
    )
    parser.add_argument(
        "-s", "--scores", default=None, help="folder with the score maps, if not next to the label maps"
    )
    parser.add_argument(
        "-o", "--output", default=None, help="output folder (default: the predictions folder)"
    )
    parser.add_argument(
        "--chill",
        action="store_true",
        help="evaluate only predicted cases instead of requiring every reference",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: scikit-learn and SimpleITK would slow down every other subcommand's start.
    from nnunetv2_dsm.evaluation.evaluate import EvaluationError, evaluate_folder

    try:
        result = evaluate_folder(
            args.predictions,
            args.references,
            args.dataset_json,
            args.images,
            args.roi,
            args.output,
            args.chill,
            scores=args.scores,
        )
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.output or args.predictions
    print(f"{len(result['per_case'])} cases evaluated; ROI for AUROC/FPR95: {result['roi']['description']}")
    for key, stats in result["summary"]["foreground_mean"].items():
        print(f"  foreground mean {key}: {stats['mean']:.4f} over {stats['n_classes']} classes")
    print(f"reports written to {out}")
    return 0
