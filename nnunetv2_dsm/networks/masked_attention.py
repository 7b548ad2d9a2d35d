"""Masked cross-attention of queries to pixel features (Mask2Former, Cheng et al. 2022, eq. 19 of DSM).

Each query attends only to the positions its boolean mask allows (True = allowed). A query whose
allowed set is empty attends everywhere, as Mask2Former does, so the softmax never runs over an empty
set (which would give nan). The attention itself is ``torch.nn.functional.scaled_dot_product_attention``
with a boolean mask broadcast over heads, so no per-head copy of the (Nq, L) mask is made; the layer
is post-norm with a residual, as Mask2Former's ``CrossAttentionLayer``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def allowed_or_everything(mask: Tensor) -> Tensor:
    """Replace every all-False row (a query with no allowed position) by all-True."""
    # mask: (..., L) bool -> (..., L) bool
    return mask | ~mask.any(dim=-1, keepdim=True)


class MaskedCrossAttention(nn.Module):
    """``q <- LayerNorm(q + Dropout(MHA(q + query_pos, kv + kv_pos, kv, mask)))``.

    ``mask`` is (B, Nq, L) or (B, L) (the same mask for every query) with True where attention is
    allowed, or None for full attention. ``query_pos`` / ``kv_pos`` are optional positional embeddings
    added to queries and keys (not values), as in Mask2Former.
    """

    def __init__(self, query_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"query_dim ({query_dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.dropout_p = dropout
        self.q_proj = nn.Linear(query_dim, query_dim)
        self.k_proj = nn.Linear(query_dim, query_dim)
        self.v_proj = nn.Linear(query_dim, query_dim)
        self.out_proj = nn.Linear(query_dim, query_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(query_dim)

    def _heads(self, x: Tensor) -> Tensor:
        # x: (B, N, C) -> (B, heads, N, C / heads)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def attend(
        self,
        q: Tensor,
        kv: Tensor,
        mask: Tensor | None = None,
        query_pos: Tensor | None = None,
        kv_pos: Tensor | None = None,
    ) -> Tensor:
        """The attention branch alone (output projection included, no residual, dropout or norm)."""
        # q: (B, Nq, C), kv: (B, L, C), mask: (B, Nq, L) | (B, L) bool | None -> (B, Nq, C)
        if q.ndim != 3 or kv.ndim != 3 or q.shape[0] != kv.shape[0] or q.shape[2] != kv.shape[2]:
            raise ValueError(
                f"MaskedCrossAttention expects q (B, Nq, C) and kv (B, L, C), got {tuple(q.shape)} and "
                f"{tuple(kv.shape)}."
            )
        attn_mask = None
        if mask is not None:
            batch, num_queries, length = q.shape[0], q.shape[1], kv.shape[1]
            if mask.dtype != torch.bool:
                raise ValueError(f"MaskedCrossAttention mask must be bool (True = allowed), got {mask.dtype}.")
            if mask.shape == (batch, length):
                mask = mask.unsqueeze(1)
            elif mask.shape != (batch, num_queries, length):
                raise ValueError(
                    f"MaskedCrossAttention mask must be (B, Nq, L) = {(batch, num_queries, length)} or "
                    f"(B, L) = {(batch, length)}, got {tuple(mask.shape)}."
                )
            attn_mask = allowed_or_everything(mask).unsqueeze(1)
        keys = kv if kv_pos is None else kv + kv_pos
        queries = q if query_pos is None else q + query_pos
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(queries)),
            self._heads(self.k_proj(keys)),
            self._heads(self.v_proj(kv)),
            attn_mask=attn_mask,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(
        self,
        q: Tensor,
        kv: Tensor,
        mask: Tensor | None = None,
        query_pos: Tensor | None = None,
        kv_pos: Tensor | None = None,
    ) -> Tensor:
        # q: (B, Nq, C), kv: (B, L, C), mask: (B, Nq, L) | (B, L) bool | None -> (B, Nq, C)
        return self.norm(q + self.dropout(self.attend(q, kv, mask, query_pos, kv_pos)))

