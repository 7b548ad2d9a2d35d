"""The trained network of any trainer of this package, without nnU-Net's DDP and ``torch.compile`` wrappers."""

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch._dynamo import OptimizedModule


def bare_network(trainer: nnUNetTrainer) -> nn.Module:
    """``trainer.network`` with ``DistributedDataParallel`` (``is_ddp``) and ``torch.compile`` removed."""
    module = trainer.network.module if trainer.is_ddp else trainer.network
    return module._orig_mod if isinstance(module, OptimizedModule) else module
