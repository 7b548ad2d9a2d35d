"""Dice + BCE over annotated (case, class) pairs for sigmoid multi-label outputs (paper eq. 11-12)."""

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_dsm.losses.availability import check_available, masked_pair_mean


class PartialLabelDiceBCELoss(nn.Module):
    """nnU-Net's ``DC_and_BCE_loss`` (region training, ``MemoryEfficientSoftDiceLoss``) restricted to
    the (case, class) pairs that are annotated.

    With every pair available the value equals nnU-Net's loss: the BCE is the mean over all voxels of
    all channels and the Dice term is ``-mean(dc)`` (nnU-Net's sign convention, no ``1 -`` offset), with
    ``dc = (2 I + smooth) / (G + P + smooth)``; ``batch_dice`` sums I, G, P over the batch per class
    before the ratio. With partial availability:

    - BCE is averaged over the voxels of available pairs only;
    - per-case Dice is averaged over available pairs; batch Dice sums I, G, P over the available cases
      of each class and averages over classes with at least one available case.

    An unavailable pair is dropped from numerator and denominator alike, so it contributes neither a
    constant Dice of 1 (what an empty channel scores with ``smooth``) nor a gradient. A batch with no
    available pair gives 0. The Dice term keeps nnU-Net's negative convention, so the loss value is
    comparable with nnU-Net's logs; its gradient is identical to that of ``1 - dice``.
    """

    def __init__(
        self, weight_dice: float = 1.0, weight_bce: float = 1.0, smooth: float = 1e-5, batch_dice: bool = False
    ) -> None:
        super().__init__()
        self.weight_dice = weight_dice
        self.weight_bce = weight_bce
        self.smooth = smooth
        self.batch_dice = batch_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        # logits: (B, C, *S), target: (B, C, *S) in {0, 1}, available: (B, C) bool -> scalar
        if logits.ndim < 3 or logits.shape != target.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must both be (B, C, *spatial); "
                "targets must be region (one channel per class) masks, not a label map"
            )
        available = check_available(available, logits.shape[0], logits.shape[1])
        # float32 island under autocast: sigmoid, BCE and the Dice sums over up to ~10^6 voxels would lose
        # precision (bfloat16) or overflow (float16 above 65504) in reduced precision.
        with torch.autocast(logits.device.type, enabled=False):
            return self._loss(logits.float(), target, available)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        # logits: (B, C, *S) float32 -> scalar
        axes = tuple(range(2, logits.ndim))
        with torch.no_grad():
            y = target.to(torch.float32)

        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        bce_term = masked_pair_mean(bce.mean(axes, dtype=torch.float32), available)

        x = torch.sigmoid(logits)
        intersect = (x * y).sum(axes, dtype=torch.float32)
        sum_pred = x.sum(axes, dtype=torch.float32)
        sum_gt = y.sum(axes, dtype=torch.float32)
        if self.batch_dice:
            weight = available.to(torch.float32)
            intersect = (intersect * weight).sum(0)
            sum_pred = (sum_pred * weight).sum(0)
            sum_gt = (sum_gt * weight).sum(0)
            dice_available = available.any(0)
        else:
            dice_available = available
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + float(self.smooth)).clamp_min(1e-8)
        dice_term = -masked_pair_mean(dc, dice_available)

        return self.weight_bce * bce_term + self.weight_dice * dice_term
