"""Catalogue of bad inputs: every check raises :class:`InputError` naming the file and how to fix it.

Training and prediction on clinical data run for days, so problems are found up front: unreadable or
truncated images (NIfTI, DICOM series), NaN/Inf voxels, image/label grids that differ, undeclared or empty label
maps, missing channel files, 2D/3D mix-ups, and output folders that cannot be written or would
overwrite an input. The checks only read; none of them writes anything.

Folder-level entry points:
- :func:`check_raw_dataset` returns every problem of an nnU-Net raw dataset (``nnunetv2_dsm check``);
- :func:`check_prediction_inputs` checks every case of a prediction input folder, and the output
  folder, before any output is written, and raises one error listing all problems.

The checks live in ``reading`` (files read completely), ``voxels`` (intensities, geometry, label
values), ``layout`` (naming, channels, dimensionality, output folders) and ``datasets`` (folder-level
entry points); this module gathers their public names.
"""

from nnunetv2_dsm.checks._common import GEOMETRY_TOL, REEXPORT, REQUIRED_DATASET_KEYS, PathLike, Plans
from nnunetv2_dsm.checks.datasets import (  # noqa: F401
    check_prediction_inputs,
    check_raw_dataset,
    check_source_cases,
    mixed_orientation_error,
    resolve_raw_dataset,
)
from nnunetv2_dsm.checks.layout import (  # noqa: F401
    check_channels,
    check_dimensionality,
    check_output_writable,
    check_scalar_image,
    group_case_files,
    split_case_file_name,
)
from nnunetv2_dsm.checks.reading import (  # noqa: F401
    read_image_checked,
)
from nnunetv2_dsm.checks.voxels import (  # noqa: F401
    allowed_label_ids,
    check_intensities,
    check_label_not_empty,
    check_label_values,
    check_same_geometry,
)
from nnunetv2_dsm.errors import InputError, InputErrors, raise_input_errors

__all__ = [
    "GEOMETRY_TOL",
    "REEXPORT",
    "REQUIRED_DATASET_KEYS",
    "PathLike",
    "Plans",
    "InputError",
    "InputErrors",
    "raise_input_errors",
    "read_image_checked",
    "allowed_label_ids",
    "check_intensities",
    "check_label_not_empty",
    "check_label_values",
    "check_same_geometry",
    "check_channels",
    "check_dimensionality",
    "check_output_writable",
    "check_scalar_image",
    "group_case_files",
    "split_case_file_name",
    "check_prediction_inputs",
    "check_raw_dataset",
    "check_source_cases",
    "mixed_orientation_error",
    "resolve_raw_dataset",
]
