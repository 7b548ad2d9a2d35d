"""Training-step cost of DSMNetwork relative to nnU-Net's ResidualEncoderUNet with the same arch kwargs.

Both networks are built through nnU-Net's ``get_network_from_plans`` from one plans-style
configuration; forward + backward steps (deep supervision on, as in nnU-Net training; DSM also
returns its extras for the class logits) are timed alternately after a warm-up and the medians are
compared (ratio of medians, and the median of per-repeat ratios). CPU steps are timed in process
CPU time, GPU steps in synchronised wall time. Writes
``benchmarks/results/train_step_<device>.json``.

    python benchmarks/train_step.py --patch 64 64 64 --batch 2 --threads 1
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _arch import resenc_arch_kwargs
from _results import write_json
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn
from tqdm import tqdm

from nnunetv2_dsm.networks.cpu_kernels import load_kernels
from nnunetv2_dsm.networks.ssm import scan_backend

RESULTS = Path(__file__).resolve().parent / "results"
DSM_CLASS = "nnunetv2_dsm.networks.dsm_network.DSMNetwork"
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def dsm_kwargs(args: argparse.Namespace) -> dict:
    return {
        "num_kmmm_layers": args.num_kmmm_layers,
        "query_dim": args.query_dim,
        "ssm_bidirectional": not args.unidirectional,
        "use_kmeans": not args.no_kmeans,
        "use_ssm": not args.no_ssm,
    }


def build(class_name: str, kwargs: dict, num_classes: int, device: torch.device) -> nn.Module:
    net = get_network_from_plans(
        class_name,
        kwargs,
        ["conv_op", "norm_op", "dropout_op", "nonlin"],
        1,
        num_classes,
        deep_supervision=True,
    )
    return net.to(device).train()


def make_step(net: nn.Module, x: torch.Tensor, with_extras: bool) -> Callable[[], None]:
    autocast = torch.autocast("cuda") if x.device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with autocast:
            if with_extras:
                outputs, extras = net(x, return_extras=True)
                loss = extras["class_logits"].float().mean()
            else:
                outputs, loss = net(x), 0.0
            loss = loss + sum(o.float().mean() for o in outputs)
        loss.backward()

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    # On a CPU shared with other jobs, wall time mostly measures the others; the process CPU time
    # of a fixed-thread-count run measures the work of this step.
    start = time.process_time()
    step()
    return time.process_time() - start


def profile(step: Callable[[], None], rows: int) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256, 320, 320])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 3, 4, 6, 6, 6])
    parser.add_argument("--num-classes", type=int, default=25)
    parser.add_argument("--num-kmmm-layers", type=int, default=4)
    parser.add_argument("--query-dim", type=int, default=128)
    parser.add_argument("--unidirectional", action="store_true", help="forward-only SSM scan")
    parser.add_argument("--no-kmeans", action="store_true", help="masked cross-attention instead of k-means")
    parser.add_argument("--no-ssm", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", type=int, default=0, help="print the top N ops of one DSM step")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if len(args.blocks) != len(args.features):
        parser.error("--blocks needs one entry per --features entry")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = resenc_arch_kwargs(args.features, args.blocks)
    resenc = build(RESENC_CLASS, kwargs, args.num_classes, device)
    dsm = build(DSM_CLASS, {**kwargs, **dsm_kwargs(args)}, args.num_classes, device)
    x = torch.randn(args.batch, 1, *args.patch, device=device)
    steps = {"resenc": make_step(resenc, x, False), "dsm": make_step(dsm, x, True)}

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in tqdm(range(args.warmup), desc="warm-up"):
        for step in steps.values():
            step()
    for _ in tqdm(range(args.repeats), desc="timed"):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    if args.profile:
        print(profile(steps["dsm"], args.profile))

    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["dsm"] / medians["resenc"]
    # The machine may be shared: the per-repeat ratio of neighbouring steps is less load-sensitive.
    paired = statistics.median(d / r for d, r in zip(times["dsm"], times["resenc"]))
    payload = {
        "ratio_dsm_over_resenc": round(ratio, 4),
        "paired_ratio_median": round(paired, 4),
        "resenc_step_s": round(medians["resenc"], 4),
        "dsm_step_s": round(medians["dsm"], 4),
        "timer": "wall_time" if device.type == "cuda" else "process_cpu_time",
        "times_s": {name: [round(v, 4) for v in t] for name, t in times.items()},
        "parameters": {
            "resenc": sum(p.numel() for p in resenc.parameters()),
            "dsm": sum(p.numel() for p in dsm.parameters()),
        },
        "config": {
            "patch": args.patch,
            "batch": args.batch,
            "num_classes": args.num_classes,
            "arch_kwargs": kwargs,
            "dsm_kwargs": dsm_kwargs(args),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "threads": args.threads,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else (platform.processor() or platform.machine()),
            "torch": torch.__version__,
            "cpu_scan": "compiled kernels" if load_kernels() is not None else "PyTorch chunked scan",
            "scan_backend": scan_backend(device.type),
            "amp": "float16 autocast (as nnU-Net)" if device.type == "cuda" else "off",
        },
        "command": " ".join(["python", *sys.argv]),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    out = args.out or RESULTS / f"train_step_{device.type}.json"
    write_json(out, payload)
    print(
        json.dumps(
            {
                k: payload[k]
                for k in ("ratio_dsm_over_resenc", "paired_ratio_median", "resenc_step_s", "dsm_step_s")
            }
        )
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
