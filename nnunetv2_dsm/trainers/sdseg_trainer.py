"""SDSeg trained by nnU-Net (SDSeg architecture, trained from scratch): ``SDSegTrainer`` on the ``2d``
configuration (the paper's slice-wise method), ``SDSegTrainer3d`` on a 3D one.

``nnUNetv2_train D 2d F -tr SDSegTrainer -p SDSegPlans`` or ``nnUNetv2_train D 3d_fullres F -tr
SDSegTrainer3d -p SDSegPlans`` (plans from ``SDSegPlanner``). nnU-Net's data
loading, augmentation, patient-level folds, checkpoints, validation and export are unchanged; only
the step differs, in two phases of one run:

1. the first ``autoencoder_fraction`` (a fifth, at least one epoch) of the epochs train the mask autoencoder alone (L1
   reconstruction of one class's {-1, 1} mask per sample); the validation pseudo-Dice of these
   epochs is the autoencoder's *reconstruction* Dice, also written to the log;
2. then the autoencoder is frozen, the scale of its latents measured (LDM's ``scale_factor``: 1 / std
   of the mask latents of the first batch), and the vision encoder and denoising UNet train on the
   latent estimation loss (``SDSegNetwork.diffusion_loss``); validation is single-step inference.

Each sample is trained for one class: with probability ``present_class_probability`` a class present
in the patch, otherwise any class (so empty masks are learnt too). ``DSM_SDSEG_AUTOENCODER`` names a
local diffusers ``AutoencoderKL`` folder (LDM/SD kl-f8 weights) to use instead of phase 1.
AdamW at constant learning rate after a short warm-up, as LDM trains.
"""

from typing import TYPE_CHECKING

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from nnunetv2_dsm import settings
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.planners.sdseg_planner import SDSEG_NETWORK
from nnunetv2_dsm.trainers.checkpointing import AtomicCheckpoint
from nnunetv2_dsm.trainers.dsm_trainer import seed_from_environment
from nnunetv2_dsm.trainers.optim import ConstantAfterWarmup
from nnunetv2_dsm.trainers.schedules import NoMirroring, ShortSchedule
from nnunetv2_dsm.trainers.unwrap import bare_network

if TYPE_CHECKING:  # the network module imports diffusers, which nnU-Net's trainer lookup need not load
    from nnunetv2_dsm.networks.sdseg import SDSegNetwork


class SDSegPlansError(DSMError, RuntimeError):
    pass


