"""Every selective-scan backend of this device, side by side: parity and speed, forward and backward.

Backends (``nnunetv2_dsm.networks.ssm``): on CUDA ``triton`` and ``torch`` (and ``mamba`` when its
compiled extension imports); on CPU ``compiled`` and ``torch`` (``triton`` too, interpreted, with
``--interpreted``, for checking the script only). Inputs are those of a freshly initialised Mamba block
of DSM size (``benchmarks/ssm_scan.py``). Parity is measured against the ``torch`` backend in float64
(outputs and the gradients of u, delta, A, B, C, D, z, delta_bias, relative to the largest value), speed
as the median of ``--repeats`` forward+backward steps after a warm-up (CUDA: synchronised wall time;
CPU: process CPU time). Writes ``benchmarks/results/scan_backends_<device>.json``.

    python benchmarks/scan_backends.py                 # L = 1e4, 1e5 on the default device
    python benchmarks/scan_backends.py --lengths 1000  # quick
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import write_json  # noqa: E402
from ssm_scan import make_inputs  # noqa: E402

from nnunetv2_dsm.networks import ssm  # noqa: E402

GRAD_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def backends_for(device: torch.device, interpreted: bool) -> list[str]:
    if device.type == "cuda":
        names = ["triton", "torch"]
        if ssm._fused_selective_scan() is not None:
            names.insert(0, "mamba")
        return names
    names = ["compiled", "torch"] if ssm.cpu_kernels.load_kernels() is not None else ["torch"]
    return names + (["triton"] if interpreted and os.environ.get("TRITON_INTERPRET") == "1" else [])


def step(inputs: dict, backend: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict]:
    leaves = {k: v.to(dtype).clone().requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}
    y = ssm.selective_scan(**leaves, backend=backend)
    # a fixed pseudo-random output gradient (sin of the index), the same for every backend
    grad = torch.sin(torch.arange(y.numel(), device=y.device, dtype=y.dtype)).view_as(y)
    y.backward(grad)
    return y.detach(), {k: leaves[k].grad for k in GRAD_INPUTS if leaves[k].grad is not None}


def timed(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - wall if device.type == "cuda" else time.process_time() - cpu)
    return statistics.median(times)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--interpreted", action="store_true", help="on CPU also time Triton's interpreter")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or ROOT / "benchmarks" / "results" / f"scan_backends_{device.type}.json"
    backends = backends_for(device, args.interpreted)
    batch, dim, d_state = 2, 64, 16

    entries = []
    for length in args.lengths:
        inputs = make_inputs(batch, dim, d_state, length, device)
        y_ref, g_ref = step(inputs, "torch", torch.float64)
        entry = {"L": length}
        for backend in backends:
            y, grads = step(inputs, backend)  # also the warm-up (Triton compiles here)
            seconds = timed(lambda backend=backend, inputs=inputs: step(inputs, backend), args.repeats, device)
            with torch.no_grad():
                forward = timed(lambda backend=backend, inputs=inputs: ssm.selective_scan(**inputs, backend=backend),
                                args.repeats, device)
            entry[backend] = {
                "forward_backward_s": round(seconds, 5),
                "forward_no_grad_s": round(forward, 5),
                "max_rel_error_output": relative_error(y, y_ref),
                "max_rel_error_gradients": max(relative_error(grads[k], g_ref[k]) for k in g_ref),
            }
            print(json.dumps({"L": length, backend: entry[backend]}), flush=True)
        if "triton" in entry and "torch" in entry:
            entry["speedup_triton_over_torch"] = round(
                entry["torch"]["forward_backward_s"] / entry["triton"]["forward_backward_s"], 3)
        entries.append(entry)

    result = {
        "benchmark": "selective_scan backends: forward+backward and forward-only time, parity vs float64 PyTorch scan",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "auto_backend": ssm.scan_backend(device.type),
        "backends": backends,
        "timer": "synchronised wall seconds" if device.type == "cuda" else "process CPU seconds",
        "threads": args.threads,
        "shape": {"batch": batch, "d_inner": dim, "d_state": d_state},
        "inputs": "Mamba init statistics (benchmarks/ssm_scan.py), delta_softplus, D and z",
        "torch": torch.__version__,
        "entries": entries,
    }
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
