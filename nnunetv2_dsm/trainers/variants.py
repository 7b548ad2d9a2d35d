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


class DSMTrainer_2epochs(_ShortSchedule):
    """Two epochs of five iterations: a CPU smoke run through the whole nnU-Net cycle."""


class DSMTrainer_10epochs(_ShortSchedule):
    epochs = 10
    iterations = 10


class DSMTrainer_50epochs(_ShortSchedule):
    epochs = 50
    iterations = 50


class DSMTrainer_noKMMM(DSMTrainer):
    """Ablation: masked cross-attention (Mask2Former) instead of the k-means assignment."""

    arch_overrides = {"use_kmeans": False}


class DSMTrainer_noSSM(DSMTrainer):
    """Ablation: no state-space layer on the query responses."""

    arch_overrides = {"use_ssm": False}
