"""SDSeg (Lin et al., MICCAI 2024): latent diffusion segmentation with a single-step reverse process.

SDSeg architecture, trained from scratch (no Stable Diffusion / LDM prior can be downloaded here; a
local autoencoder can be given, see ``SDSegNetwork.load_autoencoder``). Parts, as in the authors'
code (lin-tianyu/Stable-Diffusion-Seg):

- a KL autoencoder of masks (kl-f8: ``latent_channels`` = 4, downsampling 8): a class's binary mask,
  values in {-1, 1} repeated to ``mask_channels``, is encoded to a latent z0 (scaled by
  ``latent_scale`` so it has unit variance) and decoded back; trained first, then frozen;
- a trainable vision encoder: a copy of the autoencoder's encoder architecture on the image plus a
  1x1 convolution to ``latent_channels``, giving the condition c (latent fusion by concatenation);
- a denoising UNet on ``[z_t ; c]`` predicting the noise, with one class embedding per class
  (multi-class segmentation as one pass per class);
- the forward process of DDPM with 1000 steps and betas linear in their square root from 0.0015 to
  0.0155 (LDM's "linear" schedule, diffusers' ``scaled_linear``).

Training loss (paper Eq. 3-4, the "latent estimation" loss):
``L = |eps - eps_theta(z_t, t, c)|_1 + |z0 - z0_hat|_1`` with
``z0_hat = (z_t - sqrt(1 - a_t) eps_theta) / sqrt(a_t)``.
Inference (Eq. 5): one UNet call at ``t = T - 1`` from pure noise z_T, z0_hat from the same formula,
decoded, channels averaged and mapped to a probability ``(m + 1) / 2``; thresholding at 0.5 is the
paper's decision. ``forward`` returns nnU-Net logits (background 0, class k ``logit(p_k)``) so that
nnU-Net's sliding window, mirroring, resampling and export work unchanged: the argmax is class k
exactly where ``p_k > 0.5`` and no other class is more probable.

The paper segments CT slice by slice (``spatial_dims=2``: diffusers' ``AutoencoderKL``, ``Encoder`` and
``UNet2DModel``, the LDM blocks the authors use, which also load LDM/SD autoencoder weights in
diffusers format); ``spatial_dims=3`` builds the same network volumetrically from MONAI's generative
networks (``SDSegTrainer3d``). Blocks in ``sdseg_blocks``; the noise schedules are diffusers'
``DDPMScheduler`` / ``DDIMScheduler`` in both (they act on tensors of any shape).
"""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler
from torch import nn

from nnunetv2_dsm import settings
from nnunetv2_dsm.networks.sdseg_blocks import MaskAutoencoder, build_parts, denoiser_output

SDSEG_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0155,
                  "beta_schedule": "scaled_linear"}


