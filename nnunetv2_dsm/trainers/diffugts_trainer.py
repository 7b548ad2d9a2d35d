"""DiffuGTS trained by nnU-Net (DiffuGTS method, diffusion model trained here, not the authors' weights).

``nnUNetv2_train D 2d F -tr DiffuGTSTrainer -p DSMPlans`` (or ``DSMPlansCPU``): the same preprocessed
slices, patient-level folds, augmentation and checkpoints as DSM. The trainer writes the DiffuGTS
network into its copy of the plans (the results folder's ``plans.json``), so ``nnUNetv2_predict`` and
``nnunetv2_dsm diffugts-predict`` rebuild it. One run, three phases over the epochs:

1. ``autoencoder_fraction`` of the epochs: the image autoencoder alone (L1 + small KL);
2. the denoising UNet, autoencoder frozen (its latent scale measured on the first batch), with
   cross-attention to the text embeddings of the classes present in the patch (classifier-free
   dropout ``uncond_probability``) grounded in their masks by TokenCompose's token and pixel losses
   (``grounding_weights``; ``DiffuGTSTrainer_noGrounding`` leaves them out); this is the stand-in for
   DiffuGTS's frozen foundation model;
3. ``adapter_fraction`` of the epochs: everything frozen but the text adapter and the map scale/bias,
   trained on the *seen* tumour types only: the anomaly logits of their prompt pairs
   (``text.anomaly_prompts``) against their masks, partial-label Dice + BCE over annotated pairs.

The text encoder is ``text_encoder_spec`` (``DSM_TEXT_ENCODER`` overrides), recorded in every
checkpoint like DSM stage 2's, so prediction embeds new prompts in the same space.
"""

from typing import TYPE_CHECKING

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_dsm import settings
from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.errors import DSMError
from nnunetv2_dsm.losses import PartialLabelDiceBCELoss, availability_from_keys
from nnunetv2_dsm.text import class_prompt_embeddings, get_text_encoder
from nnunetv2_dsm.text.anomaly_prompts import pair_embeddings
from nnunetv2_dsm.trainers.checkpointing import AtomicCheckpoint
from nnunetv2_dsm.trainers.dsm_trainer import plans_with_arch_kwargs, seed_from_environment
from nnunetv2_dsm.trainers.optim import ConstantAfterWarmup
from nnunetv2_dsm.trainers.schedules import NoMirroring, ShortSchedule
from nnunetv2_dsm.trainers.stage2 import _TextCheckpoint
from nnunetv2_dsm.trainers.unwrap import bare_network
from nnunetv2_dsm.vocabulary import prompt_for

if TYPE_CHECKING:  # the network module imports diffusers, which nnU-Net's trainer lookup need not load
    from nnunetv2_dsm.networks.diffugts import DiffuGTSNetwork

DIFFUGTS_NETWORK = "nnunetv2_dsm.networks.diffugts.DiffuGTSNetwork"
DIFFUGTS_DEFAULTS = {"ae_channels": [32, 64, 64], "unet_channels": [64, 128, 128], "latent_channels": 4,
                     "max_tokens": 8, "norm_groups": 8, "layers_per_block": 1, "attention_heads": 4,
                     "attention_timestep": 100, "noise_seed": 0}


class DiffuGTSPlansError(DSMError, RuntimeError):
    pass


