"""``anomaly-posthoc`` subcommand: post-hoc anomaly maps (MSP, max-logit, energy, SML) from any trained model."""

import argparse
from pathlib import Path

from nnunetv2_dsm.evaluation.posthoc import METHODS  # NumPy only: --help stays free of torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "anomaly-posthoc",
        help="post-hoc anomaly maps (MSP, max-logit, energy, SML) from the logits of any trained nnU-Net/DSM model",
        description=(
            "Runs a trained model (nnU-Net's preprocessing, sliding window and resampling) on every "
            "<case>_0000 image of the input folder and writes, for each method, OUT/<method>/<case>_anomaly"
            "<file_ending> in the input image's geometry: msp (-max organ probability), maxlogit (-max organ "
            "logit), energy (free energy of the organ classes; joint energy for sigmoid outputs) and sml "
            "(standardized max logit, statistics from the --stats-images cases, written to "
            "OUT/sml_statistics.json). Tumour classes are not organ evidence. Evaluate each with "
            "`nnunetv2_dsm evaluate PRED REF -d dataset.json -i IMAGES -s OUT/<method>`."
        ),
    )
    parser.add_argument("-m", "--model", required=True, type=Path,
                        help="trained model folder <nnUNet_results>/<Dataset>/<Trainer>__<Plans>__<configuration>")
    parser.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds to ensemble (default: 0)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in fold_X")
    parser.add_argument("-i", "--input", required=True, type=Path, help="folder of images <case>_0000<file_ending>")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (one subfolder per method)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--stats-images", type=Path, default=None,
                        help="training images for the SML statistics (required with sml), e.g. $nnUNet_raw/DatasetX/imagesTr")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring (8x faster)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnunetv2_dsm.evaluation.posthoc import PosthocError
    from nnunetv2_dsm.inference.posthoc_maps import write_posthoc_maps

    if "sml" in args.methods and args.stats_images is None:
        raise PosthocError("sml needs --stats-images (the training images whose predictions give its statistics)")
    folds = [f if f == "all" else int(f) for f in args.folds]
    written = write_posthoc_maps(args.model, folds, args.checkpoint, args.input, args.output, args.methods,
                                 args.stats_images, args.device, not args.disable_tta)
    print(f"wrote {len(written)} anomaly map(s) to {args.output}")
    return 0
