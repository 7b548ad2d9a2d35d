"""Diffusion-guided Query Refinement (DQR, DSM paper section 4.2.2, eqs. 16-19).

"Diffusion" here is anisotropic feature diffusion in the sense of Perona and Malik (a PDE that
smooths a feature map less across semantic boundaries), not a denoising diffusion model. With a
guidance map G (the deeper, semantically stronger feature, upsampled to F's size), one explicit step
at every position i is

    F(i) <- F(i) + lambda * sum_{j in N(i)} w_ij(G) (F(j) - F(i)),
    w_ij = softmax_{j in N(i)} (cos(phi(G_i), phi(G_j)) / tau),

with N(i) the k^d neighbourhood of i (itself included, out-of-image neighbours excluded: zero flux at
the border), phi a learnable 1x1 projection and tau a learnable temperature. Since
cos(a, b) / tau = (1 - |a^ - b^|^2 / 2) / tau for unit vectors, w_ij is a Gaussian (bilateral) kernel
of the guidance difference: a monotonically decreasing diffusivity of the squared guidance gradient,
as in the paper's eq. 16, and a position always weighs its own value most. The weights sum to 1 and
lambda in (0, 1) (sigmoid-parametrised), so every step is a convex combination of neighbours: the
scheme is stable (maximum principle) and a constant feature is a fixed point. The weights depend on G
only, so they are computed once and reused for the T steps. The enhanced feature F_T is fused with the
original by a learned gate, ``F + g * (F_T - F)``, and becomes the key/value of the tumour queries'
masked cross-attention (eq. 19).

The neighbourhood is visited by shifting a padded copy (slices are views), never by stacking k^d
shifted copies of the feature, so memory stays a small multiple of the feature itself in 3d, where
torch has no ``unfold``. The steps run channels last, (B, *S, C): each neighbour's multiply-add is
then one contiguous run over C, several times faster on CPU than strided spatial rows. Without
gradients on CPU the cosines and the steps run in the compiled kernels of ``cpu_kernels``.
"""

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunetv2_dsm.networks import cpu_kernels
from nnunetv2_dsm.networks.masked_attention import MaskedCrossAttention