class DiffuGTSTrainer(AtomicCheckpoint, _TextCheckpoint):
    autoencoder_fraction: float = 0.25
    adapter_fraction: float = 0.25
    uncond_probability: float = 0.1
    # TokenCompose's (token, pixel) grounding loss weights in the denoiser phase, and the timesteps they cover
    grounding_weights: tuple[float, float] = (0.1, 0.1)
    grounding_max_timestep: int = 500
    text_encoder_spec: str = "minilm"
    network_kwargs: dict = {}
    # AdamW per part: autoencoder, denoiser (+ null token), adapter (+ map scale and bias).
    learning_rates: tuple[float, float, float] = (1e-3, 2e-4, 1e-3)
    warmup_epochs: int = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        name = type(self).__name__
        config = PlansManager(plans).get_configuration(configuration)
        if plans.get("label_manager") != "DSMLabelManager" or len(config.patch_size) != 2:
            raise DiffuGTSPlansError(
                f"{name} trains on 2D slices with DSM's sigmoid labels, but plans '{plans.get('plans_name')}' "
                f"configuration '{configuration}' has a {len(config.patch_size)}D patch and label manager "
                f"{plans.get('label_manager')}: plan with `nnUNetv2_plan_and_preprocess -d <ID> -pl DSMPlanner` "
                "(or DSMPlannerCPU) and train `-p DSMPlans 2d`.")
        dataset = DSMDataset.from_json(dataset_json)
        self.tumour_channels = [i for i, n in enumerate(dataset.classes) if dataset.is_tumour(n)]
        if not self.tumour_channels:
            raise DiffuGTSPlansError(
                f"{name}: the dataset labels no tumour class (classes {dataset.classes}); DiffuGTS's adapter "
                "learns from seen tumour types. Add tumour labels (e.g. `nnunetv2_dsm synth`).")
        self.encoder_spec = settings.text_encoder_override() or self.text_encoder_spec
        self.text_encoder = get_text_encoder(self.encoder_spec)
        kwargs = {**DIFFUGTS_DEFAULTS, **self.network_kwargs, "text_dim": self.text_encoder.dim}
        plans = plans_with_arch_kwargs(plans, configuration, kwargs, DIFFUGTS_NETWORK, replace=True)
        seed_from_environment()
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dsm_dataset = dataset
        self.enable_deep_supervision = False
        self.prompt_names = dataset.prompt_names
        self.class_tokens = class_prompt_embeddings(self.text_encoder, self.prompt_names)
        self.class_pairs = pair_embeddings(self.text_encoder, self.prompt_names)
        self.adapter_loss = PartialLabelDiceBCELoss(batch_dice=True)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=False,
                                      deep_supervision=False)

    def initialize(self) -> None:
        first = not self.was_initialized
        super().initialize()
        if first:
            self._net().set_class_pairs(self.class_pairs, [i in self.tumour_channels
                                                           for i in range(len(self.prompt_names))])

    def _net(self) -> "DiffuGTSNetwork":
        return bare_network(self)

    def text_record(self) -> dict:
        return {"encoder_id": self.text_encoder.encoder_id, "encoder_spec": self.encoder_spec,
                "class_names": self.prompt_names, "prompts": [prompt_for(n) for n in self.prompt_names],
                "embeddings": self.class_tokens.clone()}

    # ---- phases ------------------------------------------------------------------------------------
    def phase_epochs(self) -> tuple[int, int, int]:
        """Epochs of the autoencoder, denoiser and adapter phases (each at least one)."""
        n = self.num_epochs
        autoencoder = max(1, int(round(n * self.autoencoder_fraction)))
        adapter = max(1, int(round(n * self.adapter_fraction)))
        return autoencoder, max(1, n - autoencoder - adapter), adapter

    @property
    def phase(self) -> str:
        autoencoder, denoiser, _ = self.phase_epochs()
        if self.current_epoch < autoencoder:
            return "autoencoder"
        return "denoiser" if self.current_epoch < autoencoder + denoiser else "adapter"

    def _parts(self) -> dict[str, list[torch.nn.Parameter]]:
        net = self._net()
        return {"autoencoder": list(net.autoencoder.parameters()),
                "denoiser": [*net.unet.parameters(), net.null_token],
                "adapter": [*net.adapter.parameters(), net.map_scale, net.map_bias]}

    def configure_optimizers(self):
        groups = [{"params": params, "lr": lr} for params, lr in zip(self._parts().values(), self.learning_rates)]
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rates[0], weight_decay=0.0)
        return optimizer, ConstantAfterWarmup(optimizer, self.warmup_epochs)

    def _build_loss(self):
        return None  # the step computes each phase's loss

    def _get_deep_supervision_scales(self):
        return None

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self._net().deep_supervision = False  # one output

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        phase = self.phase
        for part, params in self._parts().items():
            for p in params:
                p.requires_grad_(part == phase)
        if phase != "autoencoder":
            self._net().autoencoder.eval()
        self._phase_terms: list[list[float]] = []
        self.print_to_log_file(f"DiffuGTS phase: {phase}")

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        terms = getattr(self, "_phase_terms", [])
        if terms:
            noise, token, pixel = np.mean(terms, 0)
            self.print_to_log_file(f"denoiser losses (mean over the training batches): noise {noise:.4f}, "
                                   f"token grounding {token:.4f}, pixel grounding {pixel:.4f}")
        super().on_train_epoch_end(train_outputs)

    def _measure_latent_scale(self, data: torch.Tensor) -> None:
        net = self._net()
        if float(net.latent_scale) != 1.0:
            return
        with torch.no_grad():
            z = net.encode(data)  # unscaled while latent_scale is 1
        net.latent_scale.fill_(1.0 / max(float(z.std()), 1e-6))
        self.print_to_log_file(f"latent scale (1 / std of image latents): {float(net.latent_scale):.4f}")

    def _present_tokens(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token sequences of the classes present in each patch, shuffled (none with ``uncond_probability``),
        and the mask each token names: (B, L, D), (B, L, H, W), zero masks for the null tokens."""
        net = self._net()
        present = target.flatten(2).bool().any(-1).cpu().numpy()  # (B, K)
        embeddings = []
        masks = target.new_zeros(target.shape[0], net.max_tokens, *target.shape[2:])
        for b, row in enumerate(present):
            classes = np.flatnonzero(row)
            if np.random.rand() < self.uncond_probability:
                classes = classes[:0]
            classes = np.random.permutation(classes)[:net.max_tokens]
            embeddings.append(self.class_tokens[classes])
            masks[b, :len(classes)] = target[b, classes]
        return net.tokens(embeddings).to(self.device), masks.float()

    def _loss(self, data: torch.Tensor, target: torch.Tensor, keys) -> torch.Tensor:
        net = self._net()
        phase = self.phase
        if phase == "autoencoder":
            return net.autoencoder_loss(data)[0]
        if phase == "denoiser":
            self._measure_latent_scale(data)
            tokens, masks = self._present_tokens(target)
            grounded = any(self.grounding_weights)
            losses = net.diffusion_loss(data, tokens, token_masks=masks if grounded else None,
                                        grounding_max_timestep=self.grounding_max_timestep)
            self._phase_terms.append([float(v.detach()) for v in losses])
            return losses.noise + self.grounding_weights[0] * losses.token + self.grounding_weights[1] * losses.pixel
        tumour = self.tumour_channels
        logits = net.anomaly_logits(data, net.class_pairs[tumour])
        available = availability_from_keys(keys, self.dsm_dataset, self.dsm_dataset.classes, device=self.device)
        return self.adapter_loss(logits, target[:, tumour], available[:, tumour])

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(data, target, batch["keys"])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DiffuGTS {self.phase} loss is {loss.item()} at epoch {self.current_epoch}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.network.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """The phase's loss, and the pseudo-Dice of the network's output (tumour classes: the anomaly map)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        with torch.no_grad():
            loss = self._loss(data, target, batch["keys"])
            predicted = self._net()(data) > 0
        truth = target.bool()
        available = availability_from_keys(batch["keys"], self.dsm_dataset, self.dsm_dataset.classes,
                                           device=self.device).float()
        axes = tuple(range(2, truth.ndim))
        counts = [((a & b).sum(axes).float() * available).sum(0).cpu().numpy()
                  for a, b in ((predicted, truth), (predicted, ~truth), (~predicted, truth))]
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": counts[0], "fp_hard": counts[1], "fn_hard": counts[2]}


class DiffuGTSTrainer_noGrounding(DiffuGTSTrainer):
    """The denoiser trained on the noise-prediction loss alone (no TokenCompose grounding)."""

    grounding_weights = (0.0, 0.0)


class DiffuGTSTrainer_tiny_NoMirroring(NoMirroring, ShortSchedule, DiffuGTSTrainer):
    """Three epochs (one per phase) of two iterations with a narrow network: for tests on CPU."""

    epochs = 3
    iterations = 2
    network_kwargs = {"ae_channels": [8, 16, 16], "unet_channels": [16, 32], "norm_groups": 4, "attention_heads": 2}
