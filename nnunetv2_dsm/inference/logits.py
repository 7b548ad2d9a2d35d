"""Raw network outputs (logits) of any trained nnU-Net model, on each input image's own grid.

nnU-Net's ``--save_probabilities`` writes probabilities, from which the logits of a softmax model
cannot be recovered (they are defined only up to a per-voxel constant), and post-hoc anomaly scores
such as the energy need them. ``LogitsPredictor`` runs nnU-Net's own preprocessing, sliding window
(with its mirroring setting) and resampling, and stops before the softmax/sigmoid: the logits are
resampled with nnU-Net's probability resampling, put back into the uncropped volume (0 outside the
crop) and transposed back, so voxel [c, z, y, x] lies on the input image's grid.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


class LogitsPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that returns logits in input geometry instead of writing segmentations."""

    def logits(self, image_files: Sequence[str | Path]) -> tuple[np.ndarray, sitk.Image]:
        """Logits (C, z, y, x) of one case on the grid of its first channel file, and that image."""
        preprocessor = self.configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case([str(f) for f in image_files], None, self.plans_manager,
                                                    self.configuration_manager, self.dataset_json)
        logits = self.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()
        spacing = [properties["spacing"][i] for i in self.plans_manager.transpose_forward]
        shape = properties["shape_after_cropping_and_before_resampling"]
        current = (self.configuration_manager.spacing if len(self.configuration_manager.spacing) == len(shape)
                   else [spacing[0], *self.configuration_manager.spacing])
        logits = torch.as_tensor(self.configuration_manager.resampling_fn_probabilities(logits, shape, current, spacing))
        full = np.zeros((logits.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
        full = insert_crop_into_image(full, logits.float().numpy(), [[0, logits.shape[0]], *properties["bbox_used_for_cropping"]])
        full = full.transpose([0, *[i + 1 for i in self.plans_manager.transpose_backward]])
        reference = sitk.ReadImage(str(image_files[0]))
        if reference.GetDimension() == 2:
            full = full[:, 0]
        return np.ascontiguousarray(full), reference

    def cases(self, folder: str | Path) -> Iterator[tuple[str, np.ndarray, sitk.Image]]:
        """(case id, logits, reference image) of every case of an input folder in nnU-Net naming."""
        from nnunetv2_dsm.checks.inputs import group_case_files

        groups, _ = group_case_files(folder, self.dataset_json["file_ending"])
        for case, files in sorted(groups.items()):
            yield (case, *self.logits(files))
