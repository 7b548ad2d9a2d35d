"""Time ``selective_scan`` against mamba_ssm's sequential ``selective_scan_ref`` (and its fused kernel on CUDA).

On CPU "ours" is the compiled C kernel when a compiler is available; the PyTorch chunked scan is timed
alongside (``pytorch_scan_*`` keys).

Writes benchmarks/results/ssm_scan_<device>.json. Inputs follow a freshly initialised Mamba block of DSM
size: batch 2, d_inner 64, d_state 16, A = -(1..16) (S4D-real), delta_bias from Mamba's dt init
(softplus(delta_bias) log-uniform in [1e-3, 1e-1]) plus N(0, 0.1^2) raw delta, delta_softplus, D and z.

    python benchmarks/ssm_scan.py            # L = 1e3, 1e4, 1e5
    python benchmarks/ssm_scan.py --quick    # L = 1e3, 1e4
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _mamba_reference import load_selective_scan_ref  # noqa: E402
from _results import write_json  # noqa: E402

from nnunetv2_dsm.networks.cpu_kernels import load_kernels  # noqa: E402
from nnunetv2_dsm.networks.ssm import _fused_selective_scan, selective_scan  # noqa: E402


def make_inputs(batch: int, dim: int, d_state: int, length: int, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = {
        "u": torch.randn(batch, dim, length, generator=gen),
        "delta": 0.1 * torch.randn(batch, dim, length, generator=gen),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, d_state, length, generator=gen),
        "C": torch.randn(batch, d_state, length, generator=gen),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=gen),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }
    return {k: v.to(device) for k, v in inputs.items()} | {"delta_softplus": True}


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[list[float], list[float], torch.Tensor]:
    walls, cpus = [], []
    out = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only L = 1e3 and 1e4")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of our scan per length")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/ssm_scan_<device>.json)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_path = args.out or ROOT / "benchmarks" / "results" / f"ssm_scan_{device.type}.json"
    reference = load_selective_scan_ref()
    fused = _fused_selective_scan() if device.type == "cuda" else None
    batch, dim, d_state = 2, 64, 16
    lengths = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]

    entries = []
    with torch.no_grad():
        for length in tqdm(lengths, desc="ssm_scan", unit="L"):
            kw = make_inputs(batch, dim, d_state, length, device)
            timed(lambda kw=kw: selective_scan(**kw, chunk_size=args.chunk_size), 1, device)  # warm-up
            ours_wall, ours_cpu, ours = timed(
                lambda kw=kw: selective_scan(**kw, chunk_size=args.chunk_size), args.repeats, device)
            # The reference loops over every step in Python: one run at 1e5 takes seconds.
            ref_repeats = 3 if length <= 10_000 else 1
            ref_wall, ref_cpu, ref = timed(lambda kw=kw: reference(**kw), ref_repeats, device)
            if device.type == "cpu":
                # The PyTorch chunked scan, which runs where no C compiler is available.
                torch_wall, _, torch_out = timed(
                    lambda kw=kw: selective_scan(**kw, chunk_size=args.chunk_size, cpu_kernel=False), args.repeats,
                    device)
            entry = {
                "L": length,
                "ours_s": statistics.median(ours_wall),
                "ours_cpu_s": statistics.median(ours_cpu),
                "ours_repeats": args.repeats,
                "reference_s": statistics.median(ref_wall),
                "reference_cpu_s": statistics.median(ref_cpu),
                "reference_repeats": ref_repeats,
                "speedup_vs_reference": statistics.median(ref_wall) / statistics.median(ours_wall),
                "speedup_vs_reference_cpu_time": statistics.median(ref_cpu) / statistics.median(ours_cpu),
                "max_abs_diff": (ours - ref).abs().max().item(),
                "max_abs_reference": ref.abs().max().item(),
            }
            if device.type == "cpu":
                entry["pytorch_scan_s"] = statistics.median(torch_wall)
                entry["pytorch_scan_speedup_vs_reference"] = statistics.median(ref_wall) / statistics.median(torch_wall)
                entry["pytorch_scan_max_abs_diff"] = (torch_out - ref).abs().max().item()
            if fused is not None:
                fused_wall, _, fused_out = timed(lambda kw=kw: fused(**kw), args.repeats, device)
                entry["fused_s"] = statistics.median(fused_wall)
                entry["fused_max_abs_diff"] = (fused_out - ref).abs().max().item()
            entries.append(entry)
            tqdm.write(json.dumps(entry))

    result = {
        "benchmark": "selective_scan forward without gradients vs mamba_ssm selective_scan_ref",
        "ours": "fused mamba_ssm kernel" if fused is not None else (
            "compiled CPU kernel" if load_kernels() is not None and device.type == "cpu" else "PyTorch chunked scan"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "shape": {"batch": batch, "d_inner": dim, "d_state": d_state, "chunk_size": args.chunk_size},
        "inputs": "Mamba init statistics: A=-(1..N), softplus(delta_bias) log-uniform [1e-3, 1e-1], "
                  "delta N(0, 0.1^2), u, B, C, z N(0, 1), D=1, delta_softplus",
        "timing": "median wall-clock seconds (process CPU seconds alongside); shared machine, expect noise",
        "fused_kernel": fused is not None,
        "entries": entries,
    }
    write_json(out_path, result)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
