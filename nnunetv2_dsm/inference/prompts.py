"""Prompts of open-vocabulary prediction: their file names, checks, roles and the label map they make.

Shared by DSM's and DiffuGTS's predictors and by the benchmarks that read their ``scores/`` folders.
"""

import hashlib
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.label_handling.overlap import most_probable_label
from nnunetv2_dsm.vocabulary import CANONICAL, is_tumour

ANOMALY = "anomaly"
SCORES_DIR = "scores"


class DSMPredictionError(DSMError, ValueError):
    pass


SLUG_LENGTH = 64


def prompt_slug(prompt: str) -> str:
    """File-name form of a prompt: lower case, runs of non-letters -> '_' ("Pancreas Tumor" -> pancreas_tumor).

    Letters of every script are kept ("肝臓腫瘍"); a slug longer than ``SLUG_LENGTH`` characters is cut and
    ends in a hash of the whole prompt, so file names stay short and distinct.
    """
    slug = re.sub(r"[\W_]+", "_", prompt.strip().lower()).strip("_")
    if len(slug) > SLUG_LENGTH:
        digest = hashlib.sha1(prompt.strip().lower().encode()).hexdigest()[:8]
        slug = f"{slug[: SLUG_LENGTH - 9].rstrip('_')}_{digest}"
    return slug


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Slugs of ``prompts``; empty, blank, duplicate or reserved prompts are errors."""
    if isinstance(prompts, str) or not prompts:
        raise DSMPredictionError(
            f"give at least one prompt as a list, e.g. --prompts \"pancreas tumor\" liver (got {prompts!r})"
        )
    slugs = []
    for prompt in prompts:
        slug = prompt_slug(prompt) if isinstance(prompt, str) else ""
        if not slug:
            raise DSMPredictionError(
                f"prompt {prompt!r} is empty or has no letters or digits; give a class name such as 'liver tumor'"
            )
        if slug == ANOMALY:
            raise DSMPredictionError(f"prompt {prompt!r} is reserved: the anomaly map is always written")
        if slug in slugs:
            raise DSMPredictionError(f"prompts {prompts} name the same class twice ({slug!r}); give each once")
        slugs.append(slug)
    return slugs


def class_name_for_prompt(prompt: str) -> str:
    """Canonical name when the prompt spells one ("pancreas tumor" -> pancreas_tumor), else the text itself."""
    slug = prompt_slug(prompt)
    return slug if slug in CANONICAL else prompt.strip()


def is_tumour_prompt(prompt: str) -> bool:
    """Whether a prompt names a lesion: a canonical tumour class, or free text naming one."""
    name = class_name_for_prompt(prompt)
    if name in CANONICAL:
        return is_tumour(name)
    return bool(re.search(r"tumou?r|cyst|lesion|cancer|carcinoma|neoplasm|metasta|thrombus|nodule|mass\b",
                          prompt.lower()))


def label_map(probabilities: Tensor, tumour: Sequence[bool]) -> Tensor:
    """Label ids (1..P) where a prompt's probability exceeds 0.5, independent of the prompt order.

    Where several prompts exceed 0.5, a tumour prompt wins over an organ prompt (an organ's map
    contains its tumours), then the more probable prompt.
    """
    # probabilities: (P, *S) -> (*S) uint8
    return most_probable_label(probabilities, [int(t) for t in tumour]).to(torch.uint8)
