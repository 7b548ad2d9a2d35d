"""Text encoders for DSM's class prompt alignment: MiniLM (offline default), OpenCLIP, precomputed files."""

from nnunetv2_dsm.text.base import TextEncoder
from nnunetv2_dsm.text.clip import MissingWeightsError, OpenCLIPEncoder
from nnunetv2_dsm.text.factory import DEFAULT_SPEC, SPEC_HELP, get_text_encoder, spec_hint
from nnunetv2_dsm.text.minilm import MINILM_ID, MiniLMEncoder
from nnunetv2_dsm.text.precomputed import (
    MissingPromptError,
    PrecomputedEncoder,
    load_embeddings,
    save_embeddings,
)
from nnunetv2_dsm.text.prompts import EncoderMismatchError, check_encoder_matches, class_prompt_embeddings

__all__ = [
    "DEFAULT_SPEC",
    "MINILM_ID",
    "SPEC_HELP",
    "EncoderMismatchError",
    "MiniLMEncoder",
    "MissingPromptError",
    "MissingWeightsError",
    "OpenCLIPEncoder",
    "PrecomputedEncoder",
    "TextEncoder",
    "check_encoder_matches",
    "class_prompt_embeddings",
    "get_text_encoder",
    "load_embeddings",
    "save_embeddings",
    "spec_hint",
]