def resize_to(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bilinear (2d) / trilinear (3d) resize of a feature map; identity when already at ``size``."""
    # x: (B, C, *S) -> (B, C, *size)
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = {2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class GuidedFeatureDiffusion(nn.Module):
    """Guided anisotropic diffusion of a feature map, T explicit steps, then gated fusion with the input.

    ``forward(f, guide)`` returns the fused feature (same shape as f). ``guide`` may have any spatial
    size (it is resized to f's size inside) and ``guide_channels`` channels; ``guide=None`` uses f
    itself (self-guided, for the coarsest scale, which has no deeper feature; needs
    ``guide_channels == channels``).
    """

    def __init__(
        self,
        channels: int,
        guide_channels: int,
        steps: int = 3,
        kernel_size: int = 3,
        step_size: float = 0.5,
        embed_dim: int | None = None,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"GuidedFeatureDiffusion needs steps >= 1, got {steps}.")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"GuidedFeatureDiffusion kernel_size must be odd and >= 3, got {kernel_size}.")
        if not 0.0 < step_size < 1.0:
            raise ValueError(f"GuidedFeatureDiffusion step_size must lie in (0, 1), got {step_size}.")
        if temperature <= 0:
            raise ValueError(f"GuidedFeatureDiffusion temperature must be > 0, got {temperature}.")
        self.channels = channels
        self.guide_channels = guide_channels
        self.steps = steps
        self.kernel_size = kernel_size
        self.guide_proj = nn.Linear(guide_channels, embed_dim or guide_channels)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.step_logit = nn.Parameter(torch.tensor(math.log(step_size / (1.0 - step_size))))
        self.gate = nn.Linear(2 * channels, channels)
        nn.init.zeros_(self.gate.bias)

    @property
    def step_size(self) -> Tensor:
        """lambda in (0, 1): with weights summing to 1 this keeps every step a convex combination."""
        return torch.sigmoid(self.step_logit)

    def _offsets(self, dims: int) -> list[tuple[int, ...]]:
        return list(itertools.product(range(self.kernel_size), repeat=dims))

    def _pad(self, x: Tensor) -> Tensor:
        # x: (B, *S, C) -> (B, *(S + k - 1), C), zero border
        return F.pad(x, [0, 0] + [self.kernel_size // 2] * (2 * (x.ndim - 2)))

    @staticmethod
    def _shift(padded: Tensor, offset: tuple[int, ...], size: tuple[int, ...]) -> Tensor:
        # padded: (B, *(S + k - 1), C) -> view (B, *S, C) of the neighbour at ``offset``
        index = tuple(slice(o, o + s) for o, s in zip(offset, size))
        return padded[(slice(None), *index)]

    def _weights(self, phi: Tensor) -> Tensor:
        # phi: unit similarity embedding phi(G) at F's size, channels last (B, *S, E)
        # -> (B, *S, k^d), neighbour order itertools.product
        size = tuple(phi.shape[1:-1])
        inside_padded = self._pad(torch.ones((1, *size, 1), dtype=torch.bool, device=phi.device))
        offsets = self._offsets(len(size))
        kernels = cpu_kernels.kernels_for(phi)
        if kernels is not None:
            cosine = cpu_kernels.neighbour_cosine(kernels, phi, self.kernel_size)
        else:
            phi_padded = self._pad(phi)
            cosine = torch.stack([(phi * self._shift(phi_padded, o, size)).sum(dim=-1) for o in offsets], dim=-1)
        inside = torch.cat([self._shift(inside_padded, o, size) for o in offsets], dim=-1)
        logits = (cosine.float() / self.log_temperature.exp().float()).masked_fill(~inside, -math.inf)
        return torch.softmax(logits, dim=-1).to(phi.dtype)

    def _step(self, f: Tensor, weights: Tensor) -> Tensor:
        # f: (B, *S, C), weights: (B, *S, k^d) -> (B, *S, C)
        kernels = cpu_kernels.kernels_for(f, weights, self.step_logit)
        if kernels is not None:
            return cpu_kernels.diffusion_step(kernels, f, weights, float(self.step_size), self.kernel_size)
        size = tuple(f.shape[1:-1])
        padded = self._pad(f)
        # sum_j w_ij F_j accumulated in place from views of one padded copy: no per-neighbour copy of F
        # is made, and channels last keeps every multiply-add a contiguous run over C.
        offsets = self._offsets(len(size))
        neighbour_mean = weights[..., :1] * self._shift(padded, offsets[0], size)
        for k, offset in enumerate(offsets[1:], start=1):
            neighbour_mean.addcmul_(weights[..., k : k + 1], self._shift(padded, offset, size))
        flux = neighbour_mean - f * weights.sum(dim=-1, keepdim=True)
        return f + self.step_size.to(f.dtype) * flux

    def neighbourhood_weights(self, g: Tensor) -> Tensor:
        """Diffusion weights w_ij of every position i over its k^d neighbours j (sum 1 over j)."""
        # g: guidance at F's size (B, C_g, *S) -> (B, k^d, *S), neighbour order itertools.product
        return self._weights(F.normalize(self.guide_proj(g.movedim(1, -1)), dim=-1)).movedim(-1, 1)

    def diffusion_step(self, f: Tensor, weights: Tensor) -> Tensor:
        """One explicit step ``F + lambda * sum_j w_ij (F_j - F_i)``."""
        # f: (B, C, *S), weights: (B, k^d, *S) -> (B, C, *S)
        return self._step(f.movedim(1, -1), weights.movedim(1, -1)).movedim(-1, 1)

    def similarity_embedding(self, f: Tensor, guide: Tensor | None) -> Tensor:
        """Unit vectors phi(G) at f's spatial size, channels last: (B, *S, E)."""
        # f: (B, C, *S), guide: (B, C_g, *S_g) | None -> (B, *S, E)
        if guide is None:
            if self.guide_channels != self.channels:
                raise ValueError(
                    f"GuidedFeatureDiffusion without guide uses the feature itself, which needs "
                    f"guide_channels == channels (got {self.guide_channels} and {self.channels})."
                )
            guide = f
        if guide.ndim != f.ndim or guide.shape[0] != f.shape[0] or guide.shape[1] != self.guide_channels:
            raise ValueError(
                f"GuidedFeatureDiffusion guide must be (B={f.shape[0]}, {self.guide_channels}, "
                f"{len(f.shape[2:])} spatial dims), got {tuple(guide.shape)}."
            )
        # The 1x1 projection commutes with the (convex) interpolation, so it runs at the guide's
        # coarser resolution: the same values for a fraction of the work.
        projected = self.guide_proj(guide.movedim(1, -1)).movedim(-1, 1)
        return F.normalize(resize_to(projected, tuple(f.shape[2:])).movedim(1, -1), dim=-1)

    def _diffuse(self, f: Tensor, guide: Tensor | None) -> tuple[Tensor, Tensor]:
        # f: (B, C, *S), guide: (B, C_g, *S_g) | None -> F and F_T, both channels last (B, *S, C)
        if f.ndim not in (4, 5) or f.shape[1] != self.channels:
            raise ValueError(
                f"GuidedFeatureDiffusion expects f (B, {self.channels}, H, W[, D]), got {tuple(f.shape)}."
            )
        weights = self._weights(self.similarity_embedding(f, guide))
        f = f.movedim(1, -1).contiguous()
        enhanced = f
        for _ in range(self.steps):
            enhanced = self._step(enhanced, weights)
        return f, enhanced

    def diffuse(self, f: Tensor, guide: Tensor | None = None) -> Tensor:
        """The enhanced feature F_T after ``steps`` diffusion steps (no fusion)."""
        # f: (B, C, *S), guide: (B, C_g, *S_g) | None -> (B, C, *S)
        return self._diffuse(f, guide)[1].movedim(-1, 1)

    def forward(self, f: Tensor, guide: Tensor | None = None) -> Tensor:
        # f: (B, C, *S), guide: (B, C_g, *S_g) | None -> (B, C, *S), stored channels last
        f, enhanced = self._diffuse(f, guide)
        gate = torch.sigmoid(self.gate(torch.cat([f, enhanced], dim=-1)))
        return (f + gate * (enhanced - f)).movedim(-1, 1)


class DQROutput(NamedTuple):
    """Result of one DQR layer."""

    tumour_queries: Tensor  # (B, N_t, C)
    organ_queries: Tensor  # (B, N_o, C)
    feature: Tensor  # fused, boundary-enhanced feature (B, C, *S): guidance candidate for the next scale


class DQRLayer(nn.Module):
    """One DQR decoder block at one scale, in Mask2Former's layer order:

    1. guided feature diffusion of F_l (guidance: the deeper feature) and fusion -> F'_l;
    2. masked cross-attention of the tumour queries on F'_l, restricted to the AMVP prompt (eq. 19);
    3. self-attention over the concatenation [organ queries; tumour queries];
    4. FFN on all queries.

    Steps 3-4 are post-norm residual blocks (``LayerNorm(q + Dropout(branch(q)))``). The organ queries
    are context for the tumour queries and come back updated too; a caller that keeps organ queries
    fixed in stage 2 simply ignores ``organ_queries`` of the output.
    """

    def __init__(
        self,
        query_dim: int,
        guide_dim: int | None = None,
        num_heads: int = 8,
        ffn_dim: int = 256,
        diffusion_steps: int = 3,
        kernel_size: int = 3,
        step_size: float = 0.5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"query_dim ({query_dim}) must be divisible by num_heads ({num_heads}).")
        self.diffusion = GuidedFeatureDiffusion(
            query_dim, guide_dim or query_dim, steps=diffusion_steps, kernel_size=kernel_size, step_size=step_size
        )
        self.cross_attn = MaskedCrossAttention(query_dim, num_heads, dropout=dropout)
        self.self_attn = nn.MultiheadAttention(query_dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(query_dim)
        self.ffn = nn.Sequential(
            nn.Linear(query_dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, query_dim)
        )
        self.ffn_norm = nn.LayerNorm(query_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tumour_queries: Tensor,
        organ_queries: Tensor,
        feature: Tensor,
        guide: Tensor | None,
        prompt: Tensor | None,
    ) -> DQROutput:
        # tumour_queries: (B, N_t, C), organ_queries: (B, N_o, C), feature: (B, C, *S), guide: (B, C_g, *S_g) | None, prompt: (B, *S) bool | None -> DQROutput
        if prompt is not None and prompt.shape != (feature.shape[0], *feature.shape[2:]):
            raise ValueError(
                f"DQRLayer prompt must match the feature's batch and spatial size "
                f"{(feature.shape[0], *feature.shape[2:])}, got {tuple(prompt.shape)}: resize the "
                f"anomaly score with AnomalyMaskPrompt(size=feature.shape[2:])."
            )
        fused = self.diffusion(feature, guide)
        kv = fused.movedim(1, -1).flatten(1, -2)  # a view when fused is stored channels last
        tumour = self.cross_attn(tumour_queries, kv, None if prompt is None else prompt.flatten(1))
        q = torch.cat([organ_queries, tumour], dim=1)
        attended, _ = self.self_attn(q, q, q, need_weights=False)
        q = self.self_attn_norm(q + self.dropout(attended))
        q = self.ffn_norm(q + self.dropout(self.ffn(q)))
        organ, tumour = q.split([organ_queries.shape[1], tumour_queries.shape[1]], dim=1)
        return DQROutput(tumour, organ, fused)
