"""Per-case class availability (partial labels) and averaging over annotated (case, class) pairs.

A DSM training set merges datasets that each annotate only some classes. ``dataset.json`` records
which label names each case annotates in ``["dsm"]["class_availability"]``; a case that is not
listed annotates every label. Losses are averaged over the available pairs only, so an
unannotated channel neither adds to the loss nor receives a gradient.
"""

from collections.abc import Mapping, Sequence

import torch

# A dataset label without an output channel under sigmoid (region) training: naming it in the
# availability table is harmless, so it is accepted and ignored.
_CHANNEL_FREE_LABELS = frozenset({"background"})


def availability_from_keys(
    keys: Sequence[str],
    dataset_json: Mapping,
    class_names: Sequence[str],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, C) bool mask: entry (b, c) is True when case ``keys[b]`` annotates ``class_names[c]``.

    ``class_names`` are the output channels in network order (the foreground labels or regions
    of the dataset). The whole availability table is validated on each call so that a typo
    surfaces on the first batch instead of when the affected case is first sampled.
    """
    channel = {name: i for i, name in enumerate(class_names)}
    if len(channel) != len(class_names):
        raise ValueError(f"class_names contains duplicates: {list(class_names)}")
    table = dataset_json.get("dsm", {}).get("class_availability", {})
    if not isinstance(table, Mapping):
        raise ValueError(
            "dataset.json: ['dsm']['class_availability'] must map case ids to lists of label names, "
            f"got {type(table).__name__}"
        )
    for case, names in table.items():
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ValueError(
                f"dataset.json: ['dsm']['class_availability'][{case!r}] must be a list of label names, "
                f"got {names!r}"
            )
        unknown = sorted({n for n in names if n not in channel and n not in _CHANNEL_FREE_LABELS})
        if unknown:
            raise ValueError(
                f"dataset.json: ['dsm']['class_availability'][{case!r}] names unknown classes {unknown}; "
                f"fix the entry to use only these label names: {list(class_names)}"
            )

    available = torch.ones((len(keys), len(class_names)), dtype=torch.bool)
    for b, key in enumerate(keys):
        if key in table:
            available[b] = False
            for name in table[key]:
                if name in channel:
                    available[b, channel[name]] = True
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
