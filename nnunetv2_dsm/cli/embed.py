"""`embed` subcommand: write a precomputed prompt-embeddings file for machines without the text encoder."""

import argparse
from pathlib import Path

from nnunetv2_dsm.text.spec import SPEC_HELP
from nnunetv2_dsm.vocabulary import CANONICAL, prompt_for


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="precompute class prompt embeddings into a .pt/.npz file (for air-gapped prediction)",
        description=(
            "Encode class prompts with a text encoder and write names, vectors and the encoder id to a file. "
            "Use the file elsewhere with --text-encoder file:/path/emb.pt. Class names become "
            "'a computerized tomography of a {CLS}' (canonical names use their display names); "
            "--prompts are stored verbatim."
        ),
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="output file, .pt or .npz")
    parser.add_argument("--text-encoder", default="minilm", help=SPEC_HELP)
    parser.add_argument(
        "--classes", nargs="+", default=[], metavar="NAME", help="class names (canonical or new)"
    )
    parser.add_argument(
        "--prompts", nargs="+", default=[], metavar="TEXT", help="full prompt texts, stored as given"
    )
    parser.add_argument(
        "--canonical",
        action="store_true",
        help="include all 45 canonical DSM classes (25 organs, 20 tumours)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the encoder (default: cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nnunetv2_dsm.text import get_text_encoder, save_embeddings

    names = (list(CANONICAL) if args.canonical else []) + list(args.classes)
    texts = list(dict.fromkeys([prompt_for(n) for n in names] + list(args.prompts)))
    if not texts:
        raise SystemExit("embed: nothing to encode; give --classes, --prompts and/or --canonical")
    encoder = get_text_encoder(args.text_encoder, device=args.device)
    vectors = encoder.encode(texts)
    path = save_embeddings(args.output, texts, vectors, encoder.encoder_id)
    print(f"wrote {len(texts)} embeddings of dim {encoder.dim} from {encoder.encoder_id} to {path}")
    return 0
