"""k-Means Mask Mamba (kMMM) decoder layer (DSM paper section 4.1.1, after kMaX-DeepLab).

One layer, at one feature level F_l (already projected to ``query_dim``):

1. query response ``R = s cos(W proj_q(Q), F_l) + b`` (``heads.NormalisedMaskProduct``): (B, N, L)
   with L = h*w(*d); scaled cosines keep R, the input of the SSM, bounded by s during training;
2. ``M_l = R + SSM(SiLU(R))``: a Mamba block scans the flattened spatial sequence with the N query
   responses as channels. The SSM is residual, as Mamba blocks are used in U-Mamba and Vision Mamba,
   so ``use_ssm=False`` (``M_l = R``) is exactly the layer without it. M_l are the layer's mask logits
   and are returned for deep supervision: the argmax below is not differentiable, so this output is
   the path by which proj_q, proj_f and the SSM receive gradients (without deep supervision the
   assignment passes a straight-through gradient instead, ``kmeans_assignment``);
3. query update, either
   - k-means (kMaX-DeepLab): cluster-wise argmax of M_l over queries gives a one-hot assignment A
     and ``Q <- Q + LN(A . V(F_l))``, the per-cluster SUM of value features. kMaX normalises this
     sum with a 1x1 conv + BatchNorm; a LayerNorm is used here because 3d batches hold two volumes;
   - or masked cross-attention (Mask2Former, ``masked_attention.MaskedCrossAttention``, post-norm
     residual): softmax over pixels restricted to ``M_l > 0``, a query with an empty mask attending
     everywhere;
4. query self-attention and FFN, each ``Q <- GELU(Q + Norm(branch(Q)))`` as in kMaX-DeepLab's
   transformer layer (LayerNorm in place of BatchNorm).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from nnunetv2_dsm.networks.heads import NormalisedMaskProduct
from nnunetv2_dsm.networks.masked_attention import MaskedCrossAttention
from nnunetv2_dsm.networks.ssm import SSM


def kmeans_assignment(mask_logits: torch.Tensor, straight_through: bool = False, void: bool = False) -> torch.Tensor:
    """One-hot cluster assignment of every pixel to its arg-max query.

    With ``void``, a pixel that no query claims (every mask logit below 0, i.e. sigmoid below 0.5:
    background for sigmoid organ masks, which have no background query) joins no cluster, so
    background pixels are not summed into the organ queries' updates.

    Without gradient, as in kMaX-DeepLab, where every layer's mask logits are supervised. With
    ``straight_through`` the forward value is the same one-hot map and the gradient is that of the
    softmax over queries (straight-through estimator), so the mask logits, and the SSM that forms them,
    also learn when no deep supervision reaches them.
    """
    # mask_logits: (B, N, L) -> (B, N, L)
    index = mask_logits.detach().argmax(dim=1, keepdim=True)
    hard = torch.zeros_like(mask_logits, memory_format=torch.contiguous_format).scatter_(1, index, 1.0)
    claimed = (mask_logits.detach().amax(dim=1, keepdim=True) > 0).to(hard.dtype) if void else None
    if void:
        hard = hard * claimed
    if not straight_through:
        return hard
    soft = mask_logits.float().softmax(dim=1).to(mask_logits.dtype)
    if void:
        soft = soft * claimed
    return hard + (soft - soft.detach())


class KMeansClusterUpdate(nn.Module):
    """Per-cluster sum of value features ``sum_{l in cluster n} V(f_l)``.

    V is linear, so the sum is taken over the raw features first and projected once per cluster
    (``W (A f) + |cluster| b``), which avoids projecting every pixel.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value = nn.Linear(dim, dim)

    def forward(self, assignment: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        # assignment: (B, N, L) one-hot over N, f: (B, C, L) -> (B, N, C)
        # Sums over up to ~10^5 pixels overflow half precision, so this runs in float32 (as in kMaX).
        with torch.autocast(f.device.type, enabled=False):
            assignment, f = assignment.float(), f.float()
            pooled = torch.bmm(assignment, f.transpose(1, 2))
            counts = assignment.sum(dim=-1, keepdim=True)
            return pooled @ self.value.weight.float().t() + counts * self.value.bias.float()


class KMMMLayer(nn.Module):
    """One kMMM decoder layer; see the module docstring for the computation."""

    def __init__(
        self,
        num_queries: int,
        query_dim: int,
        num_heads: int = 4,
        ffn_dim: int = 256,
        ssm_d_state: int = 16,
        ssm_d_conv: int = 4,
        ssm_expand: int = 2,
        ssm_bidirectional: bool = True,
        use_kmeans: bool = True,
        use_ssm: bool = True,
        kmeans_void: bool = False,
        update_queries: bool = True,
        update_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= update_dropout < 1.0:
            raise ValueError(f"update_dropout must lie in [0, 1), got {update_dropout}.")
        self.update_dropout = update_dropout
        self.kmeans_void = kmeans_void
        self.update_queries = update_queries
        if query_dim % num_heads:
            raise ValueError(f"query_dim ({query_dim}) must be divisible by num_heads ({num_heads}).")
        self.use_kmeans = use_kmeans
        self.query_proj = nn.Linear(query_dim, query_dim)
        self.response = NormalisedMaskProduct(query_dim, query_dim)
        self.ssm = (
            SSM(
                num_queries,
                d_state=ssm_d_state,
                d_conv=ssm_d_conv,
                expand=ssm_expand,
                bidirectional=ssm_bidirectional,
            )
            if use_ssm
            else None
        )
        self.update = (
            KMeansClusterUpdate(query_dim) if use_kmeans else MaskedCrossAttention(query_dim, num_heads)
        )
        # The masked cross-attention layer has its own residual and norm.
        self.update_norm = nn.LayerNorm(query_dim) if use_kmeans else None
        self.self_attn = nn.MultiheadAttention(query_dim, num_heads, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(query_dim)
        self.ffn = nn.Sequential(nn.Linear(query_dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, query_dim))
        self.ffn_norm = nn.LayerNorm(query_dim)

    def mask_logits(self, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Post-SSM mask logits M_l of the queries on flattened features."""
        # q: (B, N, C), f: (B, C, L) -> (B, N, L)
        r = self.response(self.query_proj(q), f)
        if self.ssm is None:
            return r
        return r + self.ssm(F.silu(r).transpose(1, 2)).transpose(1, 2)

    def forward(self, q: torch.Tensor, f: torch.Tensor,
                straight_through: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (B, N, C), f: (B, C, *S) -> (q: (B, N, C), M_l: (B, N, *S))
        spatial = f.shape[2:]
        f = f.flatten(2)
        m = self.mask_logits(q, f)
        # update_queries=False (diagnostic): image-independent queries, self-attention and FFN only
        if self.update_queries and self.use_kmeans:
            update = self.update_norm(self.update(kmeans_assignment(m, straight_through, self.kmeans_void), f))
            # Stochastic depth on the image-dependent update (per sample): each layer's masks must also be
            # right from the queries without it, so the answer does not rest on the update alone.
            q = q + stochastic_depth(update, self.update_dropout, "row", self.training)
        elif self.update_queries:
            q = self.update(q, f.transpose(1, 2), m.detach() > 0)
        attended, _ = self.self_attn(q, q, q, need_weights=False)
        q = F.gelu(q + self.self_attn_norm(attended))
        q = F.gelu(q + self.ffn_norm(self.ffn(q)))
        return q, m.reshape(*m.shape[:2], *spatial)
