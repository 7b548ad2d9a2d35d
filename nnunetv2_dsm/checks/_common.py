"""Shared constants and helpers of the input checks."""

import os
import re
from collections.abc import Sequence
from typing import Any

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

PathLike = str | os.PathLike
Plans = dict | PathLike | PlansManager  # plans dict, plans.json path or nnU-Net's PlansManager

REEXPORT = "re-export or re-download the file"
GEOMETRY_TOL = 1e-3  # mm for spacing and origin, unitless for direction cosines
REQUIRED_DATASET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL_STEM = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")
_CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})\.[^_]+")
# Names that look like images; other files in a prediction input folder are left alone, as nnU-Net does.
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".tif", ".tiff", ".bmp")
_MAX_LISTED = 10


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _sitk_reason(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1].removeprefix("sitk::ERROR: ") if lines else type(err).__name__

