"""Prediction heads on object queries: query-pixel mask products and the per-query class MLP."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class NormalisedMaskProduct(nn.Module):
    """Mask logits as scaled, softly normalised products of projected queries and pixel features.

    ``forward(q, f) = s * <k / |k|, f> / sqrt(|f|^2 + C_in) + b`` with the mask kernel ``k = W q + c``
    (one linear map of each query into the pixel-feature space), a learnable scale ``s`` (stored as
    its log, no weight decay) and a learnable bias ``b``.

    Unnormalised products grow without bound during training (logits in the hundreds after a few
    dozen SGD steps), and in the kMMM decoder these logits are the input of the state-space scan,
    whose backward then overflows. kMaX-DeepLab L2-normalises its pixel features for the same
    reason. Here the logits are bounded by ``s`` as well, but the pixel side is normalised softly: a
    feature whose norm is well above ``sqrt(C_in)`` (the norm of a unit-variance feature, what the
    decoder's normalised conv blocks produce) gives the cosine, a weak feature gives a logit near the
    bias instead of a confident cosine of a noisy direction (a full L2 normalisation made
    low-activation pixels of an unseen scanner as confident as organ pixels). The initial
    ``s = max(4, sqrt(C_in))`` makes the logits O(1) at initialisation.

    The kernel is formed for the N queries only; pixels contribute their norm, a (B, 1, L) tensor, so
    no projected copy of the full-resolution feature map is materialised.
    """

    def __init__(self, in_channels: int, query_dim: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.kernel = nn.Linear(query_dim, in_channels)
        self.log_scale = nn.Parameter(torch.tensor(math.log(max(4.0, math.sqrt(in_channels)))))
        self.log_scale._no_weight_decay = True
        self.bias = nn.Parameter(torch.zeros(()))
        self.bias._no_weight_decay = True

    def _inverse_norm(self, f: torch.Tensor) -> torch.Tensor:
        # f: (B, C_in, ...) -> (B, 1, ...): 1 / sqrt(|f|^2 + C_in), in float32
        return (f.float().square().sum(1, keepdim=True) + self.in_channels).rsqrt()

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        """The pixel embedding E = f / sqrt(|f|^2 + C_in) (norm below 1)."""
        # f: (B, C_in, *S) -> (B, C_in, *S)
        return f * self._inverse_norm(f).to(f.dtype)

    def kernels(self, q: torch.Tensor) -> torch.Tensor:
        """Mask kernels ``s * k / |k|``, so that ``logits = kernels . E + b``."""
        # q: (B, N, C) -> (B, N, C_in)
        return F.normalize(self.kernel(q), dim=-1, eps=1e-6) * self.log_scale.exp()

    def forward(self, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        # q: (B, N, C), f: (B, C_in, *S) -> (B, N, *S)
        flat = f.flatten(2)
        inv_norm = self._inverse_norm(flat).to(f.dtype)
        logits = torch.bmm(self.kernels(q).to(f.dtype), flat).mul_(inv_norm).add_(self.bias.to(f.dtype))
        return logits.view(*q.shape[:2], *f.shape[2:])


class ClassHead(nn.Module):
    """Per-query presence logit (one query per class, sigmoid/BCE outside the network)."""

    def __init__(self, query_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or query_dim
        self.mlp = nn.Sequential(
            nn.Linear(query_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        # q: (B, N, C) -> (B, N)
        return self.mlp(q).squeeze(-1)
