"""Selective state-space scan and the Mamba block used by the kMMM decoder.

``selective_scan`` has the semantics of ``mamba_ssm``'s ``selective_scan_fn``. On CUDA tensors it
calls the fused kernel of ``mamba_ssm`` when that package and its compiled ``selective_scan_cuda``
extension are importable. Everywhere else it runs a chunked parallel scan written in PyTorch:
``mamba_ssm`` ships no CPU implementation other than its sequential reference loop, which is far too
slow for sequences of 10^5 voxels, so the scan below is hand-written.

Chunked scan: inside a chunk of T steps let g_t = sum_{s<=t} delta_s (per channel). The recurrence
h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t unrolls to

    h_t = exp(A g_t) h_0 + sum_{s<=t} exp(A (g_t - g_s)) delta_s B_s u_s,

and exp(A (g_t - g_s)) factorises into exp(A (g_t - r)) * exp(-A (g_s - r)) around a reference r in
the middle of the chunk, turning the sum into one cumulative sum over the chunk. The factors are
bounded by exp(|A| * span / 2), where span is the log-decay accumulated inside the chunk, so chunks
whose span exceeds what the float type can hold are split until it fits (a single step always fits).
Nothing of size L x L is formed; the state is carried between chunks.
"""

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Largest |exponent| (base 2) a factor may reach: leaves ~2^38 (float32) of headroom for the
# magnitudes of B * u * delta and the chunk sum before overflow.
_MAX_HALF_SPAN_LOG2 = {torch.float32: 90.0, torch.float64: 900.0}


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


