"""Anomaly Mask Visual Prompt (AMVP, DSM paper section 4.2.1, eqs. 14-15).

Organ queries respond strongly wherever a voxel looks like one of the known organs, so the negative
of the strongest organ response is an anomaly score: ``S(x) = -max_n R_n(x)``. The score is min-max
normalised PER CASE (each batch element on its own, so one case's contrast never rescales another's)
and thresholded into a prompt ``M = S > 0.5`` that tells the tumour queries' masked cross-attention
where to look. The normalised score is also the exported anomaly map.

In sliding-window inference "the case" the network sees is one tile. ``AnomalyMaskPrompt`` can
instead normalise with the range of the whole case: ``record_case_range()`` before a first pass over
all tiles collects, per level, the smallest and largest raw score; ``use_case_range()`` then fixes
those for the second pass; ``clear_case_range()`` returns to per-input normalisation (training, and
the default at inference; ``nnunetv2_dsm predict --amvp-range case`` selects the two-pass mode).
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
        self._recorded: dict[int, tuple[float, float]] | None = None
        self.case_range: dict[int, tuple[float, float]] | None = None

    def record_case_range(self) -> None:
        """Collect, per level, the raw score range of every input from now on (first inference pass)."""
        self._recorded, self.case_range = {}, None

    def use_case_range(self) -> None:
        """Normalise every level with the range recorded since ``record_case_range`` (second pass)."""
        if self._recorded is None:
            raise RuntimeError("use_case_range() needs a pass after record_case_range() first")
        self.case_range, self._recorded = dict(self._recorded), None

    def clear_case_range(self) -> None:
        self._recorded, self.case_range = None, None

    def _normalise(self, raw: Tensor, level: int | None) -> Tensor:
        if self._recorded is not None and level is not None:
            lo, hi = float(raw.amin()), float(raw.amax())
            old = self._recorded.get(level, (lo, hi))
            self._recorded[level] = (min(lo, old[0]), max(hi, old[1]))
        if self.case_range is not None and level in self.case_range:
            lo, hi = self.case_range[level]
            return ((raw - lo) / max(hi - lo, 1e-12)).clamp(0.0, 1.0)
        return minmax_per_case(raw)

    def forward(self, responses: Tensor, size: Sequence[int] | None = None,
                level: int | None = None) -> tuple[Tensor, Tensor]:
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
        score = self._normalise(raw, level)
        return score, anomaly_prompt(score, self.threshold)
