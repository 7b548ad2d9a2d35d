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
from nnunetv2_dsm.trainers.dsm_trainer import seed_from_environment
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


class DSMBaselineTrainer_2epochs_NoMirroring(StockBaselineTrainer):
    """Stock nnU-Net training with the iteration budget of ``DSMTrainer_2epochs_NoMirroring``."""

    budget = DSMTrainer_2epochs_NoMirroring

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.budget.epochs
        self.num_iterations_per_epoch = self.budget.iterations
        self.num_val_iterations_per_epoch = max(1, self.budget.iterations // 2)
        # A checkpoint after every epoch, as the short DSM runs, so an interrupted run resumes with --c.
        self.save_every = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class DSMTrainer_noKMMM_2epochs_NoMirroring(DSMTrainer_noKMMM, DSMTrainer_2epochs_NoMirroring):
    """Ablation without the k-means assignment, on the short CPU schedule."""


class DSMTrainer_noSSM_2epochs_NoMirroring(DSMTrainer_noSSM, DSMTrainer_2epochs_NoMirroring):
    """Ablation without the state-space layer, on the short CPU schedule."""
