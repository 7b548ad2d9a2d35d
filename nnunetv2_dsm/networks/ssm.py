"""Selective state-space scan and the Mamba block used by the kMMM decoder.

``selective_scan`` has the semantics of ``mamba_ssm``'s ``selective_scan_fn`` and picks one of four
implementations (``scan_backend``; forced with ``DSM_SCAN_BACKEND``):

- ``mamba``: mamba-ssm's fused CUDA kernel, on CUDA when mamba-ssm and its compiled extension import;
- ``triton``: the Triton kernels of ``triton_scan`` (forward and backward), on CUDA otherwise;
  nothing to build, Triton ships with PyTorch's CUDA wheels;
- ``compiled``: the C kernels of ``cpu_kernels`` on CPU when a C compiler is available (without
  gradients the fused kernel with D, z and softplus; with gradients the core recurrence and its adjoint);
- ``torch``: the chunked parallel scan of ``scan_torch`` in PyTorch, everywhere.

Every path accumulates the state in float32 (float64 for float64 inputs) whatever the autocast dtype,
and returns u's dtype. The choice is logged once per device type.
"""

import functools
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunetv2_dsm import settings
from nnunetv2_dsm.networks import cpu_kernels, scan_torch
from nnunetv2_dsm.settings import SCAN_BACKEND_VARIABLE

SCAN_BACKENDS = ("auto", "mamba", "triton", "compiled", "torch")
_log = logging.getLogger(__name__)


@functools.cache
def _fused_selective_scan() -> Callable[..., Tensor] | None:
    try:
        import selective_scan_cuda
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # a broken CUDA extension raises OSError/RuntimeError, not only ImportError
        _log.info("mamba_ssm fused selective scan unavailable (%r)", err)
        return None
    if not hasattr(selective_scan_cuda, "fwd"):
        return None
    return selective_scan_fn


@functools.cache
def scan_backend(device_type: str) -> str:
    """The scan implementation used for tensors on ``device_type`` ("cuda", "cpu", ...), chosen once.

    ``auto`` (default): on CUDA mamba-ssm's fused kernel, else Triton, else PyTorch; elsewhere the
    compiled C kernels, else PyTorch. ``DSM_SCAN_BACKEND`` forces one; a forced backend that cannot run
    here is an error, not a silent fallback (Triton on CPU needs ``TRITON_INTERPRET=1``).
    """
    forced = (settings.scan_backend_override() or "auto").strip().lower() or "auto"
    if forced not in SCAN_BACKENDS:
        raise ValueError(f"{SCAN_BACKEND_VARIABLE}={forced!r} is not one of {', '.join(SCAN_BACKENDS)}")
    cuda = device_type == "cuda"
    usable = {
        "mamba": lambda: cuda and _fused_selective_scan() is not None,
        "triton": lambda: (importlib.util.find_spec("triton") is not None
                           and (cuda or os.environ.get("TRITON_INTERPRET") == "1")),
        "compiled": lambda: device_type == "cpu" and cpu_kernels.load_kernels() is not None,
        "torch": lambda: True,
    }
    if forced != "auto":
        if not usable[forced]():
            raise RuntimeError(
                f"{SCAN_BACKEND_VARIABLE}={forced} cannot run on {device_type}: "
                + {"mamba": "mamba-ssm with its compiled CUDA extension is not importable",
                   "triton": "Triton is not installed (or, on CPU, TRITON_INTERPRET=1 is not set)",
                   "compiled": "the C kernels need a CPU tensor and a C compiler"}[forced]
                + f"; unset {SCAN_BACKEND_VARIABLE} to choose automatically")
        choice = forced
    else:
        order = ("mamba", "triton", "torch") if cuda else ("compiled", "torch")
        choice = next(name for name in order if usable[name]())
        if cuda and choice == "torch":
            warnings.warn("DSM selective scan on CUDA: neither mamba-ssm's kernel nor Triton is available; "
                          "using the PyTorch chunked scan (slow). Install PyTorch's CUDA wheels (they ship Triton).",
                          stacklevel=3)
    _log.info("DSM selective scan on %s: %s%s", device_type, choice, " (forced)" if forced != "auto" else "")
    return choice


def _check_inputs(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  z: Tensor | None, delta_bias: Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length < 1:
        raise ValueError("selective_scan: the sequence length (last dim of u) must be >= 1")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} must equal u shape {tuple(u.shape)}")
    if A.is_complex() or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be real (dim={dim}, d_state), got {tuple(A.shape)} {A.dtype}")
    d_state = A.shape[1]
    for name, m in (("B", B), ("C", C)):
        ok3 = m.dim() == 3 and m.shape == (batch, d_state, length)
        ok4 = (m.dim() == 4 and m.shape[0] == batch and m.shape[2:] == (d_state, length)
               and dim % m.shape[1] == 0)
        if not (ok3 or ok4):
            raise ValueError(
                f"selective_scan: {name} must be (batch={batch}, d_state={d_state}, length={length}) or "
                f"(batch, groups, d_state, length) with groups dividing dim={dim}, got {tuple(m.shape)}"
            )
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be ({dim},), got {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} must equal u shape {tuple(u.shape)}")


