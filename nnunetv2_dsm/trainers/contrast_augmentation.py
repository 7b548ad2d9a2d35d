"""Contrast-phase augmentation: simulated contrast enhancement of the labelled structures of a CT.

CTs of one anatomy differ most between scanners and protocols in contrast phase: after an iodine
injection, organs and vessels brighten by tens to hundreds of HU (liver and spleen by about 40-100 HU
in the portal-venous phase, the aorta by 100-300 HU in the arterial phase), while fat, air and bone
do not change. nnU-Net's intensity augmentations (brightness, contrast, gamma) act on the whole image
and cannot produce this tissue-specific shift, so a model trained on non-contrast scans sees a
contrast-enhanced scan as out of distribution. nnU-Net and batchgeneratorsv2 have no transform that
shifts tissues by label, which is why this one is written here.

``ContrastPhaseTransform`` adds to every foreground structure of a training patch its own random
offset, drawn uniformly in ``[0, max_offset_hu]`` HU, converted to the plans' CT normalisation
(``(HU - mean) / std``) and clipped at the normalisation's upper bound, as the preprocessing clips
real scans. ``ContrastPhaseAugmentation`` puts it into nnU-Net's training pipeline right after the
spatial transform (so it sees the label map, before any intensity transform); validation and
inference are unchanged.
"""

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnunetv2_dsm.errors import DSMError


class ContrastAugmentationError(DSMError, ValueError):
    """Contrast-phase augmentation asked of plans it does not apply to."""


class ContrastPhaseTransform(BasicTransform):
    """Add a random offset per labelled structure to channel ``channel`` of the image (see module docstring).

    Offsets are in normalised units: ``max_offset`` is ``max_offset_hu / std`` and ``upper`` the
    normalised clipping bound of the plans' CT normalisation.
    """

    def __init__(self, labels: list[int], max_offset: float, upper: float, channel: int = 0) -> None:
        super().__init__()
        self.labels, self.max_offset, self.upper, self.channel = list(labels), max_offset, upper, channel

    def get_parameters(self, **data_dict) -> dict:
        return {"offsets": {label: float(np.random.uniform(0, self.max_offset)) for label in self.labels}}

    def apply(self, data_dict: dict, **params) -> dict:
        image, segmentation = data_dict.get("image"), data_dict.get("segmentation")
        if image is None or segmentation is None:
            return data_dict
        # image: (C, *S), segmentation: (1, *S) label map (-1 outside the volume)
        offset = torch.zeros(segmentation.shape[1:], dtype=image.dtype)
        for label, value in params["offsets"].items():
            offset[segmentation[0] == label] = value
        enhanced = image[self.channel] + offset
        # only enhanced voxels are clipped: the rest of the image keeps its augmented values
        image[self.channel] = torch.where(offset > 0, enhanced.clamp(max=max(self.upper, 0.0)), enhanced)
        return data_dict


class ContrastPhaseAugmentation:
    """Trainer mixin: ``ContrastPhaseTransform`` with probability ``contrast_probability`` per training patch.

    ``class MyTrainer(ContrastPhaseAugmentation, nnUNetTrainer): pass`` (or any DSM trainer). Needs a
    single-channel CT configuration (``CTNormalization``).
    """

    contrast_probability: float = 0.5
    contrast_max_offset_hu: float = 150.0

    def contrast_transform(self) -> ContrastPhaseTransform:
        schemes = self.configuration_manager.normalization_schemes
        if list(schemes) != ["CTNormalization"]:
            raise ContrastAugmentationError(
                f"{type(self).__name__} simulates contrast enhancement of a CT, but configuration "
                f"'{self.configuration_name}' normalises its channels with {list(schemes)}. Train this dataset "
                "with a trainer without '_contrastAug' (or plan a single-channel CT dataset, channel name 'CT')."
            )
        stats = self.plans_manager.foreground_intensity_properties_per_channel["0"]
        std = max(float(stats["std"]), 1e-8)
        upper = (float(stats["percentile_99_5"]) - float(stats["mean"])) / std
        return ContrastPhaseTransform(list(self.label_manager.foreground_labels),
                                      self.contrast_max_offset_hu / std, upper)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, *args, **kwargs):
        pipeline = super().get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                   mirror_axes, do_dummy_2d_data_aug, *args, **kwargs)
        transforms = list(pipeline.transforms)
        # after the spatial transform (and its 2d/3d conversions): the patch is final, the labels still a map
        spatial = next(i for i, t in enumerate(transforms) if type(t).__name__ == "SpatialTransform")
        position = spatial + 1 + int(do_dummy_2d_data_aug)
        transforms.insert(position, RandomTransform(self.contrast_transform(), self.contrast_probability))
        return ComposeTransforms(transforms)
