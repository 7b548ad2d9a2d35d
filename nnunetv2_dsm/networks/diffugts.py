"""DiffuGTS method (Jiang et al., CVPR 2025), diffusion model trained here, not the authors' weights.

DiffuGTS segments tumours zero-shot from a *frozen* medical foundation diffusion model. No such model can
be downloaded here and the authors publish no code, so the foundation model is a text-conditioned
latent diffusion model trained in the framework (``DiffuGTSTrainer``) on the training patients' CT,
slice by slice, then frozen. Parts, all from ``diffusers``:

- ``autoencoder``: a KL autoencoder of CT slices (``AutoencoderKL``, downsampling
  ``2 ** (len(ae_channels) - 1)``), latents scaled to unit variance (``latent_scale``, LDM's scale factor);
- ``unet``: a denoiser with cross-attention to text tokens (``UNet2DConditionModel``), trained to predict
  the noise (DDPM, Stable Diffusion's schedule) given the embeddings of the prompts
  "a computerized tomography of a {class}" of the classes present in the slice (``max_tokens`` tokens,
  padded with the learned ``null_token``; classifier-free dropout in training), with TokenCompose's
  grounding losses on its cross-attention (``diffugts_grounding``) when the trainer passes the masks;
- anomaly-aware open-vocabulary attention maps (``attention_maps``, ``anomaly_logits``): the image is
  noised to ``attention_timestep`` and passed through the frozen UNet with, for each prompt, a token for
  the healthy organ ("... of a healthy {organ}") and one for the abnormal one ("... of a {organ} tumor");
  the per-pixel cross-attention probabilities, averaged over heads and layers, give A_h and A_a, and the
  anomaly logit is ``scale * (log A_a - log A_h) + bias``;
- the only part trained after the LDM is frozen: ``adapter`` (a residual MLP on the text embeddings,
  zero-initialised, so it starts as the identity) with ``map_scale`` / ``map_bias``, trained on the seen
  tumour types. A new tumour name is just another prompt pair.

The pseudo-healthy refinement (RePaint inpainting of the candidate region in latent space and the
residual maps) is in ``diffugts_inpaint``. ``forward`` gives nnU-Net one logit map per trained class
(the anomaly logit of a tumour class's prompt pair; for an organ class, the logit of the attention its
pair receives), or one per prompt after ``set_prompts``.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from nnunetv2_dsm.networks.diffugts_attention import CrossAttentionStore, install_recorders
from nnunetv2_dsm.networks.diffugts_grounding import grounding_losses

# Stable Diffusion's noise schedule (scaled_linear, 0.00085 to 0.012 over 1000 steps).
DIFFUGTS_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                     "beta_schedule": "scaled_linear"}
_EPS = 1e-6


class DiffusionLosses(NamedTuple):
    noise: Tensor  # the noise-prediction MSE
    token: Tensor  # TokenCompose's token grounding loss (0 without token masks)
    pixel: Tensor  # TokenCompose's pixel grounding loss (0 without token masks)


class TextAdapter(nn.Module):
    """``t + MLP(t)`` on text embeddings; the last layer starts at zero, so the adapter starts as identity."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: Tensor) -> Tensor:
        # t: (..., D) -> (..., D)
        return t + self.mlp(t)


