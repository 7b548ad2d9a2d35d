"""One real training case and DSM's training loop, shared by tests/test_learning.py and benchmarks/overfit.py.

Patient A of the example data (TotalSegmentator labels), axial slices at 3 mm with liver and spleen,
DSMTrainer's optimiser (nnU-Net's SGD for the CNN, AdamW for the query decoder), gradient clipping at
12 and the DSM loss with deep supervision; optionally under autocast with nnU-Net's gradient scaler.
"""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnunetv2_dsm.losses import PartialLabelDeepSupervision, PartialLabelDiceBCELoss
from nnunetv2_dsm.networks.dsm_network import DSMNetwork
from nnunetv2_dsm.trainers.dsm_trainer import DSMTrainer
from nnunetv2_dsm.trainers.optim import DSMOptimizer

# liver, spleen, right and left kidney, stomach in TotalSegmentator's "total" ids
ORGANS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 6}


def load_case(example_ct_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial slices of patient A at 3 mm that show liver and spleen, intensities as nnU-Net's CT scheme."""
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(example_ct_dir / "example_ct.nii.gz"))).astype(np.float32)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(example_ct_dir / "example_seg_fast_force_split.nii.gz")))
    keep = [(seg[z] == ORGANS["liver"]).any() and (seg[z] == ORGANS["spleen"]).any() for z in range(len(seg))]
    ct, seg = ct[keep], seg[keep]
    image = (np.clip(ct, -1000, 600) - 30) / 300
    # 96 x 112 in-plane crop around the organs (the volume is 101 x 122)
    image, seg = image[:, 2:98, 5:117], seg[:, 2:98, 5:117]
    target = np.stack([seg == v for v in ORGANS.values()], 1).astype(np.float32)
    return torch.from_numpy(image[:, None]), torch.from_numpy(target)


def build_network() -> DSMNetwork:
    torch.manual_seed(0)
    net = DSMNetwork(1, len(ORGANS), 5, [8, 16, 32, 64, 64], torch.nn.Conv2d, 3, [1, 2, 2, 2, 2], [1, 1, 2, 2, 2],
                     [1, 1, 1, 1], conv_bias=True, norm_op=torch.nn.InstanceNorm2d,
                     norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                     nonlin_kwargs={"inplace": True}, deep_supervision=True, num_kmmm_layers=4, query_dim=32,
                     ffn_dim=64, num_heads=4, ssm_bidirectional=False)
    net.apply(net.initialize)
    return net


def train(net: DSMNetwork, case, steps: int, batch: int = 6, on_step=None, amp: bool = False) -> list[float]:
    """Train ``steps`` iterations; ``amp`` runs forward and loss under autocast (float16 on CUDA, bfloat16
    on CPU) with nnU-Net's gradient scaler on CUDA. Returns the losses; ``on_step(step, outputs)`` may stop."""
    device = next(net.parameters()).device
    image, target = (t.to(device) for t in case)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    # DSMTrainer's optimiser: nnU-Net's SGD for the CNN, AdamW for the query decoder.
    optimizer = DSMOptimizer(net, 1e-2, 3e-5, DSMTrainer.decoder_lr, DSMTrainer.decoder_weight_decay)
    weights = np.array([1 / 2 ** i for i in range(5)])
    loss_fn = PartialLabelDeepSupervision(PartialLabelDiceBCELoss(), list(weights / weights.sum()))
    rng = np.random.default_rng(0)
    losses = []
    for step in range(steps):
        index = torch.from_numpy(rng.choice(len(image), batch, replace=False)).to(device)
        x, y = image[index], target[index]
        with torch.autocast(device.type, dtype=half) if amp else nullcontext():
            outputs = net(x)
            targets = [torch.nn.functional.interpolate(y, size=o.shape[2:], mode="nearest") for o in outputs]
            loss = loss_fn(outputs, targets, torch.ones(batch, y.shape[1], dtype=torch.bool, device=device))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            optimizer.step()
        losses.append(loss.item())
        if on_step is not None and on_step(step, outputs):
            break
    return losses


def dice(net: DSMNetwork, case) -> np.ndarray:
    """Training Dice per organ (all slices of the case, thresholded logits)."""
    device = next(net.parameters()).device
    image, target = (t.to(device) for t in case)
    net.eval()
    with torch.no_grad():
        net.deep_supervision = False
        prediction = net(image) > 0
        net.deep_supervision = True
    net.train()
    intersection = (prediction & target.bool()).sum((0, 2, 3)).float()
    return (2 * intersection / (prediction.sum((0, 2, 3)) + target.sum((0, 2, 3))).clamp_min(1)).cpu().numpy()
