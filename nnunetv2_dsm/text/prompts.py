"""Class prompt embeddings t_c (paper section 4.2.3) and the check that a model meets its own encoder."""

import torch

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.text.base import TextEncoder
from nnunetv2_dsm.text.spec import spec_hint
from nnunetv2_dsm.vocabulary import prompt_for


class EncoderMismatchError(DSMError, ValueError):
    """A model trained with one text encoder was given another."""


def class_prompt_embeddings(encoder: TextEncoder, class_names: list[str]) -> torch.Tensor:
    """Embeddings of "a computerized tomography of a {CLS}" for each class: (C, dim), unit-norm float32.

    Canonical snake_case names use their display names; any other name (an unseen class) is used verbatim.
    """
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty list of class names, got {class_names!r}")
    for i, name in enumerate(class_names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class name {i} is empty or blank ({name!r}); every class needs a name")
    return encoder.encode([prompt_for(name.strip()) for name in class_names])


def check_encoder_matches(stored_id: str, encoder: TextEncoder) -> None:
    """Raise EncoderMismatchError unless ``encoder`` produces the embedding space the model was trained in."""
    if stored_id == encoder.encoder_id:
        return
    hint = spec_hint(stored_id)
    digest = stored_id.rpartition(":sha256-")[2] if ":sha256-" in stored_id else ""
    weights_note = f" (the weight file whose SHA-256 starts with {digest})" if digest else ""
    raise EncoderMismatchError(
        f"this model was trained with text encoder {stored_id!r}, but {encoder.encoder_id!r} was given. "
        "Embeddings of different encoders live in different spaces, so prompts would be compared against the "
        f"wrong vectors. Use --text-encoder {hint}{weights_note}, or a precomputed embeddings file made with "
        f"that encoder (`nnunetv2_dsm embed --text-encoder {hint} -o emb.pt ...`, then --text-encoder file:emb.pt)."
    )
