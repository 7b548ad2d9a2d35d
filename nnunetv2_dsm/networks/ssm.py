"""Selective state-space scan and the Mamba block used by the kMMM decoder.

``selective_scan`` has the semantics of ``mamba_ssm``'s ``selective_scan_fn``. On CUDA tensors it
calls the fused kernel of ``mamba_ssm`` when that package and its compiled ``selective_scan_cuda``
extension are importable. ``mamba_ssm`` ships no CPU implementation other than its sequential
reference loop, which is far too slow for sequences of 10^5 voxels, so the CPU paths are hand-written:
the compiled C kernels of ``cpu_kernels`` when a C compiler is available (without gradients the fused
kernel with D, z and softplus; with gradients the core recurrence with its adjoint, the element-wise
parts in PyTorch); without a compiler (or on CUDA without mamba-ssm), the chunked parallel scan below,
written in PyTorch.

Chunked scan: inside a chunk of T steps let g_t = sum_{s<=t} delta_s A (per channel and state).
The recurrence h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t unrolls to

    h_t = exp(g_t) h_0 + sum_{s<=t} exp(g_t - g_s) delta_s B_s u_s,

and exp(g_t - g_s) factorises into exp(g_t - r) * exp(r - g_s) around a reference r in the middle of
the chunk, turning the sum into one cumulative sum over the chunk. The factors are bounded by
exp(span / 2), where span is the log-decay accumulated inside the chunk, so the chunk length is
halved until the span fits the float type (a single step always fits). Nothing of size L x L is
formed. Two evaluation orders share this algebra: with gradients, all chunks of a segment are
computed at once and the chunk states are combined by a log-depth doubling scan (few autograd
nodes); without gradients, chunks are processed one after another in place (cache-resident).
"""

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nnunetv2_dsm.networks import cpu_kernels

# Largest decay span (natural log) inside a chunk: factors reach exp(span / 2) = e^60 in float32,
# leaving ~e^28 of headroom for the magnitudes of delta * B * u and the chunk sum before overflow.
_MAX_SPAN = {torch.float32: 120.0, torch.float64: 1200.0}
# Elements of one (b, D, N, L_segment) intermediate; bounds the memory of a scan segment (64 MiB fp32).
_SEGMENT_ELEMENTS = 1 << 24


@functools.cache
def _fused_selective_scan() -> Callable[..., Tensor] | None:
    try:
        import selective_scan_cuda
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # a broken CUDA extension raises OSError/RuntimeError, not only ImportError
        warnings.warn(
            f"mamba_ssm fused selective scan unavailable ({err!r}); using the PyTorch chunked scan. "
            "Install mamba-ssm with its CUDA extension for the fused kernel.",
            stacklevel=3,
        )
        return None
    if not hasattr(selective_scan_cuda, "fwd"):
        return None
    return selective_scan_fn


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


