"""Selective scan in Triton, forward and backward: DSM's scan on any CUDA GPU without building mamba-ssm.

mamba-ssm's fused kernel has to be compiled against the local CUDA toolchain; Triton ships with
PyTorch's CUDA wheels and compiles at run time, so this path needs nothing beyond ``pip install``.
Written by hand because no installable library provides a Triton selective scan with gradients for
mamba's (u, delta, A, B, C) layout. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors,
which is how the CPU test suite checks them against mamba-ssm's ``selective_scan_ref``.

Recurrence (Mamba, eq. 2a/2b of Gu & Dao 2023), per channel d and state n:

    h_t = a_t h_{t-1} + x_t,   a_t = exp(delta_t A),   x_t = delta_t u_t B_t,   y_t = sum_n C_t h_t.

One program scans one (batch, channel) row with all its states as an (N, T) tile: the sequence is cut
into chunks of T steps, each chunk is an ``associative_scan`` of the pairs (a_t, x_t) under
(a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2), and the state at each chunk start is carried across chunks
and saved for the backward pass (float32 throughout, whatever the autocast dtype outside).

Backward (the adjoint of the recurrence): g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}, a scan of the
same form run over each chunk's steps in reverse order (loaded reversed, scanned, flipped back), with

    du_t = delta_t sum_n g_t B_t,   ddelta_t = u_t sum_n g_t B_t + sum_n g_t A (h_t - x_t),
    dA = sum_t g_t delta_t (h_t - x_t),   dB_t = g_t delta_t u_t,   dC_t = dy_t h_t,

using a_t h_{t-1} = h_t - x_t, so h_{t-1} is never formed. dB and dC are summed over the channels of
a group with atomic adds, as mamba-ssm's CUDA backward does.
"""

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch's CUDA wheels ship triton; CPU-only installs may not
    triton = None

CHUNK = 64  # steps per associative scan: an (N, 64) tile per program


def available() -> bool:
    """Whether Triton is importable (the kernels then compile on CUDA, or run interpreted on CPU)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _combine(a1, x1, a2, x2):
        # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
        return a1 * a2, a2 * x1 + x2

    @triton.jit
    def _program_row(pid, a_ptr, dim, length, d_state, heads, BLOCK_N: tl.constexpr):
        """The (batch, channel) row a program scans: its channel, state indices and mask, A row, and the
        int64 offsets of its u/delta/y row and of its group's B/C rows."""
        batch = pid // dim
        channel = pid % dim
        n = tl.arange(0, BLOCK_N)
        n_ok = n < d_state
        A = tl.load(a_ptr + channel * d_state + n, mask=n_ok, other=0.0)
        row = pid.to(tl.int64) * length
        bc_row = (batch * (dim // heads) + channel // heads).to(tl.int64) * d_state * length
        return channel, n, n_ok, A, row, bc_row

    @triton.jit
    def _scan_fwd_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, y_ptr, states_ptr,
                         dim, length, d_state, n_chunks, heads,
                         BLOCK_N: tl.constexpr, CHUNK_T: tl.constexpr):
        pid = tl.program_id(0)  # batch * dim + channel
        channel, n, n_ok, A, row, bc_row = _program_row(pid, a_ptr, dim, length, d_state, heads, BLOCK_N)
        steps = tl.arange(0, CHUNK_T)
        h = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(n_chunks):
            t = k * CHUNK_T + steps
            t_ok = t < length
            ok = n_ok[:, None] & t_ok[None, :]
            u = tl.load(u_ptr + row + t, mask=t_ok, other=0.0)
            dt = tl.load(dt_ptr + row + t, mask=t_ok, other=0.0)
            tile = bc_row + n[:, None] * length + t[None, :]
            Bt = tl.load(b_ptr + tile, mask=ok, other=0.0)
            Ct = tl.load(c_ptr + tile, mask=ok, other=0.0)
            tl.store(states_ptr + (pid.to(tl.int64) * n_chunks + k) * d_state + n, h, mask=n_ok)
            # padded steps have dt = 0: a = 1, x = 0 leave the state unchanged
            a = tl.exp(dt[None, :] * A[:, None])
            x = (dt * u)[None, :] * Bt
            a_cum, x_cum = tl.associative_scan((a, x), 1, _combine)
            hs = a_cum * h[:, None] + x_cum
            tl.store(y_ptr + row + t, tl.sum(hs * Ct, 0), mask=t_ok)
            h = tl.sum(tl.where(steps[None, :] == CHUNK_T - 1, hs, 0.0), 1)

    @triton.jit
    def _scan_bwd_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, states_ptr, dy_ptr,
                         du_ptr, ddt_ptr, da_ptr, db_ptr, dc_ptr,
                         dim, length, d_state, n_chunks, heads,
                         BLOCK_N: tl.constexpr, CHUNK_T: tl.constexpr):
        pid = tl.program_id(0)  # batch * dim + channel
        channel, n, n_ok, A, row, bc_row = _program_row(pid, a_ptr, dim, length, d_state, heads, BLOCK_N)
        steps = tl.arange(0, CHUNK_T)
        g_next = tl.zeros([BLOCK_N], dtype=tl.float32)  # g at the first step of the chunk after this one
        dA = tl.zeros([BLOCK_N], dtype=tl.float32)
        for kk in range(n_chunks):
            k = n_chunks - 1 - kk
            # forward states of this chunk, recomputed from the saved chunk-start state
            t = k * CHUNK_T + steps
            t_ok = t < length
            ok = n_ok[:, None] & t_ok[None, :]
            u = tl.load(u_ptr + row + t, mask=t_ok, other=0.0)
            dt = tl.load(dt_ptr + row + t, mask=t_ok, other=0.0)
            dy = tl.load(dy_ptr + row + t, mask=t_ok, other=0.0)
            tile = bc_row + n[:, None] * length + t[None, :]
            Bt = tl.load(b_ptr + tile, mask=ok, other=0.0)
            h0 = tl.load(states_ptr + (pid.to(tl.int64) * n_chunks + k) * d_state + n, mask=n_ok, other=0.0)
            a = tl.exp(dt[None, :] * A[:, None])
            x = (dt * u)[None, :] * Bt
            a_cum, x_cum = tl.associative_scan((a, x), 1, _combine)
            hs = a_cum * h0[:, None] + x_cum
            # adjoint, steps in reverse order: g_t = a_{t+1} g_{t+1} + C_t dy_t
            tr = k * CHUNK_T + (CHUNK_T - 1) - steps
            tr_ok = tr < length
            dt_after = tl.load(dt_ptr + row + tr + 1, mask=(tr + 1) < length, other=0.0)
            dy_r = tl.load(dy_ptr + row + tr, mask=tr_ok, other=0.0)
            C_r = tl.load(c_ptr + bc_row + n[:, None] * length + tr[None, :], mask=n_ok[:, None] & tr_ok[None, :],
                          other=0.0)
            alpha = tl.exp(dt_after[None, :] * A[:, None])
            beta = C_r * dy_r[None, :]
            al_cum, be_cum = tl.associative_scan((alpha, beta), 1, _combine)
            g_rev = al_cum * g_next[:, None] + be_cum
            g_next = tl.sum(tl.where(steps[None, :] == CHUNK_T - 1, g_rev, 0.0), 1)
            g = tl.flip(g_rev, 1)
            gB = tl.sum(g * Bt, 0)
            g_decay = g * (hs - x)  # g_t a_t h_{t-1}
            tl.store(du_ptr + row + t, dt * gB, mask=t_ok)
            tl.store(ddt_ptr + row + t, u * gB + tl.sum(g_decay * A[:, None], 0), mask=t_ok)
            dA += tl.sum(g_decay * dt[None, :], 1)
            tl.atomic_add(db_ptr + tile, g * (dt * u)[None, :], mask=ok)
            tl.atomic_add(dc_ptr + tile, hs * dy[None, :], mask=ok)
        tl.atomic_add(da_ptr + channel * d_state + n, dA, mask=n_ok)