class _CompiledTrainingScan(torch.autograd.Function):
    """The core scan (no bias, softplus, D or z) through the compiled CPU kernels, with gradients.

    The element-wise parts around it stay in PyTorch's autograd; ``cpu_kernels.scan_train_backward``
    is the adjoint of ``scan_train_forward`` (checked against ``selective_scan_ref`` in the tests).
    """

    @staticmethod
    def forward(ctx, library, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        # u, delta: (b, D, L), A: (D, N), B, C: (b, G, N, L) -> y: (b, D, L)
        Bt, Ct = B.transpose(-1, -2).contiguous(), C.transpose(-1, -2).contiguous()
        u, delta, A = u.contiguous(), delta.contiguous(), A.contiguous()
        y, states = cpu_kernels.scan_train_forward(library, u, delta, A, Bt, Ct)
        ctx.library = library
        ctx.save_for_backward(u, delta, A, Bt, Ct, states)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, delta, A, Bt, Ct, states = ctx.saved_tensors
        du, ddelta, dA, dBt, dCt = cpu_kernels.scan_train_backward(ctx.library, u, delta, A, Bt, Ct, states, dy)
        return None, du, ddelta, dA, dBt.transpose(-1, -2), dCt.transpose(-1, -2)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   *, chunk_size: int = 64, cpu_kernel: bool = True, backend: str | None = None) -> Tensor:
    """Selective scan with the semantics of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, G, N, L) with G
    dividing dim (channel d uses group d // (dim // G)); D, delta_bias: (dim,). Returns (batch, dim, L)
    in u's dtype. ``chunk_size`` only affects the PyTorch path (speed, not the result);
    ``cpu_kernel=False`` skips the compiled CPU kernel; ``backend`` overrides ``scan_backend`` for this call.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")
    backend = backend or scan_backend(u.device.type)
    if backend == "compiled" and not cpu_kernel:
        backend = "torch"
    if backend == "mamba":
        return _fused_selective_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = torch.promote_types(torch.promote_types(u.dtype, delta.dtype), torch.promote_types(A.dtype, B.dtype))
    dtype = torch.float64 if torch.promote_types(dtype, C.dtype) == torch.float64 else torch.float32
    if backend == "triton" and dtype == torch.float64:
        backend = "torch"  # the Triton kernels compute in float32; float64 callers want float64
    B = B if B.dim() == 4 else B.unsqueeze(1)
    C = C if C.dim() == 4 else C.unsqueeze(1)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None)
    kernels = cpu_kernels.load_kernels() if backend == "compiled" else None
    if kernels is not None and not needs_grad:
        as_dtype = [None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias)]
        return cpu_kernels.selective_scan(kernels, *as_dtype, delta_softplus=delta_softplus).to(u.dtype)
    u_f = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    if backend == "triton":
        from nnunetv2_dsm.networks import triton_scan  # compiles (or, on CPU, interprets) on first use

        y = triton_scan.TritonScan.apply(u_f, delta, A.to(dtype), B.to(dtype), C.to(dtype))
    elif kernels is not None:
        y = _CompiledTrainingScan.apply(kernels, u_f, delta, A.to(dtype), B.to(dtype), C.to(dtype))
    else:
        scan = scan_torch.training_scan if needs_grad else scan_torch.inference_scan
        y = scan(u_f, delta, A.to(dtype), B.to(dtype), C.to(dtype), chunk_size)
    if D is not None:
        y = y + u_f * D.to(dtype).unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype)


class SSM(nn.Module):
    """Mamba (v1) block over a sequence, parameter-compatible with ``mamba_ssm.modules.mamba_simple.Mamba``.

    With ``bidirectional=True`` a second scan runs over the reversed sequence with its own conv1d_b,
    x_proj_b, dt_proj_b, A_b_log and D_b (Vision Mamba "v2" layout: in_proj and out_proj are shared and
    the two directions are summed before out_proj).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 bidirectional: bool = False) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(
                f"SSM: d_model, d_state, d_conv and expand must be >= 1, got {d_model}, {d_state}, {d_conv}, {expand}"
            )
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.bidirectional = bidirectional
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._direction_parameters()
        if bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = self._direction_parameters()
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _direction_parameters(self) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, nn.Parameter, nn.Parameter]:
        # Initialisation of mamba_ssm's Mamba with its defaults (dt in [1e-3, 0.1], S4D-real A).
        dt_min, dt_max, dt_floor = 1e-3, 0.1, 1e-4
        conv1d = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner,
                           padding=self.d_conv - 1, bias=True)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        dt_std = self.dt_rank ** -0.5
        nn.init.uniform_(dt_proj.weight, -dt_std, dt_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        with torch.no_grad():
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        dt_proj.bias._no_reinit = True
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        a_log = nn.Parameter(torch.log(a))
        a_log._no_weight_decay = True
        d_skip = nn.Parameter(torch.ones(self.d_inner))
        d_skip._no_weight_decay = True
        return conv1d, x_proj, dt_proj, a_log, d_skip

    def _scan(self, x: Tensor, z: Tensor, conv1d: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear,
              a_log: Tensor, d_skip: Tensor) -> Tensor:
        # x, z: (B, d_inner, L) -> (B, d_inner, L)
        length = x.shape[-1]
        x = F.silu(F.conv1d(x, conv1d.weight, conv1d.bias, padding=self.d_conv - 1, groups=self.d_inner)[..., :length])
        # Channels-first products, as in mamba_ssm: the (B, d_inner, L) operands of the scan come out
        # contiguous, with no transposed copies of the long sequence.
        dt, B, C = torch.einsum("oc,bcl->bol", x_proj.weight, x).split([self.dt_rank, self.d_state, self.d_state], 1)
        return selective_scan(
            x, torch.einsum("or,brl->bol", dt_proj.weight, dt), -torch.exp(a_log.float()), B, C, d_skip.float(),
            z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, L, d_model) -> (B, L, d_model)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SSM: expected input (batch, length, {self.d_model}), got {tuple(x.shape)}")
        x_in, z = torch.einsum("oc,blc->bol", self.in_proj.weight, x).chunk(2, dim=1)
        y = self._scan(x_in, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bidirectional:
            y_b = self._scan(x_in.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                             self.A_b_log, self.D_b)
            y = y + y_b.flip(-1)
        return torch.einsum("oc,bcl->blo", self.out_proj.weight, y)