class DiffuGTSNetwork(nn.Module):
    def __init__(self, input_channels: int, num_classes: int, ae_channels=(32, 64, 64), unet_channels=(64, 128, 128),
                 latent_channels: int = 4, text_dim: int = 384, max_tokens: int = 8, norm_groups: int = 8,
                 layers_per_block: int = 1, attention_heads: int = 4, attention_timestep: int = 100,
                 noise_seed: int = 0, deep_supervision: bool = False) -> None:
        """``num_classes``: nnU-Net's output channels (the DSM label manager's sigmoid classes)."""
        super().__init__()
        self.num_classes = num_classes
        self.text_dim = text_dim
        self.max_tokens = max_tokens
        self.attention_timestep = attention_timestep
        self.noise_seed = noise_seed
        self.deep_supervision = deep_supervision  # nnU-Net sets it; one output
        n_ae, n_unet = len(ae_channels), len(unet_channels)
        self.autoencoder = AutoencoderKL(
            in_channels=input_channels, out_channels=input_channels, latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n_ae, up_block_types=("UpDecoderBlock2D",) * n_ae,
            block_out_channels=tuple(ae_channels), layers_per_block=layers_per_block, norm_num_groups=norm_groups)
        self.unet = UNet2DConditionModel(
            in_channels=latent_channels, out_channels=latent_channels,
            down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
            block_out_channels=tuple(unet_channels), layers_per_block=layers_per_block,
            norm_num_groups=norm_groups, cross_attention_dim=text_dim, attention_head_dim=attention_heads)
        self.store = CrossAttentionStore()
        install_recorders(self.unet, self.store)
        self.scheduler = DDPMScheduler(**DIFFUGTS_SCHEDULE)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.register_buffer("latent_scale", torch.ones(()))
        self.null_token = nn.Parameter(torch.zeros(1, text_dim))
        self.adapter = TextAdapter(text_dim)
        self.map_scale = nn.Parameter(torch.ones(()))
        self.map_bias = nn.Parameter(torch.zeros(()))
        # Prompt pairs (healthy, abnormal) of the trained classes, set by the trainer and saved with the weights;
        # ``class_is_tumour`` says which channels answer with the anomaly logit.
        self.register_buffer("class_pairs", torch.zeros(num_classes, 2, text_dim))
        self.register_buffer("class_is_tumour", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("prompt_pairs", None, persistent=False)
        self.divisor = 2 ** (n_ae - 1) * 2 ** (n_unet - 1)

    # ---- the autoencoder ---------------------------------------------------------------------------
    def encode(self, x: Tensor, sample: bool = False) -> Tensor:
        # x: (B, C, H, W) -> z0: (B, latent, h, w), unit variance
        dist = self.autoencoder.encode(x).latent_dist
        return (dist.sample() if sample else dist.mean) * self.latent_scale

    def decode(self, z: Tensor) -> Tensor:
        # z: (B, latent, h, w) -> (B, C, H, W)
        return self.autoencoder.decode(z / self.latent_scale).sample

    def autoencoder_loss(self, x: Tensor, kl_weight: float = 1e-6) -> tuple[Tensor, Tensor]:
        """LDM's kl-f8 loss without its GAN and perceptual terms: L1 reconstruction + a small KL; (loss, recon)."""
        # x: (B, C, H, W) -> (scalar, (B, C, H, W))
        dist = self.autoencoder.encode(x).latent_dist
        reconstruction = self.autoencoder.decode(dist.sample()).sample
        return (reconstruction - x).abs().mean() + kl_weight * dist.kl().mean(), reconstruction

    # ---- the text-conditioned denoiser -------------------------------------------------------------
    def tokens(self, embeddings: list[Tensor]) -> Tensor:
        """Per-sample token sequences of ``max_tokens``: the given (n_b, D) embeddings, then null tokens."""
        # embeddings: B x (n_b, D) -> (B, max_tokens, D)
        out = self.null_token.expand(len(embeddings), self.max_tokens, -1).clone()
        for b, e in enumerate(embeddings):
            n = min(len(e), self.max_tokens)
            if n:
                out[b, :n] = e[:n].to(out)
        return out

    def denoise(self, z_t: Tensor, t: Tensor, tokens: Tensor) -> Tensor:
        # z_t: (B, latent, h, w), t: (B,), tokens: (B, L, D) -> eps: (B, latent, h, w)
        return self.unet(z_t, t, encoder_hidden_states=tokens).sample

    def diffusion_loss(self, x: Tensor, tokens: Tensor, generator: torch.Generator | None = None,
                       token_masks: Tensor | None = None, grounding_max_timestep: int = 500) -> DiffusionLosses:
        """``|eps - eps_theta(z_t, t, tokens)|^2`` at uniformly drawn t (the frozen autoencoder's latents).

        With ``token_masks`` (B, L, H, W), the mask each token names (zero for padding tokens), also the
        grounding losses of the same forward pass (``diffugts_grounding``), over the samples drawn at
        t < ``grounding_max_timestep``: the attention maps are read at ``attention_timestep``, and near
        t = 1000 the latent no longer shows what a token could attend to.
        """
        # x: (B, C, H, W), tokens: (B, L, D), token_masks: (B, L, H, W) -> 3 x scalar
        with torch.no_grad():
            z0 = self.encode(x)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device,
                          generator=generator)
        noise = torch.randn(z0.shape, device=z0.device, generator=generator)
        record = token_masks is not None
        self.store.maps, self.store.latent_shape, self.store.recording = [], tuple(z0.shape[2:]), record
        try:
            eps = self.denoise(self.scheduler.add_noise(z0, noise, t), t, tokens)
            maps = self.store.maps
        finally:
            self.store.recording, self.store.maps = False, []
        zero = eps.new_zeros(())
        if not record:
            return DiffusionLosses(F.mse_loss(eps, noise), zero, zero)
        weight = token_masks.flatten(2).amax(-1) * (t < grounding_max_timestep).to(eps.dtype)[:, None]
        token, pixel = grounding_losses(maps, token_masks.to(eps.dtype), weight)
        return DiffusionLosses(F.mse_loss(eps, noise), token, pixel)

    # ---- anomaly-aware open-vocabulary attention maps -------------------------------------------------
    def pair_tokens(self, pairs: Tensor) -> Tensor:
        """Adapted token sequence of P prompt pairs: [h_1, a_1, ..., h_P, a_P, null]: (2P + 1, D)."""
        # pairs: (P, 2, D) -> (2P + 1, D)
        return torch.cat([self.adapter(pairs.reshape(-1, pairs.shape[-1])), self.null_token], 0)

    def attention_maps(self, x: Tensor, tokens: Tensor, z0: Tensor | None = None) -> Tensor:
        """Cross-attention of every pixel to each token, averaged over heads and layers: (B, L, H, W), sum 1 over L.

        The image's latent is noised to ``attention_timestep`` with a fixed seed (the same noise for every
        call, so maps are deterministic) and passed once through the frozen UNet.
        """
        # x: (B, C, H, W), tokens: (L, D) or (B, L, D) -> (B, L, H, W)
        z0 = self.encode(x) if z0 is None else z0
        generator = torch.Generator(device=z0.device).manual_seed(self.noise_seed)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        t = torch.full((z0.shape[0],), self.attention_timestep, device=z0.device, dtype=torch.long)
        tokens = tokens.expand(z0.shape[0], -1, -1) if tokens.ndim == 2 else tokens
        self.store.maps, self.store.latent_shape, self.store.recording = [], tuple(z0.shape[2:]), True
        try:
            self.denoise(self.scheduler.add_noise(z0, noise, t), t, tokens.to(z0.dtype))
            return self.store.merged(tuple(x.shape[2:]))
        finally:
            self.store.recording, self.store.maps = False, []

    def pair_logits(self, maps: Tensor, num_pairs: int) -> tuple[Tensor, Tensor]:
        """Anomaly logits ``scale (log A_a - log A_h) + bias`` and organ logits ``logit(A_h + A_a)``: 2 x (B, P, H, W)."""
        # maps: (B, 2P + 1, H, W) -> (B, P, H, W), (B, P, H, W)
        healthy, abnormal = maps[:, 0:2 * num_pairs:2], maps[:, 1:2 * num_pairs:2]
        anomaly = self.map_scale * ((abnormal + _EPS).log() - (healthy + _EPS).log()) + self.map_bias
        organ = torch.logit((healthy + abnormal).clamp(_EPS, 1 - _EPS))
        return anomaly, organ

    def anomaly_logits(self, x: Tensor, pairs: Tensor) -> Tensor:
        """Anomaly logit of each of P prompt pairs (healthy, abnormal embeddings): (B, P, H, W)."""
        # x: (B, C, H, W), pairs: (P, 2, D) -> (B, P, H, W)
        return self.pair_logits(self.attention_maps(x, self.pair_tokens(pairs)), pairs.shape[0])[0]

    # ---- nnU-Net output ----------------------------------------------------------------------------
    def set_class_pairs(self, pairs: Tensor, is_tumour: list[bool]) -> None:
        """The trained classes' prompt pairs (K, 2, D) and which classes are tumours (the trainer sets them)."""
        if pairs.shape != self.class_pairs.shape or len(is_tumour) != self.num_classes:
            raise ValueError(f"class pairs must be {tuple(self.class_pairs.shape)} with {self.num_classes} flags, "
                             f"got {tuple(pairs.shape)} and {len(is_tumour)}")
        self.class_pairs.copy_(pairs.to(self.class_pairs))
        self.class_is_tumour.copy_(torch.tensor(is_tumour, dtype=torch.bool))

    def set_prompts(self, pairs: Tensor | None) -> None:
        """Answer P prompt pairs (P, 2, D) instead of the trained classes (``None``: the trained classes)."""
        if pairs is not None and (pairs.ndim != 3 or pairs.shape[1:] != (2, self.text_dim)):
            raise ValueError(f"prompt pairs must be (P, 2, {self.text_dim}), got {tuple(pairs.shape)}: embed "
                             "them with the text encoder the model was trained with")
        self.prompt_pairs = None if pairs is None else pairs.detach().to(self.class_pairs).clone()

    def class_logits(self, x: Tensor) -> Tensor:
        """One logit map per trained class: anomaly logit for tumour classes, organ logit otherwise."""
        # x: (B, C, H, W) -> (B, K, H, W)
        maps = self.attention_maps(x, self.pair_tokens(self.class_pairs))
        anomaly, organ = self.pair_logits(maps, self.num_classes)
        tumour = self.class_is_tumour.view(1, -1, 1, 1)
        return torch.where(tumour, anomaly, organ)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, K or P, H, W) logits
        if self.prompt_pairs is not None:
            return self.anomaly_logits(x, self.prompt_pairs)
        return self.class_logits(x)
