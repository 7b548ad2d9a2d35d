"""Class-head BCE on per-patch class presence over annotated (case, class) pairs (paper eq. 13)."""

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_dsm.losses.availability import check_available, masked_pair_mean


def class_presence(target: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: class n is present in case b's patch when any voxel of ``target[b, n]`` is set."""
    if target.ndim < 3:
        raise ValueError(f"target must be (B, N, *spatial), got shape {tuple(target.shape)}")
    return target.flatten(2).bool().any(-1)


class ClassPresenceBCE(nn.Module):
    """BCE between class-head logits and class presence, averaged over available (case, class) pairs.

    A class that is not annotated in a case is unknown rather than absent, so it is left out of the
    average and gets no gradient. A batch without any available pair gives 0.
    """

    def forward(self, class_logits: torch.Tensor, target: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        # class_logits: (B, N), target: (B, N) presence or (B, N, *S) masks, available: (B, N) bool -> scalar
        if class_logits.ndim != 2:
            raise ValueError(f"class_logits must be (B, N), got shape {tuple(class_logits.shape)}")
        presence = target if target.ndim == 2 else class_presence(target)
        if presence.shape != class_logits.shape:
            raise ValueError(
                f"class presence {tuple(presence.shape)} does not match class_logits {tuple(class_logits.shape)}"
            )
        available = check_available(available, *class_logits.shape)
        bce = F.binary_cross_entropy_with_logits(
            class_logits.float(), presence.to(torch.float32), reduction="none"
        )
        return masked_pair_mean(bce, available)