def chunk_length(length: int, chunk: int | None = None) -> int:
    """Steps per chunk: a power of two (``tl.flip`` and the tiles need one), at most ``CHUNK``."""
    chunk = chunk or min(CHUNK, max(16, triton.next_power_of_2(length)))
    if chunk & (chunk - 1):
        raise ValueError(f"triton scan: the chunk length must be a power of two, got {chunk}")
    return chunk


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_t: int) -> tuple[Tensor, Tensor]:
    """The core scan (no D, z, bias or softplus) in float32; returns y and the chunk-start states.

    u, delta: (b, D, L), A: (D, N), B, C: (b, G, N, L), all float32 and contiguous; ``chunk_t`` from
    ``chunk_length`` -> y: (b, D, L), states: (b, D, n_chunks, N)
    """
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    block_n = triton.next_power_of_2(d_state)
    n_chunks = triton.cdiv(length, chunk_t)
    y = torch.empty_like(u)
    states = u.new_empty(batch, dim, n_chunks, d_state)
    _scan_fwd_kernel[(batch * dim,)](u, delta, A, B, C, y, states, dim, length, d_state, n_chunks, dim // groups,
                                     BLOCK_N=block_n, CHUNK_T=chunk_t)
    return y, states


def scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, states: Tensor, dy: Tensor,
                  chunk_t: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Adjoint of ``scan_forward`` (same ``chunk_t``): (du, ddelta, dA, dB, dC), float32, shaped like the inputs."""
    batch, dim, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    n_chunks = states.shape[2]
    block_n = triton.next_power_of_2(d_state)
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
    _scan_bwd_kernel[(batch * dim,)](u, delta, A, B, C, states, dy.contiguous(), du, ddelta, dA, dB, dC,
                                     dim, length, d_state, n_chunks, dim // groups,
                                     BLOCK_N=block_n, CHUNK_T=chunk_t)
    return du, ddelta, dA, dB, dC


class TritonScan(torch.autograd.Function):
    """The core scan through the Triton kernels, with gradients (the element-wise parts stay in PyTorch)."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int | None = None) -> Tensor:
        # u, delta: (b, D, L), A: (D, N), B, C: (b, G, N, L) -> y: (b, D, L), float32
        u, delta, A, B, C = (t.float().contiguous() for t in (u, delta, A, B, C))
        ctx.chunk_t = chunk_length(u.shape[-1], chunk)
        y, states = scan_forward(u, delta, A, B, C, ctx.chunk_t)
        ctx.save_for_backward(u, delta, A, B, C, states)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        u, delta, A, B, C, states = ctx.saved_tensors
        return (*scan_backward(u, delta, A, B, C, states, dy.float(), ctx.chunk_t), None)
