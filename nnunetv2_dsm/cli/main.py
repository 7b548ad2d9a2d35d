"""``nnunetv2_dsm`` command: what stock nnU-Net commands cannot express."""

import argparse
import importlib
import sys

# Subcommand modules; each exposes register(subparsers).
SUBCOMMANDS = ("demo", "example_dataset", "check", "recipe", "merge", "synth", "predict", "anomaly", "posthoc", "diffugts", "evaluate",
               "leaderboard", "embed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_dsm",
        description="DSM for nnU-Net v2. Training and inference use the stock nnU-Net commands with "
        "-pl DSMPlanner / -tr DSMTrainer -p DSMPlans; this command adds the rest.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors, not only their message")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"nnunetv2_dsm.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nnunetv2_dsm.errors import DSMError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DSMError as err:
        # One error path for every subcommand: the message names the file and the fix; exit status 2.
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
