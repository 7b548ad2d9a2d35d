"""`predict` subcommand: DSM prediction for text prompts (seen or unseen classes) with anomaly maps."""

import argparse
from pathlib import Path

from nnunetv2_dsm.text.spec import SPEC_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment classes named by text prompts (also unseen tumour types) and write anomaly maps",
        description=(
            "Predict every <case>_0000.nii.gz of the input folder with a trained DSM model. Writes "
            "<case>.nii.gz (label ids 1..K in prompt order; where prompts overlap, tumours win over organs, then "
            "the more probable prompt), scores/<case>_<prompt>.nii.gz "
            "(probabilities), scores/<case>_anomaly.nii.gz and prompts.json, in the input geometry."
        ),
    )
    add_prompt_prediction_arguments(
        parser, "trained model folder <nnUNet_results>/<Dataset>/<Trainer>__<Plans>__<configuration>",
        'class names, e.g. "pancreas tumor" liver_tumor "lung tumor"')
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds to ensemble (default: every fold with the checkpoint)")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    parser.add_argument("--step-size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    parser.add_argument("--amvp-range", choices=("tile", "case"), default="tile",
                        help="normalise the anomaly mask prompt per sliding-window tile (default, as in training) or "
                             "per case (two passes over the tiles; twice the time)")
    parser.set_defaults(func=run)


def add_prompt_prediction_arguments(parser: argparse.ArgumentParser, model_help: str, prompts_help: str) -> None:
    """-i, -o, -m, --prompts, --checkpoint, --device and --text-encoder: what every prompt predictor takes."""
    parser.add_argument("-i", "--input", required=True, type=Path, help="folder of input images (nnU-Net naming)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (not the input folder)")
    parser.add_argument("-m", "--model", required=True, type=Path, help=model_help)
    parser.add_argument("--prompts", required=True, nargs="+", metavar="TEXT", help=prompts_help)
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in fold_X")
    parser.add_argument("--device", default="cuda", help="torch device: cuda, cpu or mps (default: cuda)")
    parser.add_argument("--text-encoder", default=None,
                        help=f"override the encoder stored with the model (must be the same embedding space); {SPEC_HELP}")


def checked_output_and_device(args: argparse.Namespace):
    """The torch device asked for; an output that is a file, or CUDA without a GPU, is an error."""
    import torch

    from nnunetv2_dsm.inference.prompts import DSMPredictionError

    if args.output.exists() and not args.output.is_dir():
        raise DSMPredictionError(f"-o {args.output} is an existing file, not a folder; give a folder for the outputs")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DSMPredictionError("--device cuda (the default) but torch sees no CUDA GPU on this machine; "
                                 "predict with --device cpu")
    return device


def run(args: argparse.Namespace) -> int:
    from nnunetv2_dsm.checks.inputs import InputError
    from nnunetv2_dsm.inference.predictor import DSMPredictor
    from nnunetv2_dsm.inference.prompts import DSMPredictionError
    from nnunetv2_dsm.text import EncoderMismatchError, MissingPromptError

    device = checked_output_and_device(args)
    folds = None if args.folds is None else [f if f == "all" else int(f) for f in args.folds]
    try:
        predictor = DSMPredictor(args.prompts, text_encoder=args.text_encoder, tile_step_size=args.step_size,
                                 use_mirroring=not args.disable_tta, device=device,
                                 amvp_range=args.amvp_range)
        predictor.initialize_from_trained_model_folder(str(args.model), folds, args.checkpoint)
        cases = predictor.predict_folder(args.input, args.output)
    except (DSMPredictionError, EncoderMismatchError, MissingPromptError, InputError) as e:
        raise DSMPredictionError(f"predict: {e}") from e
    print(f"predicted {len(cases)} case(s) for prompts {args.prompts} into {args.output}")
    return 0
