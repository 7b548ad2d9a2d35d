"""Schedule and mirroring mixins for any nnU-Net trainer, DSM or stock (as nnU-Net's own variants).

``class X(NoMirroring, ShortSchedule, SomeTrainer): epochs = 2; iterations = 5`` is a trainer; the
mixins only set attributes nnU-Net's ``nnUNetTrainer`` reads, so the stock baseline and every DSM
trainer get the same budget from the same code.
"""

import torch


class ShortSchedule:
    """``epochs`` x ``iterations`` training iterations, half as many validation iterations, and a
    checkpoint after every epoch, so an interrupted short run resumes with ``--c``."""

    epochs: int = 2
    iterations: int = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        self.num_iterations_per_epoch = self.iterations
        self.num_val_iterations_per_epoch = max(1, self.iterations // 2)
        self.save_every = 1


class NoMirroring:
    """No mirroring, neither as augmentation nor as test-time augmentation (8x faster inference)."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None
