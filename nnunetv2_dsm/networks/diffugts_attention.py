"""Cross-attention maps of a diffusers UNet: the probabilities each pixel gives each text token.

diffusers computes these probabilities inside its attention processors and discards them; there is no
public hook that returns them (prompt-to-prompt and DAAM replace the processor for the same reason).
``RecordingAttnProcessor`` is diffusers' plain ``AttnProcessor`` whose ``get_attention_scores`` call is
observed while a ``CrossAttentionStore`` is recording: the forward result is unchanged, and the stored
probabilities keep their autograd graph, so a loss on the maps trains whatever produced the tokens.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch import Tensor, nn


class CrossAttentionStore:
    """Collects (B, L, h, w) maps, averaged over heads, from every cross-attention layer of one call."""

    def __init__(self) -> None:
        self.recording = False
        self.maps: list[Tensor] = []
        self.latent_shape: tuple[int, int] | None = None

    def add(self, probs: Tensor, batch: int) -> None:
        # probs: (B * heads, h * w, L) -> stored (B, L, h, w)
        heads = probs.shape[0] // batch
        tokens = probs.shape[1]
        height, width = self.latent_shape
        factor = math.sqrt(height * width / tokens)
        h, w = round(height / factor), round(width / factor)
        mean = probs.reshape(batch, heads, tokens, -1).mean(1)
        self.maps.append(mean.transpose(1, 2).reshape(batch, -1, h, w))

    def merged(self, size: tuple[int, int]) -> Tensor:
        """Mean over layers of the maps, bilinearly resized to ``size``: (B, L, *size); sums to 1 over L."""
        if not self.maps:
            raise RuntimeError("no cross-attention was recorded: the UNet has no cross-attention layer")
        resized = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in self.maps]
        return torch.stack(resized).mean(0)


class RecordingAttnProcessor(AttnProcessor):
    """diffusers' ``AttnProcessor``; while ``store.recording``, cross-attention probabilities are kept."""

    def __init__(self, store: CrossAttentionStore) -> None:
        super().__init__()
        self.store = store

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        # hidden_states: (B, h*w, C), encoder_hidden_states: (B, L, D) -> (B, h*w, C)
        if encoder_hidden_states is None or not self.store.recording:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        original = attn.get_attention_scores
        batch = hidden_states.shape[0]

        def observed(query: Tensor, key: Tensor, mask: Tensor | None = None) -> Tensor:
            probs = original(query, key, mask)
            self.store.add(probs, batch)
            return probs

        attn.get_attention_scores = observed
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores  # the class method again


def install_recorders(unet: nn.Module, store: CrossAttentionStore) -> int:
    """Give every cross-attention layer of ``unet`` a recording processor; returns how many there are."""
    count = 0
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.set_processor(RecordingAttnProcessor(store))
            count += 1
    return count
