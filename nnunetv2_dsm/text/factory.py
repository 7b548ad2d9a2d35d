"""Build the text encoder a spec names (specs are parsed in the torch-free ``nnunetv2_dsm.text.spec``)."""

import torch

from nnunetv2_dsm.text.base import TextEncoder
from nnunetv2_dsm.text.clip import DEFAULT_CLIP_MODEL, OpenCLIPEncoder
from nnunetv2_dsm.text.minilm import MiniLMEncoder
from nnunetv2_dsm.text.precomputed import PrecomputedEncoder
from nnunetv2_dsm.text.spec import DEFAULT_SPEC, SPEC_HELP, parse_spec, spec_hint

__all__ = ["DEFAULT_SPEC", "SPEC_HELP", "get_text_encoder", "spec_hint"]


def get_text_encoder(spec: str | None = DEFAULT_SPEC, device: str | torch.device = "cpu") -> TextEncoder:
    """Build the encoder named by ``spec`` (see SPEC_HELP); None or "" selects the offline default."""
    kind, model_name, rest = parse_spec(spec)
    if kind == "minilm":
        return MiniLMEncoder(device=device)
    if kind == "openclip":
        return OpenCLIPEncoder(model_name or DEFAULT_CLIP_MODEL, rest or None, device=device)
    return PrecomputedEncoder(rest)
