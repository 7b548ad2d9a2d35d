"""Label manager that always treats classes as sigmoid regions.

DSM predicts one independent mask per query (MaskFormer-style mask classification), and organs
contain their tumours, so every class is a region even in organ-only datasets where nnU-Net would
otherwise choose softmax over disjoint labels. Where classes overlap in the prediction, the voxel
takes the nested class (a tumour inside its organ), then the more probable one
(``overlap.most_probable_label``), not the class with the higher label id.
"""

import numpy as np
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.label_handling.overlap import most_probable_label, nesting_depth


class DSMLabelManager(LabelManager):
    def __init__(self, label_dict: dict, regions_class_order: list[int] | None, force_use_labels: bool = False,
                 inference_nonlin=None):
        self._dataset = DSMDataset.from_json({"labels": label_dict})
        if regions_class_order is None:
            # Without nesting each class writes its own id; with nesting dataset.json must say the order.
            if any(len(ids) > 1 for ids in self._dataset.classes.values()):
                raise RuntimeError(
                    "dataset.json defines nested regions but no 'regions_class_order'; add it (label ids in the "
                    "order they are written at export, organs before the tumours they contain)."
                )
            regions_class_order = [ids[0] for ids in self._dataset.classes.values()]
        super().__init__(label_dict, regions_class_order, force_use_labels, inference_nonlin)
        if not force_use_labels and not self._has_regions:
            self._has_regions = True
            self._regions = self._get_regions()
            if inference_nonlin is None:
                self.inference_nonlin = torch.sigmoid
        if self._regions is not None:
            # batchgeneratorsv2's region conversion expects python ints or tuples of them.
            self._regions = [tuple(int(i) for i in r) if isinstance(r, (list, tuple)) else (int(r),)
                             for r in self._regions]

    def convert_probabilities_to_segmentation(self, predicted_probabilities: np.ndarray | torch.Tensor
                                              ) -> np.ndarray | torch.Tensor:
        """Label map from sigmoid probabilities: nested class first, then the most probable class above 0.5."""
        # predicted_probabilities: (C, *S) -> (*S), uint16 (numpy) or int16 (torch) like nnU-Net's
        if not self.has_regions or self._regions is None:
            return super().convert_probabilities_to_segmentation(predicted_probabilities)
        if predicted_probabilities.shape[0] != self.num_segmentation_heads:
            raise ValueError(f"expected {self.num_segmentation_heads} probability channels (C, *spatial), got shape "
                             f"{tuple(predicted_probabilities.shape)}")
        as_numpy = isinstance(predicted_probabilities, np.ndarray)
        probabilities = (torch.as_tensor(np.ascontiguousarray(predicted_probabilities)) if as_numpy
                         else predicted_probabilities)
        channel = most_probable_label(probabilities, nesting_depth(self._regions))
        ids = torch.tensor([0, *self.regions_class_order], device=channel.device)
        segmentation = ids[channel]
        return segmentation.numpy().astype(np.uint16) if as_numpy else segmentation.to(torch.int16)

    @property
    def foreground_names(self) -> list[str]:
        """Class names in output-channel order."""
        return self._dataset.names
