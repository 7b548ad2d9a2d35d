"""Text encoders for DSM's class prompt alignment: MiniLM (offline default), OpenCLIP, precomputed files.

Names are imported on first use (PEP 562), so ``from nnunetv2_dsm.text.spec import SPEC_HELP`` and
command-line help do not import torch.
"""

import importlib

_EXPORTS = {
    "TextEncoder": "base",
    "MissingWeightsError": "clip",
    "OpenCLIPEncoder": "clip",
    "DEFAULT_SPEC": "spec",
    "SPEC_HELP": "spec",
    "MINILM_ID": "spec",
    "spec_hint": "spec",
    "get_text_encoder": "factory",
    "MiniLMEncoder": "minilm",
    "MissingPromptError": "precomputed",
    "PrecomputedEncoder": "precomputed",
    "load_embeddings": "precomputed",
    "save_embeddings": "precomputed",
    "EncoderMismatchError": "prompts",
    "check_encoder_matches": "prompts",
    "class_prompt_embeddings": "prompts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
