"""Plans-style arch_kwargs of nnU-Net's 3d ResidualEncoderUNet, shared by the benchmarks."""

# Residual blocks per encoder stage of nnU-Net's ResEnc-M plans.
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6)


def resenc_arch_kwargs(features: list[int], blocks: list[int] | None = None) -> dict:
    """ResEnc arch_kwargs as nnU-Net's ResEnc plans write them (3d, stride 1 then 2 per stage)."""
    n_stages = len(features)
    blocks = list(RESENC_M_BLOCKS[:n_stages]) if blocks is None else blocks
    if len(blocks) != n_stages:
        raise SystemExit(f"--blocks needs one value per stage ({n_stages}), got {blocks}")
    return {
        "n_stages": n_stages,
        "features_per_stage": features,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * n_stages,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
        "n_blocks_per_stage": blocks,
        "n_conv_per_stage_decoder": [1] * (n_stages - 1),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
