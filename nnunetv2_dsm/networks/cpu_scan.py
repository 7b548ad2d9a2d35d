"""Compiled CPU kernel for the no-gradient selective scan.

mamba-ssm ships fused kernels for CUDA only, and its CPU fallback is a Python loop over the sequence.
A scan is sequential by nature and PyTorch has no scan primitive, so every PyTorch formulation streams
several (batch, dim, d_state, L) intermediates through memory; a plain C loop keeps the d_state
states in registers and is several times faster. The kernel (``csrc/selective_scan_cpu.c``) is
compiled on first use with the system C compiler (``CC``, default ``cc``) into the DSM cache folder
and loaded with ctypes, which releases the GIL, so rows are split among ``torch.get_num_threads()``
Python threads. Without a working compiler, or with ``DSM_CPU_SCAN_KERNEL=0``, ``load_kernel``
returns None and callers use the PyTorch scan.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from nnunetv2_dsm.data.fetch import cache_dir

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.c"
# -ffast-math lets GCC call glibc's SIMD exp (libmvec). Compiling and linking are separate steps: linking
# with -ffast-math would add crtfastmath.o, which switches the whole process to flush-denormals-to-zero.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-c")
LINK_FLAGS = ("-shared",)
# libmvec exists on glibc only; elsewhere the kernel links without it and exp stays scalar.
LIBRARY_SETS = (("-lmvec", "-lm"), ("-lm",))
# Below this many state updates a second thread costs more than it saves.
_MIN_UPDATES_PER_THREAD = 1 << 18
_SYMBOLS = {torch.float32: "dsm_selective_scan_f32", torch.float64: "dsm_selective_scan_f64"}


def _cpu_flags() -> str:
    # -march=native code must not be reused on another CPU (a shared home folder, say).
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path() -> Path:
    """Where the compiled kernel for this source, these flags and this CPU is cached."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(COMPILE_FLAGS + LINK_FLAGS).encode(), platform.machine().encode(),
                 _cpu_flags().encode()):
        key.update(part)
    return cache_dir() / "kernels" / f"selective_scan_cpu-{key.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    compiler = shlex.split(os.environ.get("CC", "cc"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "scan.o", Path(tmp) / "scan.so"
        subprocess.run([*compiler, *COMPILE_FLAGS, str(SOURCE), "-o", str(obj)], check=True, capture_output=True,
                       text=True)
        errors = []
        for libraries in LIBRARY_SETS:
            result = subprocess.run([*compiler, *LINK_FLAGS, str(obj), "-o", str(lib), *libraries],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                # Atomic: a concurrent process sees either no library or a complete one.
                os.replace(lib, target)
                return
            errors.append(result.stderr.strip())
        raise subprocess.CalledProcessError(result.returncode, result.args, stderr="\n".join(errors))


@functools.cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled scan library, compiling it once per machine; None when disabled or unavailable."""
    if os.environ.get("DSM_CPU_SCAN_KERNEL", "1") == "0":
        return None
    target = library_path()
    try:
        if not target.is_file():
            _compile(target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(
            f"Could not build the CPU selective-scan kernel {target} ({detail}); using the slower PyTorch scan. "
            "Install a C compiler (gcc or clang, or set CC) to enable it, or set DSM_CPU_SCAN_KERNEL=0 to "
            "silence this warning.",
            stacklevel=2,
        )
        return None
    for symbol in _SYMBOLS.values():
        getattr(library, symbol).argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 7
        getattr(library, symbol).restype = ctypes.c_int
    return library


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="dsm-scan")


def kernel_scan(library: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
                delta_softplus: bool = False) -> Tensor:
    """The selective scan of ``mamba_ssm``'s ``selective_scan_fn`` from a zero state, without gradients.

    u, delta, z: (b, D, L); A: (D, N); B, C: (b, G, N, L); D, delta_bias: (D,); all CPU tensors of one
    dtype, float32 or float64 -> y: (b, D, L)
    """
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    # (b, G, L, N): the kernel's inner loop runs over the N states of one step
    Bt, Ct = B.transpose(-1, -2).contiguous(), C.transpose(-1, -2).contiguous()
    inputs = [t if t is None else t.contiguous() for t in (u, delta, A, Bt, Ct, D, z, delta_bias)]
    y = torch.empty_like(inputs[0])
    pointers = [None if t is None else t.data_ptr() for t in inputs] + [y.data_ptr()]
    scan = getattr(library, _SYMBOLS[u.dtype])
    rows = batch * dim
    sizes = (dim, groups, d_state, length, int(delta_softplus))
    workers = max(1, min(torch.get_num_threads(), rows, rows * length * d_state // _MIN_UPDATES_PER_THREAD))
    if workers == 1:
        failures = [scan(*pointers, *sizes, 0, rows)]
    else:
        bounds = [rows * i // workers for i in range(workers + 1)]
        jobs = [_thread_pool(workers).submit(scan, *pointers, *sizes, begin, end)
                for begin, end in zip(bounds[:-1], bounds[1:])]
        failures = [job.result() for job in jobs]
    if any(failures):
        raise MemoryError(f"selective scan kernel: no memory for the work buffers of a sequence of length {length}")
    return y
