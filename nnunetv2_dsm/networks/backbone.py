"""Pixel decoder of the DSM backbone: nnU-Net's UNetDecoder exposing multi-scale features and the
full-resolution pixel embedding E.

The encoder is dynamic-network-architectures' ResidualEncoder, used unchanged. UNetDecoder.forward
only returns segmentation outputs, so this subclass reuses its transposed convolutions and conv
stages (same modules, same state-dict keys, so ResEnc decoder weights load) and re-implements the
loop to keep every stage output.
"""

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from nnunetv2_dsm.networks.heads import NormalisedMaskProduct


def num_feature_levels(n_stages: int, num_kmmm_layers: int) -> int:
    """Number of multi-scale levels fed to the kMMM decoder; stage 0 is reserved for E."""
    if n_stages < 2:
        raise ValueError(f"DSMNetwork needs n_stages >= 2 (got {n_stages}): fix n_stages in the plans.")
    if num_kmmm_layers < 1:
        raise ValueError(
            f"num_kmmm_layers must be >= 1 (got {num_kmmm_layers}): fix arch_kwargs in the plans."
        )
    return min(num_kmmm_layers, n_stages - 1)


def feature_level_stages(n_stages: int, num_kmmm_layers: int) -> list[int]:
    """Encoder stage index (resolution) of each multi-scale level, coarse to fine."""
    levels = num_feature_levels(n_stages, num_kmmm_layers)
    return [n_stages - 1 - k for k in range(levels)]


class DSMPixelDecoder(UNetDecoder):
    """UNet decoder that returns multi-scale features projected to ``query_dim`` and the last stage output.

    Level 0 is the bottleneck (encoder stage n-1), level k >= 1 the output of decoder stage k-1
    (resolution of encoder stage n-1-k). The pixel embedding E is the last decoder stage output,
    L2-normalised over channels (``pixel_proj.embed``); ``pixel_proj`` is a NormalisedMaskProduct,
    which forms the masks without materialising E.
    """

    def __init__(
        self,
        encoder: ResidualEncoder | PlainConvEncoder,
        query_dim: int,
        num_levels: int,
        n_conv_per_stage: int | tuple[int, ...] | list[int],
        deep_supervision: bool = False,
    ) -> None:
        super().__init__(encoder, query_dim, n_conv_per_stage, deep_supervision)
        # UNetDecoder's per-stage 1x1 class heads would be untrained parameters: DSM predicts masks
        # from queries, so they are removed.
        del self.seg_layers
        n_stages = len(encoder.output_channels)
        if not 1 <= num_levels <= n_stages - 1:
            raise ValueError(
                f"num_levels must be in [1, {n_stages - 1}] for {n_stages} stages, got {num_levels}."
            )
        self.num_levels = num_levels
        level_channels = [encoder.output_channels[n_stages - 1 - k] for k in range(num_levels)]
        self.level_proj = nn.ModuleList(
            [
                encoder.conv_op(c, query_dim, kernel_size=1, stride=1, padding=0, bias=True)
                for c in level_channels
            ]
        )
        self.pixel_proj = NormalisedMaskProduct(encoder.output_channels[0], query_dim)

    def forward(self, skips: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        # skips: encoder outputs fine to coarse -> ([(B, C, *S_l)] coarse to fine, (B, C_0, *S_0))
        x = skips[-1]
        levels = [self.level_proj[0](x)]
        for s in range(len(self.stages)):
            # One step per line, as in UNetDecoder, so each intermediate is freed before the next conv.
            x = self.transpconvs[s](x)
            x = torch.cat((x, skips[-(s + 2)]), 1)
            x = self.stages[s](x)
            if s + 1 < self.num_levels:
                levels.append(self.level_proj[s + 1](x))
        return levels, x

    def pixel_embedding(self, last_stage_output: torch.Tensor) -> torch.Tensor:
        # last_stage_output: (B, C_0, *S_0) -> E: (B, C_0, *S_0)
        return self.pixel_proj.embed(last_stage_output)
