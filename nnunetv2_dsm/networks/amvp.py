"""Anomaly Mask Visual Prompt (AMVP, DSM paper section 4.2.1, eqs. 14-15).

Organ queries respond strongly wherever a voxel looks like one of the known organs, so the negative
of the strongest organ response is an anomaly score: ``S(x) = -max_n R_n(x)``. The score is min-max
normalised PER CASE (each batch element on its own, so one case's contrast never rescales another's)
and thresholded into a prompt ``M = S > 0.5`` that tells the tumour queries' masked cross-attention
where to look. The normalised score is also the exported anomaly map.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def minmax_per_case(x: Tensor) -> Tensor:
    """Min-max normalise every batch element of ``x`` (B, *S) to [0, 1] on its own.

    A case whose values are constant (range within float rounding of its magnitude) maps to zeros:
    there is no contrast to call anything anomalous. The check is relative, so rescaling a case never
    changes its result, and the division is guarded so neither the value nor its gradient is nan.
    """
    # x: (B, *S) -> (B, *S)
    if x.ndim < 2:
        raise ValueError(f"minmax_per_case expects (B, *spatial), got shape {tuple(x.shape)}.")
    flat = x.flatten(1)
    lo = flat.amin(dim=1)
    hi = flat.amax(dim=1)
    span = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    varying = span > torch.finfo(x.dtype).eps * scale
    safe_span = torch.where(varying, span, torch.ones_like(span))
    view = (-1,) + (1,) * (x.ndim - 1)
    normalised = (x - lo.view(view)) / safe_span.view(view)
    return normalised * varying.view(view).to(x.dtype)


def anomaly_score(responses: Tensor) -> Tensor:
    """Per-case normalised anomaly score ``minmax(-max_n R_n(x))`` in [0, 1]."""
    # responses: (B, N_organ, *S) -> (B, *S)
    if responses.ndim < 3 or responses.shape[1] < 1:
        raise ValueError(
            f"anomaly_score expects organ-query responses (B, N_organ >= 1, *spatial), got shape "
            f"{tuple(responses.shape)}."
        )
    return minmax_per_case(-responses.amax(dim=1))


def anomaly_prompt(score: Tensor, threshold: float = 0.5) -> Tensor:
    """Boolean prompt ``M = S > threshold``: True where the tumour queries may attend."""
    # score: (B, *S) -> (B, *S) bool
    return score > threshold


class AnomalyMaskPrompt(nn.Module):
    """Anomaly score and prompt mask from the organ-query responses of one scale.

    The raw score ``-max_n R_n`` is resized first (bilinear in 2d, trilinear in 3d) when
    ``size`` is given, and normalised afterwards, so every case spans exactly [0, 1] at the size the
    prompt is used at and the 0.5 threshold keeps its meaning. The module has no parameters; the
    score keeps the autograd graph of ``responses`` (the mask is boolean and carries none).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"AnomalyMaskPrompt threshold must lie in [0, 1), got {threshold}.")
        self.threshold = threshold

    def forward(self, responses: Tensor, size: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        # responses: (B, N_organ, *S) -> (score: (B, *S'), prompt: (B, *S') bool), S' = size or S
        if responses.ndim not in (4, 5) or responses.shape[1] < 1:
            raise ValueError(
                f"AnomalyMaskPrompt expects (B, N_organ >= 1, H, W[, D]) responses, got shape "
                f"{tuple(responses.shape)}."
            )
        raw = -responses.amax(dim=1)
        if size is not None and tuple(size) != tuple(raw.shape[1:]):
            if len(size) != raw.ndim - 1:
                raise ValueError(
                    f"AnomalyMaskPrompt size {tuple(size)} has {len(size)} dims, responses have "
                    f"{raw.ndim - 1} spatial dims."
                )
            mode = "bilinear" if raw.ndim == 3 else "trilinear"
            raw = F.interpolate(raw.unsqueeze(1), size=tuple(size), mode=mode, align_corners=False)[:, 0]
        score = minmax_per_case(raw)
        return score, anomaly_prompt(score, self.threshold)
