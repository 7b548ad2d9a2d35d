"""Deep supervision for losses that take a per-case class availability mask."""

from collections.abc import Sequence

import torch
from torch import nn


class PartialLabelDeepSupervision(nn.Module):
    """Weighted sum of ``loss(logits_i, target_i, available)`` over deep-supervision scales.

    nnU-Net's ``DeepSupervisionWrapper`` zips every argument as a per-scale list; the availability
    mask is per case, not per scale, so one mask is passed unchanged to every scale here. A list of
    masks, one per output, gives outputs their own (DSM stage 2: its stage-1 outputs count only the
    classes that have a stage-1 query). Scales with weight 0 are not evaluated (nnU-Net gives the
    coarsest scales weight 0).
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if weights is not None and not any(w != 0 for w in weights):
            raise ValueError(f"at least one deep supervision weight must be non-zero, got {list(weights)}")
        self.loss = loss
        self.weights = tuple(float(w) for w in weights) if weights is not None else None

    def forward(
        self, logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
        available: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        # logits[i]: (B, C, *S_i), targets[i]: (B, C, *S_i), available: (B, C) bool or one per output -> scalar
        if not isinstance(logits, (list, tuple)) or not isinstance(targets, (list, tuple)):
            raise TypeError(
                f"logits and targets must be lists of per-scale tensors, got {type(logits).__name__} and "
                f"{type(targets).__name__}; enable deep supervision or call the wrapped loss directly"
            )
        if len(logits) != len(targets):
            raise ValueError(f"got {len(logits)} logit scales but {len(targets)} target scales")
        weights = self.weights if self.weights is not None else (1.0,) * len(logits)
        if len(weights) < len(logits):
            raise ValueError(f"got {len(logits)} scales but only {len(weights)} deep supervision weights")
        if isinstance(available, (list, tuple)):
            if len(available) != len(logits):
                raise ValueError(f"got {len(logits)} outputs but {len(available)} availability masks")
            masks = available
        else:
            masks = [available] * len(logits)
        return sum(
            w * self.loss(out, tgt, avail) for w, out, tgt, avail in zip(weights, logits, targets, masks) if w != 0
        )
