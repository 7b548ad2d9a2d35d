"""Prediction heads on object queries: query-pixel mask products and the per-query class MLP."""

import torch
from torch import nn


class ProjectedDotProduct(nn.Module):
    """Dot products between queries and linearly projected pixel features.

    ``forward(q, f)`` equals ``einsum('bnc,bc...->bn...', q, embed(f))`` but applies the projection
    to the N queries instead of the L pixels (``q . (W f + b) = (W^T q) . f + q . b``), which costs
    N * C_in per pixel instead of C * C_in + N * C and never materialises the projected
    full-resolution feature map. This matters for 3d patches, where the pixel embedding would
    otherwise be the largest activation of the network.
    """

    def __init__(self, in_channels: int, query_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_channels, query_dim)

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        # f: (B, C_in, *S) -> (B, C, *S)
        out = torch.einsum("ci,bi...->bc...", self.proj.weight, f)
        return out + self.proj.bias.view(1, -1, *([1] * (f.ndim - 2)))

    def forward(self, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        # q: (B, N, C), f: (B, C_in, *S) -> (B, N, *S)
        # One batched product straight into the output, bias included: no permuted copy of f.
        logits = torch.baddbmm((q @ self.proj.bias).unsqueeze(-1), q @ self.proj.weight, f.flatten(2))
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
