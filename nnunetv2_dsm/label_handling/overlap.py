"""One label per voxel from independent (sigmoid) class probabilities.

Sigmoid classes may overlap: where several exceed 0.5, the voxel takes the one with the highest
priority (a region nested in another, e.g. a tumour inside its organ, outranks the organ), and among
equal priorities the more probable class, as in Mask2Former's semantic inference. nnU-Net's region
export instead paints the classes in label order, so that of two organs both above 0.5 the one with
the higher label id always wins, whatever their probabilities.
"""

from collections.abc import Sequence

import torch
from torch import Tensor


def most_probable_label(probabilities: Tensor, priority: Sequence[int]) -> Tensor:
    """Channel index + 1 of the highest-priority, then most probable, class above 0.5; 0 where none is."""
    # probabilities: (C, *S) in [0, 1] -> (*S) int64
    rank = probabilities.float() + 2.0 * torch.as_tensor(priority, dtype=torch.float32, device=probabilities.device).view(
        -1, *[1] * (probabilities.ndim - 1))
    rank = rank.masked_fill(probabilities <= 0.5, -1.0)
    best = rank.max(dim=0)
    return torch.where(best.values >= 0, best.indices + 1, 0)


def nesting_depth(regions: Sequence[Sequence[int]]) -> list[int]:
    """For each region (its label ids), how many other regions strictly contain it."""
    sets = [frozenset(r) for r in regions]
    return [sum(s < other for other in sets) for s in sets]
