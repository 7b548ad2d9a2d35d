"""Partial-label losses of DSM: Dice + BCE and class-presence BCE over annotated (case, class) pairs."""

from nnunetv2_dsm.losses.availability import availability_from_keys, masked_pair_mean
from nnunetv2_dsm.losses.class_presence import ClassPresenceBCE, class_presence
from nnunetv2_dsm.losses.deep_supervision import PartialLabelDeepSupervision
from nnunetv2_dsm.losses.partial_dice_bce import PartialLabelDiceBCELoss

__all__ = [
    "ClassPresenceBCE",
    "PartialLabelDeepSupervision",
    "PartialLabelDiceBCELoss",
    "availability_from_keys",
    "class_presence",
    "masked_pair_mean",
]
