"""Does the volumetric SDSeg fit the CPU budget? One training step of each, side by side.

Times forward+backward of (a) the 2D SDSeg of ``SDSegPlannerCPU`` (128x128 patch, batch 12: the
latent estimation step, autoencoder frozen), (b) the 3D SDSeg that ``SDSegPlannerCPU`` plans for
``3d_fullres`` (``SDSegTrainer3d``: MONAI's ``AutoencoderKL`` and ``DiffusionModelUNet`` with
``spatial_dims=3``, same widths, the CPU plans' patch 32x64x80 rounded up to 32x64x96 as
``SDSegPlanner`` rounds, batch 2) and (c) nnU-Net's ResEnc at the same 3D patch and batch (the CPU
plans' widths), alternating the three, and writes the per-step CPU seconds and ratios to
``benchmarks/results/sdseg_3d_cost_<device>.json``.

    python benchmarks/sdseg_3d_cost.py --repeats 3
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from nnunetv2_dsm.io import atomic
from nnunetv2_dsm.networks.sdseg import SDSegNetwork
from nnunetv2_dsm.planners.sdseg_planner import SDSEG_3D_CPU, SDSEG_CPU

RESULTS = Path(__file__).resolve().parent / "results"


def step_2d(batch: int = 12, patch=(128, 128)):
    net = SDSegNetwork(1, 6, **SDSEG_CPU)
    net.autoencoder.requires_grad_(False)
    x, masks = torch.randn(batch, 1, *patch), (torch.rand(batch, 1, *patch) > 0.9).float()
    classes = torch.randint(0, 5, (batch,))

    def step():
        net.diffusion_loss(x, masks, classes).backward()
    return step


def step_3d(batch: int = 2, patch=(32, 64, 96)):
    net = SDSegNetwork(1, 6, **SDSEG_3D_CPU)  # what SDSegPlannerCPU plans for 3d_fullres
    net.autoencoder.requires_grad_(False)
    x, masks = torch.randn(batch, 1, *patch), (torch.rand(batch, 1, *patch) > 0.9).float()
    classes = torch.randint(0, 5, (batch,))

    def step():
        net.diffusion_loss(x, masks, classes).backward()
    return step


def step_resenc(batch: int = 2, patch=(32, 64, 80)):
    net = ResidualEncoderUNet(1, 5, (8, 16, 32, 64, 64), torch.nn.Conv3d, 3, (1, 2, 2, 2, 2), (1, 1, 2, 2, 2), 6,
                              (1, 1, 1, 1), True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
                              nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    x, y = torch.randn(batch, 1, *patch), torch.randint(0, 6, (batch, *patch))

    def step():
        out = net(x)[0]
        torch.nn.functional.cross_entropy(out, y).backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = {"sdseg_2d": step_2d(), "sdseg_3d": step_3d(), "resenc_3d": step_resenc()}
    times = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in steps.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
            print(f"{name}: {times[name][-1]:.2f} CPU s", flush=True)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    payload = {
        "what": "CPU seconds (process time, all threads) of one forward+backward training step",
        "sdseg_2d": "SDSegPlannerCPU network, 128x128, batch 12, autoencoder frozen",
        "sdseg_3d": "SDSegPlannerCPU's 3d_fullres network (SDSegTrainer3d: MONAI AutoencoderKL / DiffusionModelUNet, spatial_dims=3, the 2D widths), 32x64x96 (the CPU plans' 32x64x80 rounded up to a multiple of 32, as SDSegPlanner rounds), batch 2",
        "resenc_3d": "nnU-Net ResEnc, CPU plans' widths 8-64, 32x64x80, batch 2",
        "median_cpu_seconds": {k: round(v, 3) for k, v in median.items()},
        "all_cpu_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio_sdseg_3d_over_resenc_3d": round(median["sdseg_3d"] / median["resenc_3d"], 2),
        "ratio_sdseg_3d_over_sdseg_2d": round(median["sdseg_3d"] / median["sdseg_2d"], 2),
        "threads": args.threads, "device": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__},
        "load_average": [round(v, 2) for v in __import__("os").getloadavg()],
    }
    out = RESULTS / "sdseg_3d_cost_cpu.json"
    atomic.write_json(out, payload)
    print(json.dumps(payload["median_cpu_seconds"]), "->", out)


if __name__ == "__main__":
    main()
