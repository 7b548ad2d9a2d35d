"""DSMTrainer: nnU-Net's training loop with the DSM network and the partial-label loss.

Everything nnU-Net does (data loading, augmentation, checkpointing, final validation, inference
through ``nnUNetv2_predict``) is inherited; only the hooks that depend on the network's output
format and on partial labels are overridden.
"""

import copy
import os
import random

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import autocast

from nnunetv2_dsm import settings
from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.evaluation.partial_summary import mask_unannotated
from nnunetv2_dsm.losses import (
    ClassPresenceBCE,
    PartialLabelDeepSupervision,
    PartialLabelDiceBCELoss,
    availability_from_keys,
)
from nnunetv2_dsm.networks.dsm_network import DSMNetwork
from nnunetv2_dsm.networks.ssm import SCAN_BACKEND_VARIABLE, scan_backend
from nnunetv2_dsm.planners.dsm_planner import DSM_NETWORK
from nnunetv2_dsm.trainers.checkpointing import AtomicCheckpoint, DSMCheckpointError  # noqa: F401 - re-exported
from nnunetv2_dsm.trainers.optim import DSMOptimizer, PolyLRPerGroup
from nnunetv2_dsm.trainers.unwrap import bare_network


class DSMPlansError(DSMError, RuntimeError):
    pass


class DSMNonFiniteError(DSMError, FloatingPointError):
    """The training loss or gradient became NaN or infinite."""


