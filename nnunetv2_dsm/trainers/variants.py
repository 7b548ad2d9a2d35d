"""Small DSMTrainer variants, each changing one thing (named like nnU-Net's trainer variants)."""

import torch

from nnunetv2_dsm.trainers.dsm_trainer import DSMTrainer


class _ShortSchedule(DSMTrainer):
    epochs: int = 2
    iterations: int = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        self.num_iterations_per_epoch = self.iterations
        self.num_val_iterations_per_epoch = max(1, self.iterations // 2)
        # A checkpoint after every epoch, so an interrupted short run resumes with --c.
        self.save_every = 1


class _NoMirroring(DSMTrainer):
    """No mirroring, neither as augmentation nor as test-time augmentation (8x faster inference)."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class DSMTrainer_1epoch_NoMirroring(_NoMirroring, _ShortSchedule):
    """One epoch of two iterations: the smallest run through the whole nnU-Net cycle (tests)."""

    epochs = 1
    iterations = 2


class DSMTrainer_2epochs(_ShortSchedule):
    """Two epochs of five iterations: a smoke run through the whole nnU-Net cycle."""


class DSMTrainer_5epochs(_ShortSchedule):
    epochs = 5
    iterations = 8


class DSMTrainer_10epochs(_ShortSchedule):
    epochs = 10
    iterations = 10


class DSMTrainer_50epochs(_ShortSchedule):
    epochs = 50
    iterations = 50


class DSMTrainerNoMirroring(_NoMirroring):
    pass


class DSMTrainer_2epochs_NoMirroring(_NoMirroring, DSMTrainer_2epochs):
    """The CPU smoke run used by the tests."""


class DSMTrainer_5epochs_NoMirroring(_NoMirroring, DSMTrainer_5epochs):
    """The CPU run used by ``nnunetv2_dsm demo``."""


class DSMTrainer_10epochs_NoMirroring(_NoMirroring, DSMTrainer_10epochs):
    pass


class DSMTrainer_noKMMM(DSMTrainer):
    """Ablation: masked cross-attention (Mask2Former) instead of the k-means assignment."""

    arch_overrides = {"use_kmeans": False}


class DSMTrainer_noSSM(DSMTrainer):
    """Ablation: no state-space layer on the query responses."""

    arch_overrides = {"use_ssm": False}