class SDSegNetwork(nn.Module):
    def __init__(self, input_channels: int, num_classes: int, ae_channels=(16, 32, 64, 64),
                 unet_channels=(64, 128, 128), latent_channels: int = 4, mask_channels: int = 3,
                 norm_groups: int = 8, layers_per_block: int = 1, inference_steps: int = 1, noise_seed: int = 0,
                 deep_supervision: bool = False, spatial_dims: int = 2):
        """``num_classes`` counts nnU-Net's output channels (background included); ``spatial_dims`` 2 builds
        the paper's slice-wise network (diffusers), 3 the volumetric one (MONAI), see ``sdseg_blocks``."""
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"SDSeg needs at least one foreground class, got num_classes={num_classes}")
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        self.mask_channels = mask_channels
        self.inference_steps = settings.sdseg_inference_steps(inference_steps)
        self.noise_seed = settings.sdseg_noise_seed(noise_seed)
        self.deep_supervision = deep_supervision  # nnU-Net sets it; SDSeg has one output
        self.autoencoder, self.vision_encoder, self.unet = build_parts(
            spatial_dims, input_channels, num_classes - 1, ae_channels, unet_channels, latent_channels,
            mask_channels, norm_groups, layers_per_block)
        self.scheduler = DDPMScheduler(**SDSEG_SCHEDULE)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(), persistent=False)
        # 1 / std of the mask latents, measured when the autoencoder is frozen (LDM's scale_factor).
        self.register_buffer("latent_scale", torch.ones(()))
        self.divisor = 2 ** (len(ae_channels) - 1) * 2 ** (len(unet_channels) - 1)

    # ---- the mask autoencoder ------------------------------------------------------------------------
    def masks_to_autoencoder(self, masks: torch.Tensor) -> torch.Tensor:
        # masks: (B, 1, *S) in {0, 1} -> (B, mask_channels, *S) in {-1, 1}
        return (masks.float() * 2 - 1).expand(-1, self.mask_channels, *masks.shape[2:])

    def encode_masks(self, masks: torch.Tensor, sample: bool = True) -> torch.Tensor:
        # masks: (B, 1, *S) -> z0: (B, latent, *S/f), scaled to unit variance
        mean, std = MaskAutoencoder.posterior(self.autoencoder, self.masks_to_autoencoder(masks))
        return (mean + std * torch.randn_like(std) if sample else mean) * self.latent_scale

    def decode_probabilities(self, z0: torch.Tensor) -> torch.Tensor:
        # z0: (B, latent, *S/f) -> p: (B, 1, *S) in [0, 1]
        mask = MaskAutoencoder.decode(self.autoencoder, z0 / self.latent_scale).mean(1, keepdim=True)
        return ((mask + 1) / 2).clamp(0, 1)

    def autoencoder_loss(self, masks: torch.Tensor, kl_weight: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 reconstruction of the {-1, 1} mask, a soft Dice term and a small KL term; returns (loss,
        reconstruction in [0, 1]).

        LDM's kl-f8 loss without its GAN and perceptual terms (they do not apply to binary masks). The
        Dice term is ours: organ masks are mostly background, and with L1 alone the autoencoder first
        learns the empty mask (reconstruction Dice 0 for every organ after 250 iterations of the
        learning benchmark; with the Dice term, 0.8 on disc masks after 90 iterations).
        """
        # masks: (B, 1, *S) -> (scalar, (B, 1, *S))
        target = self.masks_to_autoencoder(masks)
        mean, std = MaskAutoencoder.posterior(self.autoencoder, target)
        reconstruction = MaskAutoencoder.decode(self.autoencoder, mean + std * torch.randn_like(std))
        probability = ((reconstruction.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)
        axes = tuple(range(1, masks.ndim))
        overlap = (probability * masks).sum(axes)
        soft_dice = (2 * overlap + 1) / (probability.sum(axes) + masks.sum(axes) + 1)
        kl = MaskAutoencoder.kl(mean, std)
        loss = (reconstruction - target).abs().mean() + (1 - soft_dice).mean() + kl_weight * kl.mean()
        return loss, probability

    # ---- diffusion -----------------------------------------------------------------------------------
    def condition(self, image: torch.Tensor) -> torch.Tensor:
        # image: (B, C, *S) -> c: (B, latent, *S/f)
        return self.vision_encoder(image)

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.ndim - 1)))

    def predict_z0(self, z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z0_hat = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) (paper Eq. 4)."""
        # z_t, eps: (B, latent, *s), t: (B,) -> (B, latent, *s)
        abar = self._abar(t, z_t)
        return (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def denoise(self, z_t: torch.Tensor, c: torch.Tensor, t: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        # z_t, c: (B, latent, *s), t, classes: (B,) (0-based foreground class) -> eps: (B, latent, *s)
        return denoiser_output(self.unet(torch.cat([z_t, c], 1), t, class_labels=classes))

    def diffusion_loss(self, image: torch.Tensor, masks: torch.Tensor, classes: torch.Tensor,
                       generator: torch.Generator | None = None, final_step_fraction: float = 0.0) -> torch.Tensor:
        """``|eps - eps_hat|_1 + |z0 - z0_hat|_1`` at uniformly drawn t (noise and latent estimation).

        ``final_step_fraction`` > 0 puts that share of the samples at t = T - 1, the one step inference
        uses (not in the paper, where t is uniform; ``SDSegTrainer_finalStep`` measures it).
        """
        # image: (B, C, *S), masks: (B, 1, *S) of class ``classes`` (B,) -> scalar
        with torch.no_grad():
            z0 = self.encode_masks(masks)
        c = self.condition(image)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (z0.shape[0],), device=z0.device, generator=generator)
        if final_step_fraction > 0:
            final = torch.rand(t.shape, device=z0.device, generator=generator) < final_step_fraction
            t = torch.where(final, torch.full_like(t, steps - 1), t)
        noise = torch.randn(z0.shape, device=z0.device, generator=generator)
        z_t = self.scheduler.add_noise(z0, noise, t)
        eps = self.denoise(z_t, c, t, classes)
        return (eps - noise).abs().mean() + (self.predict_z0(z_t, eps, t) - z0).abs().mean()

    def sample_probabilities(self, image: torch.Tensor, classes: torch.Tensor | None = None,
                             steps: int | None = None, seed: int | None = None) -> torch.Tensor:
        """Per-class foreground probability: one UNet call at t = T-1 (or ``steps`` DDIM steps)."""
        # image: (B, C, *S) -> p: (B, K, *S) for the K classes asked (default: all foreground classes)
        steps = self.inference_steps if steps is None else steps
        seed = self.noise_seed if seed is None else seed
        b = image.shape[0]
        classes = torch.arange(self.num_classes - 1, device=image.device) if classes is None else classes
        k = len(classes)
        c = self.condition(image).repeat_interleave(k, 0)
        labels = classes.repeat(b)
        generator = torch.Generator(device=image.device).manual_seed(seed)
        z = torch.randn(c.shape, generator=generator, device=image.device, dtype=c.dtype)
        if steps <= 1:
            t = torch.full((b * k,), self.scheduler.config.num_train_timesteps - 1, device=image.device)
            z0 = self.predict_z0(z, self.denoise(z, c, t, labels), t)
        else:
            z0 = self.ddim(z, c, labels, steps)
        p = self.decode_probabilities(z0)
        return p.view(b, k, *p.shape[2:])

    def ddim(self, z: torch.Tensor, c: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
        """``steps`` DDIM steps from z_T (trailing spacing, so the first is at t = T-1), no clipping of the
        predicted z0: the latents have unit variance, not the [-1, 1] range of pixel-space diffusion."""
        # z, c: (N, latent, *s), labels: (N,) -> z0: (N, latent, *s)
        ddim = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing", clip_sample=False)
        ddim.set_timesteps(steps, device=z.device)
        for t in ddim.timesteps:
            tt = torch.full((z.shape[0],), int(t), device=z.device)
            z = ddim.step(self.denoise(z, c, tt, labels), int(t), z).prev_sample
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, *S) -> logits: (B, num_classes, *S) (background channel 0)
        p = self.sample_probabilities(x).clamp(1e-4, 1 - 1e-4)
        return torch.cat([torch.zeros_like(p[:, :1]), torch.logit(p)], 1)

    # ---- optional pretrained autoencoder ------------------------------------------------------------
    def load_autoencoder(self, folder: str) -> None:
        """Replace the mask autoencoder by a local diffusers ``AutoencoderKL`` (e.g. LDM/SD kl-f8 weights).

        Its latent and image channels must match this network's (``latent_channels``, ``mask_channels``);
        ``latent_scale`` becomes the model's ``scaling_factor``.
        """
        if self.spatial_dims != 2:
            raise ValueError(f"{folder}: a pretrained autoencoder can replace the 2D SDSeg's only (LDM/SD "
                             "autoencoders are 2D); train the 3D one from the dataset's masks (unset "
                             "DSM_SDSEG_AUTOENCODER)")
        autoencoder = AutoencoderKL.from_pretrained(folder, local_files_only=True)
        if (autoencoder.config.latent_channels != self.latent_channels
                or autoencoder.config.in_channels != self.mask_channels):
            raise ValueError(
                f"{folder}: autoencoder has {autoencoder.config.latent_channels} latent and "
                f"{autoencoder.config.in_channels} image channels; this SDSeg network needs "
                f"{self.latent_channels} and {self.mask_channels} (set them in the plans' arch_kwargs)")
        self.autoencoder = autoencoder
        self.latent_scale.fill_(float(autoencoder.config.scaling_factor))
