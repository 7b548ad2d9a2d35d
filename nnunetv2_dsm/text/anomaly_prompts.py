"""Prompt pairs for anomaly-aware attention (DiffuGTS): a healthy and an abnormal version of each prompt.

For a tumour prompt ("pancreas tumor", or a dataset class ``pancreas_tumor``) the pair is
("a computerized tomography of a healthy pancreas", "a computerized tomography of a pancreas tumor"); for an
organ class ``liver`` it is ("... of a healthy liver", "... of a liver tumor"). The organ of a prompt is
its tumour type's parent organ when the vocabulary knows the type, otherwise the longest organ name the
prompt contains; a prompt naming no known organ pairs with "... of healthy tissue".
"""

import torch

from nnunetv2_dsm.text.base import TextEncoder
from nnunetv2_dsm.vocabulary import ORGANS, PROMPT_TEMPLATE, TUMOUR_PARENTS, TUMOURS, display_name

HEALTHY_TEMPLATE = "a computerized tomography of a healthy {}"
HEALTHY_TISSUE = "a computerized tomography of healthy tissue"


def host_organ(prompt: str) -> str | None:
    """The organ (display name, lower case) a tumour prompt or class name lies in, or None if none is named."""
    text = display_name(prompt).strip().lower()
    for key, display in TUMOURS.items():
        if text == display.lower() or text == key:
            return _organ(ORGANS[TUMOUR_PARENTS[key][0]])
    named = [d.lower() for d in ORGANS.values() if d.lower() in text]
    return _organ(max(named, key=len)) if named else None


def _organ(display: str) -> str:
    """An organ's display name in lower case without its side ("right kidney" -> "kidney")."""
    return display.lower().removeprefix("right ").removeprefix("left ")


def prompt_pair(name: str) -> tuple[str, str]:
    """(healthy, abnormal) prompt texts of a class name or free-text prompt."""
    if name in ORGANS:  # an organ class: its healthy and tumorous versions
        organ = _organ(ORGANS[name])
        return HEALTHY_TEMPLATE.format(organ), PROMPT_TEMPLATE.format(f"{organ} tumor")
    organ = host_organ(name)
    healthy = HEALTHY_TEMPLATE.format(organ) if organ else HEALTHY_TISSUE
    return healthy, PROMPT_TEMPLATE.format(display_name(name).strip().lower())


def pair_embeddings(encoder: TextEncoder, names: list[str]) -> torch.Tensor:
    """Embeddings of every name's (healthy, abnormal) pair: (P, 2, D)."""
    pairs = [prompt_pair(n) for n in names]
    flat = encoder.encode([text for pair in pairs for text in pair])
    return flat.reshape(len(names), 2, -1)