class SDSegTrainer(AtomicCheckpoint):
    autoencoder_fraction: float = 0.2
    present_class_probability: float = 0.8
    learning_rate: float = 1e-3
    warmup_epochs: int = 1
    final_step_fraction: float = 0.0  # share of samples trained at t = T - 1 (paper: 0, t uniform)
    spatial_dims: int = 2  # the paper's slice-wise SDSeg; SDSegTrainer3d trains the volumetric one

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        architecture = plans.get("configurations", {}).get(configuration, {}).get("architecture", {})
        network = architecture.get("network_class_name")
        dims = architecture.get("arch_kwargs", {}).get("spatial_dims", 2)
        if network != SDSEG_NETWORK:
            raise SDSegPlansError(
                f"{type(self).__name__} needs plans whose '{configuration}' configuration builds {SDSEG_NETWORK} "
                f"(it names {network}): plan with `nnUNetv2_plan_experiment -d <id> -pl SDSegPlanner` (or "
                "SDSegPlannerCPU) and train with -p SDSegPlans (or SDSegPlansCPU)")
        if dims != self.spatial_dims:
            other = "SDSegTrainer3d" if dims == 3 else "SDSegTrainer"
            raise SDSegPlansError(
                f"{type(self).__name__} trains the {self.spatial_dims}D SDSeg, but configuration '{configuration}' "
                f"of these plans builds the {dims}D one: use -tr {other} for '{configuration}', or "
                f"{'the 2d configuration' if self.spatial_dims == 2 else 'a 3D configuration (3d_fullres)'} "
                f"with -tr {type(self).__name__}")
        seed_from_environment()
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise SDSegPlansError("SDSeg conditions on one class per pass and trains on disjoint labels; "
                                  "this dataset defines regions")
        self.enable_deep_supervision = False
        self.initial_lr = self.learning_rate
        self.weight_decay = 0.0

    @classmethod
    def autoencoder_epochs_of(cls, num_epochs: int) -> int:
        """Epochs of phase 1 in a run of ``num_epochs`` (none with a local autoencoder)."""
        if settings.sdseg_autoencoder():
            return 0
        return max(1, int(round(num_epochs * cls.autoencoder_fraction)))

    @property
    def autoencoder_epochs(self) -> int:
        return self.autoencoder_epochs_of(self.num_epochs)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=False)

    def initialize(self) -> None:
        first = not self.was_initialized
        super().initialize()
        local = settings.sdseg_autoencoder()
        if first and local:
            self._net().load_autoencoder(local)
            self.print_to_log_file(f"mask autoencoder from {local} (phase 1 skipped)")

    def _net(self) -> "SDSegNetwork":
        return bare_network(self)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, ConstantAfterWarmup(optimizer, self.warmup_epochs)

    def _build_loss(self):
        return self._net_loss

    def _net_loss(self, *args, **kwargs):  # the step computes SDSeg's losses itself
        raise RuntimeError("SDSegTrainer computes its losses in train_step / validation_step")

    def _get_deep_supervision_scales(self):
        return None

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        pass  # one output

    # ---- phases ----------------------------------------------------------------------------------------
    @property
    def in_autoencoder_phase(self) -> bool:
        return self.current_epoch < self.autoencoder_epochs

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        net = self._net()
        frozen = not self.in_autoencoder_phase
        net.autoencoder.requires_grad_(not frozen)
        if frozen:
            net.autoencoder.eval()
        self.print_to_log_file("phase: " + ("mask autoencoder" if not frozen else "diffusion (autoencoder frozen)"))

    def _measure_latent_scale(self, masks: torch.Tensor) -> None:
        net = self._net()
        if float(net.latent_scale) != 1.0:
            return
        with torch.no_grad():
            z = net.encode_masks(masks)  # unscaled while latent_scale is 1
        net.latent_scale.fill_(1.0 / max(float(z.std()), 1e-6))
        self.print_to_log_file(f"latent scale (1 / std of mask latents): {float(net.latent_scale):.4f}")

    def _class_masks(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One class per sample and its binary mask; target (B, 1, *S) label ids -> (B,), (B, 1, *S)."""
        k = self.label_manager.num_segmentation_heads - 1
        labels = self.label_manager.foreground_labels
        chosen = []
        for b in range(target.shape[0]):
            present = [i for i, lab in enumerate(labels) if bool((target[b] == lab).any())]
            if present and np.random.rand() < self.present_class_probability:
                chosen.append(present[np.random.randint(len(present))])
            else:
                chosen.append(np.random.randint(k))
        classes = torch.tensor(chosen, device=target.device)
        ids = torch.tensor(labels, device=target.device)[classes].view(-1, *([1] * (target.ndim - 1)))
        return classes, (target == ids).float()

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        classes, masks = self._class_masks(target)
        net = self._net()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            if self.in_autoencoder_phase:
                loss, _ = net.autoencoder_loss(masks)
            else:
                self._measure_latent_scale(masks)
                loss = net.diffusion_loss(data, masks, classes, final_step_fraction=self.final_step_fraction)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SDSeg loss is {loss.item()} at epoch {self.current_epoch}")
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        net = self._net()
        labels = self.label_manager.foreground_labels
        with torch.no_grad():
            if self.in_autoencoder_phase:
                # Reconstruction Dice of every class's mask through the autoencoder.
                masks = torch.cat([(target == lab).float() for lab in labels], 1)  # (B, K, *S)
                b, k = masks.shape[:2]
                loss, recon = net.autoencoder_loss(masks.reshape(b * k, 1, *masks.shape[2:]))
                predicted = recon.reshape(b, k, *masks.shape[2:]) > 0.5
            else:
                classes, masks_one = self._class_masks(target)
                loss = net.diffusion_loss(data, masks_one, classes)
                logits = net(data)
                seg = logits.argmax(1)
                predicted = torch.stack([seg == i + 1 for i in range(len(labels))], 1)
                masks = torch.cat([(target == lab).float() for lab in labels], 1)
        truth = masks > 0.5
        axes = (0, *range(2, truth.ndim))
        tp = (predicted & truth).sum(axes).float()
        fp = (predicted & ~truth).sum(axes).float()
        fn = (~predicted & truth).sum(axes).float()
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp.cpu().numpy(), "fp_hard": fp.cpu().numpy(),
                "fn_hard": fn.cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        if self.in_autoencoder_phase:
            dice = self.logger.get_value("dice_per_class_or_region", step=-1)
            self.print_to_log_file("autoencoder reconstruction Dice per class:", [np.round(d, 4) for d in dice])


class SDSegTrainer_2epochs_NoMirroring(NoMirroring, ShortSchedule, SDSegTrainer):
    """A short run for tests and smoke checks (2 epochs x 5 iterations)."""


class SDSegTrainer3d(SDSegTrainer):
    """SDSeg in 3D on a 3D configuration (``3d_fullres``): MONAI's volumetric autoencoder and UNet
    (``SDSegPlanner`` builds them for every 3D configuration); same phases, loss and inference."""

    spatial_dims = 3


class SDSegTrainer3d_2epochs_NoMirroring(NoMirroring, ShortSchedule, SDSegTrainer3d):
    """A short run of the 3D SDSeg for tests and smoke checks (2 epochs x 5 iterations)."""


class SDSegTrainer_finalStep(SDSegTrainer):
    """A quarter of the training samples at t = T - 1, the step single-step inference uses."""

    final_step_fraction = 0.25

