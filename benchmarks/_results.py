"""Writing benchmark results: one JSON file, complete or not at all (the package's atomic writer)."""

from pathlib import Path

from nnunetv2_dsm.io import atomic


def write_json(path: Path, payload: dict) -> None:
    atomic.write_json(path, payload, strict=False)
