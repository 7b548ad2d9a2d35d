"""Checkpoint files: whether one can be read at all (a truncated copy or a foreign file cannot)."""

import os

import torch


def readable_checkpoint(path: str | os.PathLike) -> bool:
    """Whether torch can load the file (a truncated or foreign file cannot)."""
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - any failure to load means the file is not a usable checkpoint
        return False
    return True
