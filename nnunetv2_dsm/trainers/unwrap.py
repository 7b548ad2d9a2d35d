"""The trained network of any trainer of this package, without nnU-Net's DDP and ``torch.compile`` wrappers."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunetv2_dsm.networks.unwrap import uncompiled


def bare_network(trainer: nnUNetTrainer) -> nn.Module:
    """``trainer.network`` with ``DistributedDataParallel`` (``is_ddp``) and ``torch.compile`` removed."""
    return uncompiled(trainer.network.module if trainer.is_ddp else trainer.network)