def _chunk_terms(u: Tensor, delta: Tensor, A2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # u, delta: (..., b, G, H, T), A2: (G, H, N, 1) -> rel, inputs: (..., b, G, H, 1, T), carry: (..., b, G, H, N)
    g = delta.cumsum(-1)
    # The result does not depend on the reference point, so it carries no gradient.
    ref = (0.5 * (g[..., :1] + g[..., -1:])).detach()
    return (g - ref).unsqueeze(-2), (delta * u).unsqueeze(-2), torch.exp2(A2.squeeze(-1) * ref)


def _scan_chunk(rel: Tensor, inputs: Tensor, B: Tensor, C: Tensor, A2: Tensor, carry: Tensor, h: Tensor,
                out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    # rel, inputs: (b, G, H, 1, T), B, C: (b, G, 1, N, T), A2 = A*log2(e): (G, H, N, 1), carry, h: (b, G, H, N)
    # exp2 is several times faster than exp on CPU, hence the base-2 exponents.
    if out is not None:  # nothing to differentiate: work in place, the chunk is memory-bound
        decay_to = torch.mul(A2, rel).exp2_()
        scaled = torch.div(B, decay_to).mul_(inputs)
        scaled[..., 0].addcmul_(carry, h)
        states = scaled.cumsum_(-1).mul_(decay_to)
        h = states[..., -1].clone()
        return torch.sum(states.mul_(C), -2, out=out), h
    exponent = A2 * rel
    decay_to = torch.exp2(exponent)
    # A second exp2 rather than a division: the backward of x / y squares y, which overflows here.
    scaled = B * inputs * torch.exp2(-exponent)
    scaled[..., 0] += carry * h
    states = decay_to * scaled.cumsum(-1)
    return (states * C).sum(-2), states[..., -1]


def _chunk_pieces(delta: Tensor, max_abs_a2: Tensor, limit: float) -> list[tuple[int, int, int]]:
    # delta: (n_chunks, b, G, H, T), max_abs_a2: (G, H, 1) -> [(chunk, start, end)] in sequence order
    n_chunks, chunk_size = delta.shape[0], delta.shape[-1]
    rate = delta * max_abs_a2
    # The first step of a chunk decays only the carried state (exp(A g_t) <= 1), so it is not in the span.
    too_wide = rate[..., 1:].sum(-1).flatten(1).amax(1) > limit
    if not bool(too_wide.any()):
        return [(i, 0, chunk_size) for i in range(n_chunks)]
    # Inside a chunk that is too wide, start a new piece whenever the running sum of the largest per-step
    # rate crosses a multiple of the limit: every piece then spans less than the limit.
    step_rate = rate.movedim(0, -2).flatten(-2).flatten(0, -2).amax(0)
    bucket = torch.floor(step_rate.double().cumsum(0) / limit)
    crossing = torch.nonzero(bucket[1:] != bucket[:-1]).squeeze(-1) + 1
    crossing = crossing[too_wide[crossing // chunk_size]]
    starts = sorted({*range(0, n_chunks * chunk_size, chunk_size), *crossing.tolist()})
    ends = [*starts[1:], n_chunks * chunk_size]
    return [(s // chunk_size, s % chunk_size, e - (s // chunk_size) * chunk_size) for s, e in zip(starts, ends)]


def _to_chunks(x: Tensor, n_chunks: int, chunk_size: int) -> Tensor:
    # x: (..., L) -> (n_chunks, ..., chunk_size), zero-padded: a zero step neither decays nor adds input
    padding = n_chunks * chunk_size - x.shape[-1]
    x = (F.pad(x, (0, padding)) if padding else x).unflatten(-1, (n_chunks, chunk_size))
    return x.movedim(-2, 0).contiguous()


def _chunked_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
    # u, delta: (b, D, L), A: (D, N), B, C: (b, G, N, L) -> y: (b, D, L) without the D and z terms
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    heads = dim // groups
    chunk_size = min(chunk_size, length)
    n_chunks = math.ceil(length / chunk_size)
    # Chunk-major contiguous copies make every chunk a dense block for the vectorised kernels below.
    u = _to_chunks(u.reshape(batch, groups, heads, length), n_chunks, chunk_size)
    delta = _to_chunks(delta.reshape(batch, groups, heads, length), n_chunks, chunk_size)
    B = _to_chunks(B.unsqueeze(2), n_chunks, chunk_size)
    C = _to_chunks(C.unsqueeze(2), n_chunks, chunk_size)
    A2 = (A * math.log2(math.e)).reshape(groups, heads, d_state, 1)
    limit = 2.0 * _MAX_HALF_SPAN_LOG2[u.dtype]
    with torch.no_grad():
        pieces = _chunk_pieces(delta, A2.abs().amax(-2), limit)
    rel, inputs, carry = _chunk_terms(u, delta, A2)
    # Recomputing each chunk in backward keeps training memory at O(b * D * L) instead of O(b * D * N * L).
    remat = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A2, B, C))
    h = u.new_zeros(batch, groups, heads, d_state)
    if remat:
        ys = []
    else:  # one preallocated output instead of many small ones that each touch fresh pages
        y_all = u.new_empty(n_chunks, batch, groups, heads, chunk_size)
    for i, start, end in pieces:
        if start == 0 and end == chunk_size:
            args = (rel[i], inputs[i], B[i], C[i], A2, carry[i], h)
        else:
            piece_rel, piece_inputs, piece_carry = _chunk_terms(u[i, ..., start:end], delta[i, ..., start:end], A2)
            args = (piece_rel, piece_inputs, B[i, ..., start:end], C[i, ..., start:end], A2, piece_carry, h)
        if remat:
            y, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
            ys.append(y)
        else:
            _, h = _scan_chunk(*args, out=y_all[i, ..., start:end])
    y = torch.cat(ys, -1) if remat else y_all.movedim(0, -2).flatten(-2)
    return y[..., :length].reshape(batch, dim, length)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   *, chunk_size: int = 64) -> Tensor:
    """Selective scan with the semantics of ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, G, N, L) with G
    dividing dim (channel d uses group d // (dim // G)); D, delta_bias: (dim,). Returns (batch, dim, L)
    in u's dtype. ``chunk_size`` only affects the PyTorch path (speed, not the result).
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
    u_f = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.to(dtype)
    C = C.to(dtype)
    y = _chunked_scan(u_f, delta, A.to(dtype), B if B.dim() == 4 else B.unsqueeze(1),
                      C if C.dim() == 4 else C.unsqueeze(1), chunk_size)
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
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan(
            x, dt, -torch.exp(a_log.float()), B.transpose(1, 2), C.transpose(1, 2), d_skip.float(),
            z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, L, d_model) -> (B, L, d_model)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"SSM: expected input (batch, length, {self.d_model}), got {tuple(x.shape)}")
        xz = self.in_proj(x).transpose(1, 2)
        x_in, z = xz.chunk(2, dim=1)
        y = self._scan(x_in, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bidirectional:
            y_b = self._scan(x_in.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                             self.A_b_log, self.D_b)
            y = y + y_b.flip(-1)
        return self.out_proj(y.transpose(1, 2))
