"""Small DSMTrainer variants, each changing one thing (named like nnU-Net's trainer variants)."""

from nnunetv2_dsm.trainers.contrast_augmentation import ContrastPhaseAugmentation
from nnunetv2_dsm.trainers.dsm_trainer import DSMTrainer
from nnunetv2_dsm.trainers.schedules import NoMirroring, ShortSchedule


class _ShortSchedule(ShortSchedule, DSMTrainer):
    """DSMTrainer on a short schedule (``epochs`` x ``iterations``)."""


class _NoMirroring(NoMirroring, DSMTrainer):
    """DSMTrainer without mirroring."""


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


class DSMTrainer_allQueries(DSMTrainer):
    """Ablation: a stage-1 query for every class, seen tumours included (train stage 2 from it with
    ``DSMTrainerStage2_allQueries``)."""

    organ_queries = False


class DSMTrainer_contrastAug(ContrastPhaseAugmentation, DSMTrainer):
    """DSMTrainer with contrast-phase augmentation (simulated enhancement of the labelled structures)."""
