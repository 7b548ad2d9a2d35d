"""Text-encoder specs as given on the command line: "minilm", "openclip[:MODEL[:WEIGHTS]]", "file:/path/emb.pt"."""

import torch

from nnunetv2_dsm.text.base import TextEncoder
from nnunetv2_dsm.text.clip import DEFAULT_CLIP_MODEL, OpenCLIPEncoder
from nnunetv2_dsm.text.minilm import MINILM_ID, MiniLMEncoder
from nnunetv2_dsm.text.precomputed import PrecomputedEncoder

DEFAULT_SPEC = "minilm"
SPEC_HELP = (
    "text encoder for class prompts: 'minilm' (offline default, all-MiniLM-L6-v2), "
    "'openclip[:MODEL[:WEIGHTS]]' (CLIP text tower, e.g. openclip:ViT-B-32:/path/open_clip_pytorch_model.bin; "
    "WEIGHTS is a file or a pretrained tag in the local hub cache; default $DSM_CLIP_WEIGHTS, then tag "
    "laion2b_s34b_b79k) or 'file:/path/emb.pt' (precomputed embeddings from `nnunetv2_dsm embed`)"
)


def get_text_encoder(spec: str | None = DEFAULT_SPEC, device: str | torch.device = "cpu") -> TextEncoder:
    """Build the encoder named by ``spec`` (see SPEC_HELP); None or "" selects the offline default."""
    spec = (spec or DEFAULT_SPEC).strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind == "minilm" and not rest:
        return MiniLMEncoder(device=device)
    if kind == "openclip":
        # maxsplit 1: the weight path may itself contain ':'.
        model_name, _, weights = rest.partition(":")
        return OpenCLIPEncoder(model_name or DEFAULT_CLIP_MODEL, weights or None, device=device)
    if kind == "file" and rest:
        return PrecomputedEncoder(rest)
    raise ValueError(f"unknown text encoder spec {spec!r}; expected {SPEC_HELP}")


def spec_hint(encoder_id: str) -> str:
    """The --text-encoder value that reproduces ``encoder_id``, for error messages."""
    if encoder_id == MINILM_ID:
        return "minilm"
    if encoder_id.startswith("openclip:"):
        model_name = encoder_id.removeprefix("openclip:").partition(":")[0]
        return f"openclip:{model_name}:/path/to/weights"
    return f"<the encoder {encoder_id!r}>"
