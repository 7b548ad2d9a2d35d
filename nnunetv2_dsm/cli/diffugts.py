"""`diffugts-predict` subcommand: DiffuGTS (method re-implemented, diffusion model trained here) for text prompts."""

import argparse
from pathlib import Path

from nnunetv2_dsm.cli.predict import add_prompt_prediction_arguments, checked_output_and_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diffugts-predict",
        help="DiffuGTS tumour maps for text prompts: attention maps, pseudo-healthy image, refined map",
        description=(
            "Predict every <case>_0000.nii.gz of the input folder with a DiffuGTSTrainer model (DiffuGTS method, "
            "diffusion model trained here, not the authors' weights). Writes scores/<case>_<prompt>.nii.gz (refined "
            "probability), diffugts/<case>_<prompt>_{attention,residual,pseudo_healthy}.nii.gz, <case>.nii.gz "
            "(label ids 1..P where a refined probability exceeds 0.5) and prompts.json, in the input geometry."
        ),
    )
    add_prompt_prediction_arguments(parser, "trained model folder <nnUNet_results>/<Dataset>/DiffuGTSTrainer__<Plans>__2d",
                                    'tumour names, e.g. "pancreas tumor" "spleen tumor"')
    parser.add_argument("-f", "--fold", default=None, help="the fold's model to use (default: the only fold)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="candidate region inpainted healthy: attention probability above THRESHOLD times the case's "
                             "highest attention probability for the prompt (default 0.5; see --threshold-mode)")
    parser.add_argument("--threshold-mode", choices=("relative", "absolute"), default="relative",
                        help="relative (default): THRESHOLD is a fraction of the case's peak; absolute: a probability")
    parser.add_argument("--regions", type=Path, default=None,
                        help="folder of <case>.nii.gz masks on the images' grids: inpaint these regions (non-zero) "
                             "instead of the thresholded attention, e.g. for the pseudo-healthy image of a known lesion")
    parser.add_argument("--inpaint-steps", type=int, default=25, help="DDIM steps of the RePaint inpainting")
    parser.add_argument("--strength", type=float, default=0.25,
                        help="noise level the inpainting starts from, as a fraction of the schedule (1: pure noise; "
                             "default 0.25, AnoDDPM's partial diffusion)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnunetv2_dsm.checks.inputs import InputError
    from nnunetv2_dsm.inference.diffugts_predictor import DiffuGTSPredictor
    from nnunetv2_dsm.inference.prompts import DSMPredictionError
    from nnunetv2_dsm.text import EncoderMismatchError, MissingPromptError

    device = checked_output_and_device(args)
    if args.regions is not None and not args.regions.is_dir():
        raise DSMPredictionError(f"--regions {args.regions} is not a folder; give the folder of <case>.nii.gz masks")
    if not 0 < args.strength <= 1:
        raise DSMPredictionError(f"--strength must lie in (0, 1], got {args.strength}")
    if not 0 < args.threshold < 1 or args.inpaint_steps < 1:
        raise DSMPredictionError(f"--threshold must lie in (0, 1) and --inpaint-steps be >= 1, got {args.threshold} "
                                 f"and {args.inpaint_steps}")
    try:
        predictor = DiffuGTSPredictor(args.prompts, text_encoder=args.text_encoder, device=device,
                                      threshold=args.threshold, inpaint_steps=args.inpaint_steps,
                                      threshold_mode=args.threshold_mode, regions=args.regions,
                                      strength=args.strength)
        predictor.initialize_from_trained_model_folder(str(args.model), args.fold, args.checkpoint)
        cases = predictor.predict_folder(args.input, args.output)
    except (DSMPredictionError, EncoderMismatchError, MissingPromptError, InputError) as e:
        raise DSMPredictionError(f"diffugts-predict: {e}") from e
    print(f"predicted {len(cases)} case(s) for prompts {args.prompts} into {args.output}")
    return 0
