"""SDSeg's three parts built from a diffusion library: 2D from ``diffusers``, 3D from MONAI.

2D uses diffusers (``AutoencoderKL``, its ``Encoder``, ``UNet2DModel`` with class embeddings): the
same LDM blocks the authors' code uses, and the format LDM/SD autoencoder weights are published in.
diffusers has no volumetric autoencoder or UNet, so 3D uses MONAI's generative networks
(``AutoencoderKL`` / ``DiffusionModelUNet`` with ``spatial_dims=3``, the LDM blocks in 3D), with the
same widths, depths and attention placement. ``MaskAutoencoder`` hides the two libraries' encode and
decode signatures from ``SDSegNetwork``; the modules themselves are stored unwrapped, so checkpoint
keys are the libraries' own.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn


class SDSegParts(NamedTuple):
    autoencoder: nn.Module  # mask autoencoder (KL)
    vision_encoder: nn.Module  # image -> condition latent
    unet: nn.Module  # denoiser on [z_t ; c], one class embedding per class


def build_parts(spatial_dims: int, input_channels: int, num_foreground: int, ae_channels: Sequence[int],
                unet_channels: Sequence[int], latent_channels: int, mask_channels: int, norm_groups: int,
                layers_per_block: int) -> SDSegParts:
    if spatial_dims == 2:
        return _diffusers_2d(input_channels, num_foreground, tuple(ae_channels), tuple(unet_channels),
                             latent_channels, mask_channels, norm_groups, layers_per_block)
    if spatial_dims == 3:
        return _monai_3d(input_channels, num_foreground, tuple(ae_channels), tuple(unet_channels),
                         latent_channels, mask_channels, norm_groups, layers_per_block)
    raise ValueError(f"SDSeg is built in 2D or 3D, got spatial_dims={spatial_dims}")


def _diffusers_2d(input_channels, num_foreground, ae_channels, unet_channels, latent_channels, mask_channels,
                  norm_groups, layers_per_block) -> SDSegParts:
    from diffusers import AutoencoderKL, UNet2DModel
    from diffusers.models.autoencoders.vae import Encoder

    n_ae, n_unet = len(ae_channels), len(unet_channels)
    autoencoder = AutoencoderKL(
        in_channels=mask_channels, out_channels=mask_channels, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n_ae, up_block_types=("UpDecoderBlock2D",) * n_ae,
        block_out_channels=ae_channels, layers_per_block=layers_per_block, norm_num_groups=norm_groups)
    vision_encoder = nn.Sequential(
        Encoder(in_channels=input_channels, out_channels=latent_channels,
                down_block_types=("DownEncoderBlock2D",) * n_ae, block_out_channels=ae_channels,
                layers_per_block=layers_per_block, norm_num_groups=norm_groups, double_z=True),
        nn.Conv2d(2 * latent_channels, latent_channels, kernel_size=1))
    unet = UNet2DModel(
        in_channels=2 * latent_channels, out_channels=latent_channels,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("AttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        block_out_channels=unet_channels, layers_per_block=layers_per_block,
        norm_num_groups=norm_groups, num_class_embeds=num_foreground, attention_head_dim=8)
    return SDSegParts(autoencoder, vision_encoder, unet)


def _monai_3d(input_channels, num_foreground, ae_channels, unet_channels, latent_channels, mask_channels,
              norm_groups, layers_per_block) -> SDSegParts:
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from monai.networks.nets.autoencoderkl import Encoder

    n_ae, n_unet = len(ae_channels), len(unet_channels)
    # As in diffusers' 2D blocks: no attention in the autoencoder's resolutions, attention in its middle
    # block, attention in every UNet resolution but the first.
    autoencoder = AutoencoderKL(
        spatial_dims=3, in_channels=mask_channels, out_channels=mask_channels, num_res_blocks=layers_per_block,
        channels=ae_channels, attention_levels=(False,) * n_ae, latent_channels=latent_channels,
        norm_num_groups=norm_groups, with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True)
    vision_encoder = nn.Sequential(
        Encoder(spatial_dims=3, in_channels=input_channels, channels=ae_channels, out_channels=latent_channels,
                num_res_blocks=(layers_per_block,) * n_ae, norm_num_groups=norm_groups, norm_eps=1e-6,
                attention_levels=(False,) * n_ae, with_nonlocal_attn=True),
        nn.Conv3d(latent_channels, latent_channels, kernel_size=1))
    unet = DiffusionModelUNet(
        spatial_dims=3, in_channels=2 * latent_channels, out_channels=latent_channels,
        num_res_blocks=layers_per_block, channels=unet_channels,
        attention_levels=(False,) + (True,) * (n_unet - 1), norm_num_groups=norm_groups,
        num_head_channels=8, num_class_embeds=num_foreground)
    return SDSegParts(autoencoder, vision_encoder, unet)


class MaskAutoencoder:
    """The posterior and decoder of either library's ``AutoencoderKL``."""

    @staticmethod
    def posterior(autoencoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, C, *S) -> mean, std: (B, latent, *S/f)
        out = autoencoder.encode(x)
        if isinstance(out, tuple):  # MONAI: (z_mu, z_sigma)
            return out
        dist = out.latent_dist  # diffusers: a DiagonalGaussianDistribution
        return dist.mean, dist.std

    @staticmethod
    def decode(autoencoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
        # z: (B, latent, *S/f) -> (B, C, *S)
        out = autoencoder.decode(z)
        return out if isinstance(out, torch.Tensor) else out.sample

    @staticmethod
    def kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, std^2) || N(0, 1)) summed over latent channels and positions (LDM's kl loss)."""
        # mean, std: (B, latent, *S) -> (B,)
        var = std.pow(2)
        return 0.5 * (mean.pow(2) + var - 1.0 - var.clamp_min(1e-20).log()).flatten(1).sum(1)


def denoiser_output(out) -> torch.Tensor:
    """diffusers' ``UNet2DModel`` returns an output object, MONAI's ``DiffusionModelUNet`` a tensor."""
    return out if isinstance(out, torch.Tensor) else out.sample
