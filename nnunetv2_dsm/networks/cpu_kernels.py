"""Compiled CPU kernels for the selective scan (prediction, and training with a backward kernel) and
for the no-gradient path of DQR's guided diffusion.

mamba-ssm ships fused kernels for CUDA only, and its CPU fallback is a Python loop over the sequence.
A scan is sequential by nature and PyTorch has no scan primitive, so every PyTorch formulation streams
several (batch, dim, d_state, L) intermediates through memory; a plain C loop keeps the d_state
states in registers. Likewise the guided diffusion weighs each position's k^d neighbours with
position-dependent weights, which no convolution expresses; in PyTorch it takes k^d passes over the
feature map per step, where C reads every neighbour from cache in one pass. The training scan
(``scan_train_forward`` / ``scan_train_backward``) is the same loop with an adjoint pass; the
diffusion trains in PyTorch (autograd). The kernels give the PyTorch values several times faster.

The sources (``csrc/*.c``) are compiled on first use with the system C compiler (``CC``, default
``cc``) into one library in the DSM cache folder and loaded with ctypes, which releases the GIL, so
work is split among ``torch.get_num_threads()`` Python threads. Without a working compiler, or with
``DSM_CPU_KERNELS=0``, ``load_kernels`` returns None and callers use PyTorch.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from nnunetv2_dsm import settings
from nnunetv2_dsm.settings import cache_dir

SOURCES = tuple(sorted((Path(__file__).with_name("csrc")).glob("*.c")))
# -ffast-math lets GCC call glibc's SIMD exp (libmvec). Compiling and linking are separate steps: linking
# with -ffast-math would add crtfastmath.o, which switches the whole process to flush-denormals-to-zero.
COMPILE_FLAGS = ("-O3", "-ffast-math", "-fopenmp-simd", "-fPIC", "-c")
# Tried in order: some compilers (older Apple clang on arm64) reject -march=native.
ARCH_FLAG_SETS = (("-march=native",), ())
LINK_FLAGS = ("-shared",)
# libmvec exists on glibc only; elsewhere the kernels link without it and exp stays scalar.
LIBRARY_SETS = (("-lmvec", "-lm"), ("-lm",))
# Below this many inner-loop updates a second thread costs more than it saves.
_MIN_WORK_PER_THREAD = 1 << 18
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_SIGNATURES = {
    "dsm_selective_scan": ([ctypes.c_void_p] * 9 + [ctypes.c_int64] * 7, ctypes.c_int),
    "dsm_neighbour_cosine": ([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 9, None),
    "dsm_diffusion_step": ([ctypes.c_void_p] * 2 + [None] + [ctypes.c_void_p] + [ctypes.c_int64] * 9, None),
    "dsm_scan_fwd": ([ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7, ctypes.c_int),
    "dsm_scan_bwd": ([ctypes.c_void_p] * 12 + [ctypes.c_int64] * 7, ctypes.c_int),
}
# Steps per chunk of the training scan: the backward pass recomputes one chunk's states at a time.
TRAIN_CHUNK = 64


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
    """Where the compiled kernels for these sources, these flags and this CPU are cached."""
    key = hashlib.sha256()
    for source in SOURCES:
        key.update(source.name.encode() + source.read_bytes())
    for part in (" ".join(COMPILE_FLAGS + LINK_FLAGS + ARCH_FLAG_SETS[0]), platform.machine(), _cpu_flags()):
        key.update(part.encode())
    return cache_dir() / "kernels" / f"dsm_cpu_kernels-{key.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    compiler = shlex.split(os.environ.get("CC", "cc"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
        for arch_flags in ARCH_FLAG_SETS:
            try:
                for source, obj in zip(SOURCES, objects):
                    subprocess.run([*compiler, *COMPILE_FLAGS, *arch_flags, str(source), "-o", obj], check=True,
                                   capture_output=True, text=True)
                break
            except subprocess.CalledProcessError:
                if arch_flags == ARCH_FLAG_SETS[-1]:
                    raise
        lib = Path(tmp) / "kernels.so"
        errors = []
        for libraries in LIBRARY_SETS:
            result = subprocess.run([*compiler, *LINK_FLAGS, *objects, "-o", str(lib), *libraries],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                # Atomic: a concurrent process sees either no library or a complete one.
                os.replace(lib, target)
                return
            errors.append(result.stderr.strip())
        raise subprocess.CalledProcessError(result.returncode, result.args, stderr="\n".join(errors))


@functools.cache
def load_kernels() -> ctypes.CDLL | None:
    """The compiled kernel library, compiling it once per machine; None when disabled or unavailable."""
    if not settings.cpu_kernels_enabled():
        return None
    target = library_path()
    try:
        if not target.is_file():
            _compile(target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(
            f"Could not build the DSM CPU kernels {target} ({detail}); using the slower PyTorch code for the "
            "selective scan and the guided diffusion. Install a C compiler (gcc or clang, or set CC) to enable "
            "them, or set DSM_CPU_KERNELS=0 to silence this warning.",
            stacklevel=2,
        )
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        for dtype, suffix in _SUFFIX.items():
            function = getattr(library, f"{name}_{suffix}")
            real = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
            function.argtypes = [real if a is None else a for a in argtypes]
            function.restype = restype
    return library


def kernels_for(*tensors: Tensor) -> ctypes.CDLL | None:
    """The kernel library when these tensors can use it (CPU, float32/float64, no gradient wanted)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if any(t.device.type != "cpu" or t.dtype not in _SUFFIX for t in tensors):
        return None
    return load_kernels()


