"""Per-case class availability (partial labels) and averaging over annotated (case, class) pairs.

A DSM training set merges datasets that each annotate only some classes. ``dataset.json`` records
which label names each case annotates in ``["dsm"]["class_availability"]`` (read by
``nnunetv2_dsm.dataset.DSMDataset``); a case that is not listed annotates every label. Losses are averaged over the available pairs only, so an
unannotated channel neither adds to the loss nor receives a gradient.
"""

import torch

from nnunetv2_dsm.dataset import DSMDataset


def availability_from_keys(keys, dataset: DSMDataset, class_names, device: torch.device | str | None = None
                           ) -> torch.Tensor:
    """(B, C) bool mask: entry (b, c) is True when case ``keys[b]`` annotates ``class_names[c]``.

    ``class_names`` are the output channels in network order (the foreground labels or regions of the
    dataset); the table itself was read and checked once, when ``dataset`` was built.
    """
    available = torch.from_numpy(dataset.availability_mask(list(keys), list(class_names)))
    return available.to(device) if device is not None else available


def masked_pair_mean(values: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the True entries of ``available`` (same shape); 0 when none is True.

    Masking by multiplication (not boolean indexing) keeps shapes static, avoids a device sync,
    and gives masked entries an exactly zero gradient. The empty case returns a zero that stays
    connected to the graph, so ``backward`` works on a batch without any annotation.
    """
    if values.shape != available.shape:
        raise ValueError(f"values {tuple(values.shape)} and available {tuple(available.shape)} differ in shape")
    weight = available.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def check_available(available: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """Validate a (B, C) availability mask against a batch and return it as bool."""
    if available.shape != (batch, channels):
        raise ValueError(
            f"available must have shape (B, C) = ({batch}, {channels}), got {tuple(available.shape)}; "
            "build it with availability_from_keys(batch['keys'], dataset_json, class_names)"
        )
    return available.bool()
