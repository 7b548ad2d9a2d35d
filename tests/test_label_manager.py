"""Label maps from sigmoid probabilities: overlapping organs take the more probable class."""

import numpy as np
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_dsm.label_handling.dsm_label_manager import DSMLabelManager

ORGANS = {"background": 0, "spleen": 1, "liver": 2, "stomach": 3}


def _probabilities() -> np.ndarray:
    # voxels: spleen > liver (both above 0.5), liver > spleen, only stomach, nothing above 0.5
    p = np.zeros((3, 4), np.float32)
    p[0] = [0.9, 0.6, 0.1, 0.4]
    p[1] = [0.7, 0.8, 0.2, 0.3]
    p[2] = [0.1, 0.1, 0.95, 0.5]
    return p


def test_overlapping_organs_take_the_more_probable_class_not_the_higher_label_id():
    manager = DSMLabelManager(ORGANS, None)
    segmentation = manager.convert_probabilities_to_segmentation(_probabilities())
    assert segmentation.tolist() == [1, 2, 3, 0]
    assert segmentation.dtype == np.uint16
    # nnU-Net's region export paints in label order: liver (id 2) overwrites spleen wherever both exceed 0.5
    stock = LabelManager(ORGANS, [1, 2, 3], inference_nonlin=torch.sigmoid)
    stock._has_regions, stock._regions = True, [(1,), (2,), (3,)]
    assert stock.convert_probabilities_to_segmentation(_probabilities()).tolist() == [2, 2, 3, 0]


def test_torch_input_and_the_logit_path_agree():
    manager = DSMLabelManager(ORGANS, None)
    p = torch.from_numpy(_probabilities())
    from_torch = manager.convert_probabilities_to_segmentation(p)
    assert from_torch.dtype == torch.int16 and from_torch.tolist() == [1, 2, 3, 0]
    logits = torch.logit(p.clamp(1e-4, 1 - 1e-4))
    assert manager.convert_logits_to_segmentation(logits).tolist() == [1, 2, 3, 0]


def test_a_nested_tumour_wins_over_its_more_probable_organ():
    labels = {"background": 0, "liver": [1, 2], "liver_tumor": 2}
    manager = DSMLabelManager(labels, [1, 2])
    p = np.array([[0.99, 0.9, 0.3], [0.6, 0.2, 0.7]], np.float32)
    # organ and tumour both above 0.5 -> tumour; organ only -> organ; tumour only -> tumour
    assert manager.convert_probabilities_to_segmentation(p).tolist() == [2, 1, 2]