@functools.cache
def _thread_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="dsm-kernel")


# A forked child inherits the pools but not their threads: it must make its own.
os.register_at_fork(after_in_child=_thread_pool.cache_clear)


def _workers(items: int, work_per_item: int) -> int:
    return max(1, min(torch.get_num_threads(), items, items * work_per_item // _MIN_WORK_PER_THREAD))


def _split(function: Callable[..., int | None], args: list, items: int, work_per_item: int,
           per_worker: Callable[[int], list] | None = None) -> list[int | None]:
    """Calls ``function(*args, *per_worker(i), begin, end)`` over [0, items) split among threads; returns
    their results. ``per_worker`` gives arguments private to worker i (e.g. accumulation buffers)."""
    workers = _workers(items, work_per_item)
    extra = per_worker or (lambda i: [])
    if workers == 1:
        return [function(*args, *extra(0), 0, items)]
    bounds = [items * i // workers for i in range(workers + 1)]
    jobs = [_thread_pool(workers).submit(function, *args, *extra(i), begin, end)
            for i, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return [job.result() for job in jobs]


def selective_scan(library: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
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
    function = getattr(library, f"dsm_selective_scan_{_SUFFIX[u.dtype]}")
    results = _split(function, [*pointers, dim, groups, d_state, length, int(delta_softplus)], batch * dim,
                     length * d_state)
    if any(results):
        raise MemoryError(f"selective scan kernel: no memory for the work buffers of a sequence of length {length}")
    return y


def _grid(x: Tensor, kernel_size: int) -> tuple[int, ...]:
    # channels-last (B, *S, C) with 2 or 3 spatial dims -> S0, S1, S2, C, k0, k1, k2
    spatial = tuple(x.shape[1:-1])
    if len(spatial) == 2:
        return (1, *spatial, x.shape[-1], 1, kernel_size, kernel_size)
    return (*spatial, x.shape[-1], kernel_size, kernel_size, kernel_size)


def neighbour_cosine(library: ctypes.CDLL, phi: Tensor, kernel_size: int) -> Tensor:
    """<phi_i, phi_j> for every position i and its k^d neighbours j (0 outside the image).

    phi: channels last (B, *S, C), CPU float32/float64 -> (B, *S, k^d), neighbours in itertools.product order
    """
    phi = phi.contiguous()
    grid = _grid(phi, kernel_size)
    out = phi.new_empty(*phi.shape[:-1], grid[4] * grid[5] * grid[6])
    function = getattr(library, f"dsm_neighbour_cosine_{_SUFFIX[phi.dtype]}")
    _split(function, [phi.data_ptr(), out.data_ptr(), *grid], phi.shape[0] * grid[0],
           grid[1] * grid[2] * out.shape[-1] * grid[3])
    return out


def diffusion_step(library: ctypes.CDLL, f: Tensor, weights: Tensor, step_size: float, kernel_size: int) -> Tensor:
    """``f_i + step_size * (sum_j w_ij f_j - f_i sum_j w_ij)`` over the k^d neighbours (zero outside).

    f: channels last (B, *S, C), weights: (B, *S, k^d), CPU float32/float64 -> (B, *S, C)
    """
    f, weights = f.contiguous(), weights.contiguous()
    grid = _grid(f, kernel_size)
    out = torch.empty_like(f)
    function = getattr(library, f"dsm_diffusion_step_{_SUFFIX[f.dtype]}")
    _split(function, [f.data_ptr(), weights.data_ptr(), step_size, out.data_ptr(), *grid], f.shape[0] * grid[0],
           grid[1] * grid[2] * weights.shape[-1] * grid[3])
    return out


def scan_train_forward(library: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, Bt: Tensor,
                       Ct: Tensor) -> tuple[Tensor, Tensor]:
    """Core scan ``y_t = <C_t, h_t>`` and the states entering every chunk of ``TRAIN_CHUNK`` steps.

    u, delta: (b, D, L); A: (D, N); Bt, Ct: (b, G, L, N); contiguous CPU tensors of one dtype
    -> y: (b, D, L), states: (b, D, n_chunks, N)
    """
    batch, dim, length = u.shape
    groups, d_state = Bt.shape[1], A.shape[1]
    y = torch.empty_like(u)
    states = u.new_empty(batch, dim, -(-length // TRAIN_CHUNK), d_state)
    function = getattr(library, f"dsm_scan_fwd_{_SUFFIX[u.dtype]}")
    results = _split(function, [t.data_ptr() for t in (u, delta, A, Bt, Ct, y, states)]
                     + [dim, groups, d_state, length, TRAIN_CHUNK], batch * dim, length * d_state)
    if any(results):
        raise MemoryError("selective scan training kernel: no memory for its work buffers")
    return y, states


def scan_train_backward(library: ctypes.CDLL, u: Tensor, delta: Tensor, A: Tensor, Bt: Tensor, Ct: Tensor,
                        states: Tensor, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``scan_train_forward``'s y: (du, ddelta, dA, dBt, dCt), shaped as the inputs."""
    batch, dim, length = u.shape
    groups, d_state = Bt.shape[1], A.shape[1]
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    # Bound to a name: the kernel reads it through a raw pointer, so the tensor must outlive the call.
    dy = dy.contiguous()
    workers = _workers(batch * dim, length * d_state)
    # Rows of one channel (dA) or group (dB, dC) may go to different threads: one buffer set per thread.
    buffers = [(torch.zeros_like(A), torch.zeros_like(Bt), torch.zeros_like(Ct)) for _ in range(workers)]
    function = getattr(library, f"dsm_scan_bwd_{_SUFFIX[u.dtype]}")
    results = _split(function, [t.data_ptr() for t in (u, delta, A, Bt, Ct, states, dy, du, ddelta)],
                     batch * dim, length * d_state,
                     per_worker=lambda i: [t.data_ptr() for t in buffers[i]]
                     + [dim, groups, d_state, length, TRAIN_CHUNK])
    if any(results):
        raise MemoryError("selective scan training kernel: no memory for its work buffers")
    dA, dBt, dCt = (functools.reduce(torch.add, (parts[k] for parts in buffers)) for k in range(3))
    return du, ddelta, dA, dBt, dCt
