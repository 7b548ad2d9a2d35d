"""A network without ``torch.compile``'s wrapper: the module whose attributes and weights are the model's."""

from torch import nn
from torch._dynamo import OptimizedModule


def uncompiled(network: nn.Module) -> nn.Module:
    """``network`` itself, or the module ``torch.compile`` wrapped."""
    return network._orig_mod if isinstance(network, OptimizedModule) else network
