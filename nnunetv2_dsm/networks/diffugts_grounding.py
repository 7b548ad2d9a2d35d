"""Token-level grounding of the DiffuGTS denoiser's cross-attention (TokenCompose, Wang et al., CVPR 2024).

DiffuGTS reads organs and lesions off the cross-attention of a *foundation* diffusion model, whose
attention is grounded by pretraining on very many images. The stand-in trained here from one or a few
patients is not: with the noise-prediction loss alone, its attention maps of a class's token score the
class's own voxels with AUROC 0.18-0.73 on its training slices (``benchmarks/diffugts_attention.py``).
TokenCompose's two grounding objectives supervise the cross-attention of each text token with the mask
of what it names, next to the noise-prediction loss; here the masks are the training labels of the
classes whose tokens condition the slice:

- token loss, per layer ``l`` and token ``k``: ``(1 - sum_{u in M_k} A_lk(u) / sum_u A_lk(u))^2``, the
  attention mass of the token that falls outside its mask (the mask resized to the layer, binarised);
- pixel loss: binary cross-entropy between the token's layer-averaged map and its mask.

TokenCompose computes both from the attention of the training forward pass; it has no library
implementation, so it is written here on the maps ``CrossAttentionStore`` records.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def _resized(masks: Tensor, size: tuple[int, int]) -> Tensor:
    # masks: (B, L, H, W) in {0, 1} -> (B, L, *size) in {0, 1} (area resize, then > 0, as TokenCompose)
    return (F.interpolate(masks, size=size, mode="area") > 0).to(masks.dtype)


def grounding_losses(maps: list[Tensor], masks: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(token loss, pixel loss) over the tokens with ``weight`` > 0 (per sample and token).

    ``maps``: per cross-attention layer, (B, L, h_l, w_l) attention probabilities (softmax over the L
    tokens); ``masks``: (B, L, H, W) the mask each token names; ``weight``: (B, L), 0 for padding tokens
    and for samples the losses leave out.
    """
    # maps: n_layers x (B, L, h_l, w_l), masks: (B, L, H, W), weight: (B, L) -> 2 x scalar
    total = weight.sum().clamp_min(1.0)
    token = masks.new_zeros(())
    for layer in maps:
        inside = (layer * _resized(masks, tuple(layer.shape[2:]))).flatten(2).sum(-1)
        fraction = inside / layer.flatten(2).sum(-1).clamp_min(1e-8)
        token = token + ((1 - fraction) ** 2 * weight).sum() / total
    size = tuple(maps[0].shape[2:])
    mean = torch.stack([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]).mean(0)
    with torch.autocast(mean.device.type, enabled=False):
        bce = F.binary_cross_entropy(mean.float().clamp(1e-6, 1 - 1e-6), _resized(masks, size).float(),
                                     reduction="none").flatten(2).mean(-1)
    pixel = (bce * weight).sum() / total
    return token / len(maps), pixel
