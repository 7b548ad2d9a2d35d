"""Selective scan in PyTorch: the chunked parallel scan used where no compiled kernel is available.

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

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Largest decay span (natural log) inside a chunk: factors reach exp(span / 2) = e^60 in float32,
# leaving ~e^28 of headroom for the magnitudes of delta * B * u and the chunk sum before overflow.
_MAX_SPAN = {torch.float32: 120.0, torch.float64: 1200.0}
# Elements of one (b, D, N, L_segment) intermediate; bounds the memory of a scan segment (64 MiB fp32).
_SEGMENT_ELEMENTS = 1 << 24


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


def training_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
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


def inference_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int) -> Tensor:
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
