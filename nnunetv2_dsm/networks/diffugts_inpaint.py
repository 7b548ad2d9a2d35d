"""DiffuGTS pseudo-healthy refinement: RePaint inpainting in latent space and residual maps.

RePaint (Lugmayr et al., CVPR 2022) inpaints with an unconditionally trained diffusion model: at every
reverse step the known region is replaced by the clean latent noised to that step, so only the unknown
region is generated, in harmony with what surrounds it. diffusers' ``RePaintScheduler`` is written for
pixel-space DDPM with its own jump schedule; DiffuGTS works on latents with few steps, so the loop is
written here on diffusers' ``DDIMScheduler`` (``jumps = 0``: RePaint without resampling).

The candidate region (the anomaly map above a threshold, dilated) is generated from the *healthy*
prompts of its organ, so a lesion becomes healthy tissue. The refined map combines the anomaly
probability with the residual between the image and its pseudo-healthy version: in pixels, and in the
autoencoder's latent features. Both residuals are taken against the autoencoder's reconstruction of the
image rather than the image itself, so outside the candidate region, where the latents are the image's
own, the residual is zero instead of the autoencoder's reconstruction error.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import Tensor

from nnunetv2_dsm.networks.diffugts import DiffuGTSNetwork


class Refinement(NamedTuple):
    pseudo_healthy: Tensor  # (B, C, H, W): the image with the candidate region inpainted healthy
    reconstruction: Tensor  # (B, C, H, W): the autoencoder's reconstruction of the image
    residual: Tensor  # (B, 1, H, W) in [0, 1): pixel and feature residual combined
    refined: Tensor  # (B, 1, H, W) in [0, 1]: the refined anomaly probability
    region: Tensor  # (B, 1, H, W) bool: the inpainted candidate region


def candidate_region(probability: Tensor, threshold: float = 0.5, dilation: int = 2) -> Tensor:
    """Pixels whose anomaly probability exceeds ``threshold``, dilated by ``dilation`` pixels."""
    # probability: (B, 1, H, W) -> (B, 1, H, W) bool
    region = (probability > threshold).float()
    if dilation > 0:
        region = F.max_pool2d(region, 2 * dilation + 1, stride=1, padding=dilation)
    return region > 0


@torch.no_grad()
def inpaint(net: DiffuGTSNetwork, x: Tensor, region: Tensor, healthy_tokens: Tensor, steps: int = 25,
            seed: int = 0, strength: float = 1.0) -> tuple[Tensor, Tensor]:
    """RePaint in latent space: ``region`` generated from ``healthy_tokens``, the rest kept; (image, latent).

    ``strength`` (diffusers' img2img convention, SDEdit): the reverse process starts from the image's own
    latent noised to ``strength`` of the schedule and runs the last ``strength * steps`` steps; 1 starts
    from pure noise (plain RePaint). Below 1 the region keeps the image's coarse structure and only what
    the denoiser sees as noise at that level is replaced, as AnoDDPM's partial diffusion removes anomalies.
    Outside the latent footprint of ``region`` the image is the autoencoder's reconstruction of ``x``:
    unchanged up to the decoder's error.
    """
    # x: (B, C, H, W), region: (B, 1, H, W) bool, healthy_tokens: (L, D) or (B, L, D) -> (B, C, H, W), (B, latent, h, w)
    z0 = net.encode(x)
    unknown = F.adaptive_max_pool2d(region.float(), z0.shape[2:]) > 0  # a latent touching the region is unknown
    tokens = healthy_tokens.expand(x.shape[0], -1, -1) if healthy_tokens.ndim == 2 else healthy_tokens
    ddim = DDIMScheduler.from_config(net.scheduler.config, clip_sample=False, timestep_spacing="trailing")
    ddim.set_timesteps(steps, device=x.device)
    timesteps = ddim.timesteps[steps - max(1, min(steps, round(strength * steps))):]
    generator = torch.Generator(device=x.device).manual_seed(seed)
    z = torch.randn(z0.shape, generator=generator, device=x.device, dtype=z0.dtype)
    if strength < 1:
        z = ddim.add_noise(z0, z, timesteps[:1])
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=generator, device=x.device, dtype=z0.dtype)
        known = ddim.add_noise(z0, noise, t.reshape(1))
        z = torch.where(unknown, z, known)
        tt = torch.full((z.shape[0],), int(t), device=x.device, dtype=torch.long)
        z = ddim.step(net.denoise(z, tt, tokens.to(z.dtype)), int(t), z).prev_sample
    z = torch.where(unknown, z, z0)
    # The decoder's group norms and middle-block attention see the whole slice, so decoding the inpainted
    # latent shifts the known region too; it is pasted back from the reconstruction (decode(z0)), as image
    # inpainting pipelines paste the known pixels back.
    footprint = F.interpolate(unknown.float(), size=x.shape[2:], mode="nearest")
    return footprint * net.decode(z) + (1 - footprint) * net.decode(z0), z


def residual_map(net: DiffuGTSNetwork, reconstruction: Tensor, pseudo_healthy: Tensor, scale: float = 0.5) -> Tensor:
    """``1 - exp(-(r_pixel + r_feature) / (2 scale))``: residuals in normalised intensity units, mapped to [0, 1)."""
    # reconstruction, pseudo_healthy: (B, C, H, W) -> (B, 1, H, W)
    pixel = (reconstruction - pseudo_healthy).abs().mean(1, keepdim=True)
    with torch.no_grad():
        features = (net.encode(reconstruction) - net.encode(pseudo_healthy)).abs().mean(1, keepdim=True)
    feature = F.interpolate(features, size=pixel.shape[2:], mode="bilinear", align_corners=False)
    return 1 - torch.exp(-(pixel + feature) / (2 * scale))


@torch.no_grad()
def refine(net: DiffuGTSNetwork, x: Tensor, probability: Tensor, healthy_tokens: Tensor, threshold: float = 0.5,
           steps: int = 25, seed: int = 0, region: Tensor | None = None, strength: float = 1.0) -> Refinement:
    """Pseudo-healthy image of the candidate region, residual, and the refined map ``sqrt(p * residual)``.

    The candidate region is ``candidate_region(probability, threshold)``, or ``region`` when given (a
    known lesion mask, (B, 1, H, W) bool, inpainted as it is); ``strength`` as in ``inpaint``. The
    residual is kept inside the region (0 outside: the latent-feature term would otherwise spread the
    encoder's global context over the whole slice). Where a batch has no candidate pixel nothing is
    inpainted, the residual is 0 and the refined map is ``p / 2`` (below any refined lesion of equal
    probability whose residual exceeds 1/4).
    """
    # x: (B, C, H, W), probability: (B, 1, H, W), region: (B, 1, H, W) bool or None -> Refinement
    region = candidate_region(probability, threshold) if region is None else region.bool()
    reconstruction = net.decode(net.encode(x))
    if not bool(region.any()):
        zero = torch.zeros_like(probability)
        return Refinement(reconstruction, reconstruction, zero, probability / 2, region)
    pseudo, _ = inpaint(net, x, region, healthy_tokens, steps, seed, strength)
    residual = residual_map(net, reconstruction, pseudo) * region
    refined = torch.where(region, (probability * residual).sqrt(), probability / 2)
    return Refinement(pseudo, reconstruction, residual, refined, region)