def _segment_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor,
                  chunk_size: int) -> tuple[Tensor, Tensor]:
    """Scan one segment, all chunks at once; returns its output and its final state.

    u, delta: (b, G, H, L) with L a multiple of chunk_size; A: (G, H, N); B, C: (b, G, N, L);
    h0: (b, G, H, N) state entering the segment -> y: (b, G, H, L), h: (b, G, H, N)
    """
    b, groups, heads, length = u.shape
    n_chunks = length // chunk_size
    # (b, G, H, N, K, T): every (channel, state) pair, chunked
    dA = (delta.unsqueeze(3) * A.unsqueeze(-1)).unflatten(-1, (n_chunks, chunk_size))
    x = ((delta * u).unsqueeze(3) * B.unsqueeze(2)).unflatten(-1, (n_chunks, chunk_size))
    g = dA.cumsum(-1)
    ref = g[..., chunk_size // 2 : chunk_size // 2 + 1].detach()
    # Within a chunk: h_t = sum_{s<=t} exp(g_t - g_s) x_s, factorised around ref (both factors bounded).
    # Two exponentials, not a division by the first: the gradient of x / e^a would square e^a and underflow.
    rise = torch.exp(g - ref)
    local = rise * torch.cumsum(torch.exp(ref - g) * x, -1)
    # Across chunks: H_k = P_k H_{k-1} + local_end_k, a short linear recurrence over K chunks.
    # Hillis-Steele doubling keeps it vectorised and stable (decays P <= 1 only multiply).
    decay = torch.exp(g[..., -1])
    state = local[..., -1]
    shift = 1
    while shift < n_chunks:
        state = torch.cat([state[..., :shift], state[..., shift:] + decay[..., shift:] * state[..., :-shift]], -1)
        decay = torch.cat([decay[..., :shift], decay[..., shift:] * decay[..., :-shift]], -1)
        shift *= 2
    # state_k now includes chunks 0..k from a zero start; add the incoming state, then shift by one chunk.
    state = state + decay * h0.unsqueeze(-1)
    entering = torch.cat([h0.unsqueeze(-1), state[..., :-1]], -1)
    h = local + rise * (torch.exp(ref) * entering.unsqueeze(-1))
    y = torch.einsum("bghnkt,bgnkt->bghkt", h, C.unflatten(-1, (n_chunks, chunk_size)))
    return y.flatten(-2), state[..., -1]


def _chunk_length(delta: Tensor, A: Tensor, chunk_size: int, limit: float) -> int:
    """Largest power-of-two chunk (<= chunk_size) whose accumulated log-decay the float type can hold.

    The factors exp(+-(g - ref)) reach exp(span / 2) for a chunk's decay span, so span must stay below
    ``limit``; fast-decaying inputs get shorter chunks (a single step always fits).
    """
    rate = delta * A.abs().amax(-1).unsqueeze(-1)  # (b, G, H, L) per-step bound on the decay
    while chunk_size > 1:
        pad = (-rate.shape[-1]) % chunk_size
        span = F.pad(rate, (0, pad)).unflatten(-1, (-1, chunk_size)).sum(-1).amax()
        if float(span) < limit:
            break
        chunk_size //= 2
    return chunk_size


def _training_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
    # u, delta: (b, D, L), A: (D, N), B, C: (b, G, N, L) -> y: (b, D, L) without the D and z terms
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    heads = dim // groups
    u = u.reshape(batch, groups, heads, length)
    delta = delta.reshape(batch, groups, heads, length)
    A = A.reshape(groups, heads, d_state)
    with torch.no_grad():
        chunk_size = _chunk_length(delta, A, min(chunk_size, length), _MAX_SPAN[u.dtype])
    # Zero steps neither decay nor add input, so padding to whole chunks does not change the result.
    pad = (-length) % chunk_size
    u, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))
    # Segments bound the (b, D, N, L)-sized intermediates; in training with several segments each is
    # recomputed in backward, keeping memory at O(b * D * L) plus one segment.
    per_step = batch * dim * d_state
    seg_len = max(chunk_size, (_SEGMENT_ELEMENTS // per_step) // chunk_size * chunk_size)
    remat = seg_len < u.shape[-1]
    h = u.new_zeros(batch, groups, heads, d_state)
    ys = []
    for start in range(0, u.shape[-1], seg_len):
        part = slice(start, start + seg_len)
        args = (u[..., part], delta[..., part], A, B[..., part], C[..., part], h, chunk_size)
        y, h = checkpoint(_segment_scan, *args, use_reentrant=False) if remat else _segment_scan(*args)
        ys.append(y)
    return torch.cat(ys, -1)[..., :length].reshape(batch, dim, length)


def _inference_chunk_terms(u: Tensor, delta: Tensor, A2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # u, delta: (..., b, G, H, T), A2: (G, H, N, 1) -> rel, inputs: (..., b, G, H, 1, T), carry: (..., b, G, H, N)
    g = delta.cumsum(-1)
    ref = 0.5 * (g[..., :1] + g[..., -1:])
    return (g - ref).unsqueeze(-2), (delta * u).unsqueeze(-2), torch.exp2(A2.squeeze(-1) * ref)


def _inference_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
    """No-gradient scan, one cache-sized chunk at a time, in place.

    Without autograd the per-chunk loop wins: each chunk's (b, D, N, T) block stays in cache and is
    updated in place, where the vectorised training path streams several (b, D, N, L) tensors
    through memory. exp2 is several times faster than exp on CPU, hence the base-2 exponents.
    """
    # u, delta: (b, D, L), A: (D, N), B, C: (b, G, N, L) -> y: (b, D, L)
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    heads = dim // groups
    chunk_size = _chunk_length(delta.reshape(batch, groups, heads, length), A.reshape(groups, heads, d_state),
                               min(chunk_size, length), _MAX_SPAN[u.dtype])
    n_chunks = math.ceil(length / chunk_size)

    def chunks(x: Tensor) -> Tensor:
        # (..., L) -> (n_chunks, ..., T), zero-padded: a zero step neither decays nor adds input
        x = F.pad(x, (0, n_chunks * chunk_size - length)).unflatten(-1, (n_chunks, chunk_size))
        return x.movedim(-2, 0).contiguous()

    A2 = (A * math.log2(math.e)).reshape(groups, heads, d_state, 1)
    rel, inputs, carry = _inference_chunk_terms(chunks(u.reshape(batch, groups, heads, length)),
                                                chunks(delta.reshape(batch, groups, heads, length)), A2)
    B, C = chunks(B.unsqueeze(2)), chunks(C.unsqueeze(2))
    h = u.new_zeros(batch, groups, heads, d_state)
    y = u.new_empty(n_chunks, batch, groups, heads, chunk_size)
    for i in range(n_chunks):
        decay_to = torch.mul(A2, rel[i]).exp2_()
        scaled = torch.div(B[i], decay_to).mul_(inputs[i])
        scaled[..., 0].addcmul_(carry[i], h)
        states = scaled.cumsum_(-1).mul_(decay_to)
        h = states[..., -1].clone()
        torch.sum(states.mul_(C[i]), -2, out=y[i])
    return y.movedim(0, -2).flatten(-2)[..., :length].reshape(batch, dim, length)


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
                   *, chunk_size: int = 64, cpu_kernel: bool = True) -> Tensor:
    """Selective scan with the semantics of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, G, N, L) with G
    dividing dim (channel d uses group d // (dim // G)); D, delta_bias: (dim,). Returns (batch, dim, L)
    in u's dtype. ``chunk_size`` only affects the PyTorch path (speed, not the result);
    ``cpu_kernel=False`` skips the compiled CPU kernel.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be >= 1, got {chunk_size}")
    if u.is_cuda:
        fused = _fused_selective_scan()
        if fused is not None:
            return fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = torch.promote_types(torch.promote_types(u.dtype, delta.dtype), torch.promote_types(A.dtype, B.dtype))
    dtype = torch.float64 if torch.promote_types(dtype, C.dtype) == torch.float64 else torch.float32
    B = B if B.dim() == 4 else B.unsqueeze(1)
    C = C if C.dim() == 4 else C.unsqueeze(1)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None)
    kernels = cpu_kernels.load_kernels() if cpu_kernel and not needs_grad and u.device.type == "cpu" else None
    if kernels is not None:
        as_dtype = [None if t is None else t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias)]
        return cpu_kernels.selective_scan(kernels, *as_dtype, delta_softplus=delta_softplus).to(u.dtype)
    u_f = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    train_kernels = cpu_kernels.load_kernels() if cpu_kernel and needs_grad and u.device.type == "cpu" else None
    if train_kernels is not None:
        y = _CompiledTrainingScan.apply(train_kernels, u_f, delta, A.to(dtype), B.to(dtype), C.to(dtype))
    else:
        scan = _training_scan if needs_grad else _inference_scan
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
