"""Comparison trainers on the budget of the short DSM CPU runs.

``DSMBaselineTrainer_2epochs_NoMirroring`` is nnU-Net's own ``nnUNetTrainer`` (network, loss, label
handling and augmentation as in the plans, e.g. ``ResEncPlansCPU`` of ``DSMBaselinePlannerCPU``) with
the schedule of ``DSMTrainer_2epochs_NoMirroring``: the same epochs, iterations per epoch and
validation iterations, a checkpoint every epoch and no mirroring. nnU-Net's ``nnUNetTrainer_5epochs``
runs 250 iterations per epoch and so is not a like-for-like budget. Its name starts with ``DSM`` only so
that nnU-Net's class lookup finds it in this package; nothing in it is DSM-specific.

The ablation trainers combine ``DSMTrainer_noKMMM`` / ``DSMTrainer_noSSM`` with the same short
CPU schedule, so ablations and the full model train for the same number of iterations.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.trainers.contrast_augmentation import ContrastPhaseAugmentation
from nnunetv2_dsm.trainers.dsm_trainer import seed_from_environment
from nnunetv2_dsm.trainers.schedules import NoMirroring, ShortSchedule
from nnunetv2_dsm.trainers.variants import DSMTrainer_2epochs_NoMirroring, DSMTrainer_noKMMM, DSMTrainer_noSSM


class BaselinePlansError(DSMError, RuntimeError):
    pass


class StockBaselineTrainer(nnUNetTrainer):
    """nnU-Net's ``nnUNetTrainer`` unchanged, refusing DSM plans and seeded by ``DSM_SEED`` as DSM runs are."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        if plans.get("label_manager") == "DSMLabelManager":
            raise BaselinePlansError(
                f"{type(self).__name__} trains nnU-Net's own network, but plans '{plans.get('plans_name')}' hold the "
                "DSM network. Run `nnUNetv2_plan_and_preprocess -d <ID> -pl DSMBaselinePlannerCPU` and train with "
                "`-p ResEncPlansCPU`."
            )
        seed_from_environment()
        super().__init__(plans, configuration, fold, dataset_json, device)


class DSMBaselineTrainer_contrastAug(ContrastPhaseAugmentation, StockBaselineTrainer):
    """Stock nnU-Net training with contrast-phase augmentation, the comparison for ``DSMTrainer_contrastAug``."""


class DSMBaselineTrainer_2epochs_NoMirroring(NoMirroring, ShortSchedule, StockBaselineTrainer):
    """Stock nnU-Net training with the iteration budget of ``DSMTrainer_2epochs_NoMirroring``."""

    budget = DSMTrainer_2epochs_NoMirroring
    epochs, iterations = budget.epochs, budget.iterations


class DSMTrainer_noKMMM_2epochs_NoMirroring(DSMTrainer_noKMMM, DSMTrainer_2epochs_NoMirroring):
    """Ablation without the k-means assignment, on the short CPU schedule."""


class DSMTrainer_noSSM_2epochs_NoMirroring(DSMTrainer_noSSM, DSMTrainer_2epochs_NoMirroring):
    """Ablation without the state-space layer, on the short CPU schedule."""
