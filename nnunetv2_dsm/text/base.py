"""The text-encoder interface used for DSM's class prompt alignment (paper section 4.2.3)."""

from abc import ABC, abstractmethod

import torch


class TextEncoder(ABC):
    """Maps prompts to L2-normalised float32 embeddings, deterministically and without autograd.

    ``encoder_id`` names the embedding space: two encoders with the same id give the same vectors, so a
    model trained with one can be used with the other. ``dim`` is the embedding width.
    """

    encoder_id: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts``; returns a (n, dim) float32 CPU tensor with unit-norm rows."""
        validate_texts(texts)
        with torch.no_grad():
            vectors = self._encode(list(texts))
        # clone() turns inference-mode tensors (sentence-transformers encodes under inference_mode) into
        # ordinary ones that can sit in buffers of a model that is trained later.
        vectors = vectors.detach().to(device="cpu", dtype=torch.float32).clone()
        if vectors.shape != (len(texts), self.dim):
            raise RuntimeError(
                f"text encoder {self.encoder_id!r} returned shape {tuple(vectors.shape)} for {len(texts)} "
                f"prompts, expected ({len(texts)}, {self.dim})"
            )
        return l2_normalise(vectors, source=self.encoder_id)

    @abstractmethod
    def _encode(self, texts: list[str]) -> torch.Tensor:
        """Raw (n, dim) embeddings of already validated texts; normalisation happens in ``encode``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(encoder_id={self.encoder_id!r}, dim={self.dim})"


def validate_texts(texts: list[str]) -> None:
    """Reject what would silently give meaningless embeddings: a bare string, no prompts, blank prompts."""
    if isinstance(texts, str):
        raise TypeError(
            f"encode() takes a list of prompts, got the single string {texts!r}; wrap it: [{texts!r}]"
        )
    if len(texts) == 0:
        raise ValueError("encode() got no prompts; pass at least one non-empty prompt text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {i} is {type(text).__name__} ({text!r}), expected str")
        if not text.strip():
            raise ValueError(
                f"prompt {i} is empty or blank ({text!r}); every class needs a non-empty prompt text, "
                "e.g. 'a computerized tomography of a Liver Tumor'"
            )


def l2_normalise(vectors: torch.Tensor, source: str) -> torch.Tensor:
    """Unit-normalise rows; a zero or non-finite row has no direction, so it is an error, not a NaN."""
    norms = vectors.norm(dim=1, keepdim=True)
    bad = (~torch.isfinite(norms) | (norms <= 1e-12)).squeeze(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{source}: embedding row(s) {rows} are zero or not finite and cannot be normalised")
    return vectors / norms
