"""Optimiser of DSM training: nnU-Net's SGD for the CNN, AdamW for the query decoder.

nnU-Net trains its CNNs with SGD (lr 1e-2, momentum 0.99, Nesterov). Query decoders with attention,
LayerNorms, learned queries, logit scales and an SSM are trained with AdamW in the decoders DSM
follows (Mask2Former, kMaX-DeepLab: AdamW, no weight decay on norms and embeddings; Mamba: no weight
decay on ``A_log`` and ``D``). Under SGD with momentum 0.99 those parameters, whose gradients sum over
every pixel, take steps far larger than the convolutions'. torch has no optimiser with per-group
algorithms, so :class:`DSMOptimizer` steps one SGD and one AdamW and presents their parameter groups
as one list, which is what nnU-Net's training loop, checkpoints and GradScaler use.
"""

from collections.abc import Iterable

import torch
from torch import nn

# Parameters of the CNN: the ResEnc encoder and the UNet pixel decoder (not its mask product head).
CNN_PREFIXES = ("encoder.", "decoder.")
DECODER_HEAD_PREFIXES = ("decoder.pixel_proj.",)


def _no_decay(name: str, parameter: nn.Parameter, module: nn.Module) -> bool:
    return (getattr(parameter, "_no_weight_decay", False) or parameter.ndim <= 1
            or isinstance(module, (nn.Embedding, nn.LayerNorm)))


def dsm_parameter_groups(network: nn.Module) -> tuple[list, list, list]:
    """(CNN parameters, decoder parameters with weight decay, decoder parameters without it)."""
    owner = {id(p): m for m in network.modules() for p in m.parameters(recurse=False)}
    cnn, decay, no_decay = [], [], []
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith(CNN_PREFIXES) and not name.startswith(DECODER_HEAD_PREFIXES):
            cnn.append(parameter)
        elif _no_decay(name, parameter, owner[id(parameter)]):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return cnn, decay, no_decay


class DSMOptimizer:
    """SGD for the CNN and AdamW for the decoder, stepped together; quacks like one torch optimiser."""

    def __init__(self, network: nn.Module, cnn_lr: float, cnn_weight_decay: float, decoder_lr: float,
                 decoder_weight_decay: float) -> None:
        cnn, decay, no_decay = dsm_parameter_groups(network)
        self.sgd = torch.optim.SGD(cnn, cnn_lr, weight_decay=cnn_weight_decay, momentum=0.99, nesterov=True)
        self.adamw = torch.optim.AdamW([{"params": decay, "weight_decay": decoder_weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}], lr=decoder_lr)
        self.optimizers = (self.sgd, self.adamw)
        for group in self.param_groups:
            group["base_lr"] = group["lr"]

    @property
    def param_groups(self) -> list[dict]:
        return [g for optimizer in self.optimizers for g in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {**self.sgd.state, **self.adamw.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("DSMOptimizer.step does not take a closure")
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"sgd", "adamw"}:
            raise ValueError("this checkpoint's optimiser state is not a DSMOptimizer's (SGD + AdamW); it was "
                             "written by another trainer. Start a new run, or load only the weights with "
                             "-pretrained_weights.")
        self.sgd.load_state_dict(state["sgd"])
        self.adamw.load_state_dict(state["adamw"])


class PolyLRPerGroup:
    """nnU-Net's polynomial decay, ``base_lr * (1 - step / max_steps) ** 0.9``, applied to every
    group's own base learning rate (nnU-Net's PolyLRScheduler sets all groups to one value)."""

    def __init__(self, optimizer: DSMOptimizer, max_steps: int, exponent: float = 0.9) -> None:
        self.optimizer = optimizer
        self.max_steps = max_steps
        self.exponent = exponent
        self.ctr = 0
        self.step(0)

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        factor = (1 - current_step / self.max_steps) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr


def parameter_names(network: nn.Module, parameters: Iterable[nn.Parameter]) -> list[str]:
    ids = {id(p) for p in parameters}
    return [n for n, p in network.named_parameters() if id(p) in ids]


class ConstantAfterWarmup(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up over ``warmup`` epochs, then constant; ``step(epoch)`` as nnU-Net calls it."""

    def __init__(self, optimizer, warmup: int):
        super().__init__(optimizer, lambda epoch: min(1.0, (epoch + 1) / max(1, warmup)))

    def step(self, epoch=None):  # nnU-Net passes the epoch
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