class DSMTrainer(AtomicCheckpoint):
    """DSM stage 1: one query per organ class.

    The spec's stage 1 queries organs only: on a dataset that also labels tumours, the trainer writes the
    organ channels into its copy of the plans (arch_kwargs ``query_channels``), the tumour channels get no
    query (their output is the constant ``NO_QUERY_LOGIT``) and no loss, and stage 2 learns every tumour
    through its tumour queries and the text. ``organ_queries = False`` (``DSMTrainer_allQueries``) gives
    every class a query instead.
    """

    class_loss_weight: float = 1.0
    organ_queries: bool = True
    # The network this trainer builds, and the settings it adds to the plans' arch_kwargs (stage 2
    # overrides both); every ablation changes arch_overrides only.
    network_class: type[DSMNetwork] = DSMNetwork
    network_defaults: dict = {}
    arch_overrides: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_dsm_plans(plans, configuration, type(self).__name__)
        seed_from_environment()
        dataset = DSMDataset.from_json(dataset_json)
        if self.organ_queries and len(dataset.organ_channels) < len(dataset.classes):
            plans = plans_with_arch_kwargs(plans, configuration, {"query_channels": dataset.organ_channels})
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dsm_dataset = dataset
        self.class_names = self.label_manager.foreground_names
        self.class_loss = ClassPresenceBCE()

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return get_network_from_plans(
            f"{cls.network_class.__module__}.{cls.network_class.__name__}",
            {**cls.network_defaults, **configuration_manager.network_arch_init_kwargs, **cls.arch_overrides},
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision,
        )

    # AdamW for the query decoder (queries, kMMM layers with their SSMs, heads), nnU-Net's SGD for the CNN.
    decoder_lr: float = 3e-4
    decoder_weight_decay: float = 0.05

    def configure_optimizers(self):
        optimizer = DSMOptimizer(self._unwrapped_network(), self.initial_lr, self.weight_decay, self.decoder_lr,
                                 self.decoder_weight_decay)
        return optimizer, PolyLRPerGroup(optimizer, self.num_epochs)

    def _unwrapped_network(self) -> DSMNetwork:
        return bare_network(self)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.print_to_log_file(f"selective scan: {scan_backend(self.device.type)} "
                               f"(set {SCAN_BACKEND_VARIABLE} to force mamba, triton, compiled or torch)")

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self._unwrapped_network().deep_supervision = enabled

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        arch = self.configuration_manager.network_arch_init_kwargs
        cumulative = 1 / np.cumprod(np.vstack(self.configuration_manager.pool_op_kernel_sizes), axis=0)
        stages = self.network_class.deep_supervision_stages(arch["n_stages"], arch["num_kmmm_layers"])
        return [list(cumulative[s]) for s in stages]

    def _build_loss(self):
        loss = PartialLabelDiceBCELoss(batch_dice=self.configuration_manager.batch_dice)
        if not self.enable_deep_supervision:
            return loss
        # Unlike nnU-Net we keep a weight on the coarsest output: it is the first kMMM layer's
        # post-SSM mask, and that SSM learns only through this supervision.
        weights = np.array([1 / (2 ** i) for i in range(len(self._get_deep_supervision_scales()))])
        return PartialLabelDeepSupervision(loss, list(weights / weights.sum()))

    def _availability(self, keys) -> torch.Tensor:
        return availability_from_keys(keys, self.dsm_dataset, self.class_names, device=self.device)

    def _output_availability(self, available: torch.Tensor, queried: torch.Tensor) -> torch.Tensor | list:
        """Availability mask of the loss: stage 1's outputs count only the classes that have a query."""
        return queried

    def _forward_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list, torch.Tensor | list, torch.Tensor]:
        """Loss, output, target and the availability mask of the first output (for the pseudo-Dice)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        available = self._availability(batch["keys"])
        queried = available & self._unwrapped_network().queried.to(available.device)
        per_output = self._output_availability(available, queried)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output, extras = self.network(data, return_extras=True)
            full_res_target = target[0] if isinstance(target, list) else target
            loss = self.loss(output, target, per_output) + self.class_loss_weight * self.class_loss(
                extras["class_logits"], full_res_target, queried)
        return loss, output, target, per_output[0] if isinstance(per_output, list) else per_output

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, _, _ = self._forward_loss(batch)
        self._stop_if_non_finite("loss", loss, batch)
        if self.grad_scaler is not None:
            # Under AMP the scaler skips steps whose gradients overflow; that is its job, not an error.
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self._stop_if_non_finite("gradient norm", norm, batch)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def _stop_if_non_finite(self, what: str, value: torch.Tensor, batch: dict) -> None:
        """Stop training before a non-finite value reaches the weights, so no NaN checkpoint is written."""
        if torch.isfinite(value).all():
            return
        network = self._unwrapped_network()
        where = [n for n, p in network.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        message = (
            f"{type(self).__name__}: the training {what} became {float(value)} in epoch {self.current_epoch} "
            f"(cases {[str(k) for k in batch.get('keys', [])]}"
            + (f"; non-finite gradients in {len(where)} parameter tensors, first {where[:5]}" if where else "")
            + "). Training stops before the weights change; the last "
            f"checkpoint in {self.output_folder} is unaffected (resume it with --c). Non-finite training is a "
            "divergence: lower the initial learning rate (initial_lr) or check the input intensities."
        )
        self.print_to_log_file(message)
        raise DSMNonFiniteError(message)

    def validation_step(self, batch: dict) -> dict:
        with torch.no_grad():
            loss, output, target, available = self._forward_loss(batch)
        if isinstance(output, list):
            output, target = output[0], target[0]
        prediction = (torch.sigmoid(output) > 0.5).long()
        spatial_axes = list(range(2, output.ndim))
        tp, fp, fn, _ = get_tp_fp_fn_tn(prediction, target, axes=spatial_axes)
        # Pseudo-Dice counts only annotated (case, class) pairs, like the loss.
        weight = available.to(tp.dtype)
        return {"loss": loss.detach().cpu().numpy(),
                "tp_hard": (tp * weight).sum(0).detach().cpu().numpy(),
                "fp_hard": (fp * weight).sum(0).detach().cpu().numpy(),
                "fn_hard": (fn * weight).sum(0).detach().cpu().numpy()}

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        super().perform_actual_validation(save_probabilities)
        summary_file = os.path.join(self.output_folder, "validation", "summary.json")
        if self.local_rank == 0 and self.dsm_dataset.partially_labelled and os.path.isfile(summary_file):
            summary = mask_unannotated(summary_file, self.dsm_dataset, self.class_names,
                                       self.label_manager.foreground_regions)
            self.print_to_log_file("Mean Validation Dice over annotated (case, class) pairs:",
                                   summary["foreground_mean"]["Dice"])


def plans_with_arch_kwargs(plans: dict, configuration: str, arch_kwargs: dict,
                           network_class_name: str | None = None, replace: bool = False) -> dict:
    """A copy of the plans whose configuration's arch_kwargs carry ``arch_kwargs`` (and the network named).

    ``replace`` drops the configuration's own arch_kwargs (another network family). The trainer's copy is
    what nnU-Net writes to the results folder's plans.json, so ``nnUNetv2_predict`` and the DSM predictor
    rebuild the network actually trained.
    """
    plans = copy.deepcopy(plans)
    resolved = PlansManager(plans).get_configuration(configuration).configuration
    architecture = copy.deepcopy(resolved["architecture"])
    if replace:
        architecture["arch_kwargs"], architecture["_kw_requires_import"] = {}, []
    architecture["arch_kwargs"] = {**architecture["arch_kwargs"], **arch_kwargs}
    if network_class_name is not None:
        architecture["network_class_name"] = network_class_name
    plans["configurations"][configuration]["architecture"] = architecture
    return plans


def seed_from_environment() -> None:
    """Seed Python, NumPy and torch from ``DSM_SEED`` so a CPU run can be repeated exactly.

    Network initialisation, patch sampling and augmentation then repeat; augmentation is only
    reproducible in the main process (``nnUNet_n_proc_DA=0``), as nnU-Net seeds its workers itself.
    """
    seed = settings.seed()
    if seed is None:
        return
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Networks a DSM trainer's plans may name: stage 1 (the planners) or stage 2 (its trainer's results plans).
DSM_NETWORKS = (DSM_NETWORK, "nnunetv2_dsm.networks.dsm_stage2.DSMStage2Network")


def check_dsm_plans(plans: dict, configuration: str, trainer_name: str) -> None:
    """DSM trainers need plans written by a DSM planner; say how to make them otherwise."""
    config = plans.get("configurations", {}).get(configuration, {})
    network = config.get("architecture", {}).get("network_class_name")
    parent = config.get("inherits_from")
    if network is None and parent is not None:
        network = plans["configurations"][parent].get("architecture", {}).get("network_class_name")
    if network not in DSM_NETWORKS or plans.get("label_manager") != "DSMLabelManager":
        raise DSMPlansError(
            f"{trainer_name} needs plans made by a DSM planner, but plans '{plans.get('plans_name')}' "
            f"(planner {plans.get('experiment_planner_used')}) use network {network} and label manager "
            f"{plans.get('label_manager')}. Run `nnUNetv2_plan_and_preprocess -d <ID> -pl DSMPlanner` (or "
            "DSMPlannerCPU) and train with `-p DSMPlans` (or DSMPlansCPU)."
        )
