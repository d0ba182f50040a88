"""Scans of the recurrent token mixers: a plain for-loop reference beside each chunked PyTorch version.

- ``ssd_ref`` / ``ssd_chunked``: the selective state-space recurrence of Mamba-2 (Dao & Gu 2024, "Transformers are
  SSMs", arXiv 2405.21060), chunked by its state-space duality as in the paper's listing (sec. 6 and 7).
- ``gla_ref`` / ``gla_chunked``: gated linear attention with a per-key-channel decay (Yang et al. 2023, "Gated
  Linear Attention Transformers with Hardware-Efficient Training", arXiv 2312.06635), chunked with the paper's
  secondary-level chunking (sec. 4.2) so that no exponent is ever positive, however strong the decay.

Everything is computed in at least float32 (float64 stays float64); outputs come back in the input dtype, final
states in the compute dtype. The references take one time step at a time; decoding (T = 1) runs them as they are.
Shapes: b batch, T time, H heads, P SSM head dim, N SSM state size, K key dim, V value dim, L chunk length,
S sub-chunk length, c chunks, m sub-chunks per chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# GLA: sub-chunk length of the secondary level; a chunk length it does not divide uses their gcd. Pairwise work
# within sub-chunks grows with it, work across sub-chunks with chunk / it: 8 balances them for chunks of 32-64.
GLA_SUB_CHUNK = 8


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _pad_time(t: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """Zeros appended along ``dim``: zero inputs and zero log decays leave the state as it is."""
    return F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (0, pad)) if pad else t


# Recompute: tokens per checkpointed block. Backward keeps each block's inputs and the state entering it, and
# recomputes the block's intermediates (decay masks, scores, per-chunk states: tens of floats per token and head)
# one block at a time, as the fused GPU kernels do within their chunks. The mixers (ssm.py, linear.py) checkpoint
# whole blocks of their forward the same way, so that neither the scan's nor their own intermediates are kept.
# Small blocks keep the CPU's resident set low (a block's temporaries, freed between saved activations, fragment
# the heap: 1,024-token blocks cost ~100 MiB more at 4k tokens than 256) for ~20-35% more time in the mixer.
RECOMPUTE_BLOCK = 256
# Auto turns recompute on above this length: shorter sequences (the demo's 256, most CPU training) keep the faster
# path, where their activations are small anyway.
RECOMPUTE_MIN_TOKENS = 1024


def use_recompute(recompute: bool | None, t: int, *tensors) -> bool:
    """Whether to run in checkpointed blocks: ``recompute`` when given; else (auto) on CPU, when autograd will need
    the intermediates and the sequence is longer than ``RECOMPUTE_MIN_TOKENS`` (and one block). On CUDA auto keeps today's path: the fused kernels
    recompute already, and the PyTorch fallback trades memory for speed there."""
    if recompute is not None:
        return recompute
    x = tensors[0]
    return (t > max(RECOMPUTE_BLOCK, RECOMPUTE_MIN_TOKENS) and x.device.type == "cpu" and torch.is_grad_enabled()
            and any(u is not None and u.requires_grad for u in tensors))


def recompute_block(chunk: int) -> int:
    """``RECOMPUTE_BLOCK`` rounded down to whole chunks (at least one), so blocking keeps the chunk boundaries."""
    return max(chunk, RECOMPUTE_BLOCK // chunk * chunk)


def checkpoint_blocks(step, seqs: tuple, dim: int, carry: tuple, block: int) -> tuple[torch.Tensor, tuple]:
    """``step(*seq_blocks, *carry) -> (out, *carry)`` over blocks of ``block`` along ``dim``, each under activation
    checkpointing: the carry (a recurrent state, a conv's last inputs) leaving one block enters the next. Returns
    the outputs joined along ``dim`` and the last carry. ``step`` may use parameters it does not take as arguments
    (non-reentrant checkpointing gives them their gradients)."""

    def fresh(*args):
        # A carry that is a view (a slice of a block's buffers) would keep the whole buffer alive: copy it.
        out, *rest = step(*args)
        return (out, *(u.clone() if u is not None and u._base is not None else u for u in rest))

    t, result = seqs[0].shape[dim], None
    # One split per input (not a slice per block): its backward joins the blocks' gradients once, where slices
    # would each make a zero-filled gradient of the whole sequence.
    for start, *part in zip(range(0, t, block), *(u.split(block, dim) for u in seqs)):
        n = part[0].shape[dim]
        # The steps draw no random numbers, so there is no RNG state to save and restore.
        out, *carry = checkpoint(fresh, *part, *carry, use_reentrant=False, preserve_rng_state=False)
        if n == t:
            return out, tuple(carry)
        if result is None:
            result = out.new_empty(out.shape[:dim] + (t,) + out.shape[dim + 1 :])
        # Each block's output goes straight into the result and is freed before the next block runs: no pieces
        # left between the next block's temporaries (on CPU they fragment the heap and raise the resident set).
        result.narrow(dim, start, n).copy_(out)
    return result, tuple(carry)


# ---------------------------------------------------------------- SSD (Mamba-2)


def ssd_ref(x, dt, A, B, C, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective SSM, one time step at a time; per head  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t.

    x: (b, T, H, P); dt: (b, T, H) positive steps; A: (H,) negative rates; B, C: (b, T, N), one group shared by all
    heads; initial_state: (b, H, P, N) or None (zeros). Returns y (b, T, H, P) and the final state (b, H, P, N).
    """
    acc = _acc(x.dtype)
    xs, dt, A, B, C = (u.to(acc) for u in (x, dt, A, B, C))
    b, t, h, p = xs.shape
    state = xs.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else initial_state.to(acc)
    ys = []
    for i in range(t):
        # 1. Decay the state by exp(dt A), one rate per head (A < 0, so the factor is in (0, 1)).
        decay = torch.exp(dt[:, i] * A)[:, :, None, None]  # (b, H, 1, 1)
        # 2. Write the input, weighted by its step: dt x B^T, an outer product per head.
        state = decay * state + (dt[:, i, :, None] * xs[:, i])[..., None] * B[:, i, None, None, :]
        # 3. Read the output through C.
        ys.append(torch.einsum("bhpn,bn->bhp", state, C[:, i]))
    return torch.stack(ys, 1).to(x.dtype), state


def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, -inf above the diagonal. a: (..., L) -> (..., L, L).

    exp(out) is the decay from step j to step i. Masked copies are summed rather than two cumulative sums
    subtracted, which would cancel catastrophically once the sums grow large.
    """
    n = a.shape[-1]
    strict = torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1)
    out = a[..., :, None].expand(*a.shape, n).masked_fill(~strict, 0).cumsum(-2)  # row i holds a_i, summed down
    return out.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None,
                recompute: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_ref`` by state-space duality: quadratic attention-like form within chunks, states passed between them.

    Same arguments and results as ``ssd_ref``; T need not be a multiple of ``chunk_size``. ``recompute`` (None:
    ``use_recompute`` decides) keeps only block-boundary states for backward and recomputes inside each block.
    """
    if use_recompute(recompute, x.shape[1], x, dt, A, B, C, initial_state):
        y, (state,) = checkpoint_blocks(lambda *u: _ssd(*u[:4], A, chunk_size, u[4]), (x, dt, B, C), 1,
                                        (initial_state,), recompute_block(min(chunk_size, x.shape[1])))
        return y, state
    return _ssd(x, dt, B, C, A, chunk_size, initial_state)


def _ssd(x, dt, B, C, A, chunk_size: int, initial_state):
    acc = _acc(x.dtype)
    xs, dt, A, B, C = (u.to(acc) for u in (x, dt, A, B, C))
    b, t, h, p = xs.shape
    n = B.shape[-1]
    chunk = min(chunk_size, t)
    pad = -t % chunk
    xs, dt, B, C = (_pad_time(u, 1, pad) for u in (xs, dt, B, C))
    c = (t + pad) // chunk

    # 1. Split into chunks, heads first. The input term is dt x; the log decay of each step is a = dt A (<= 0).
    xdt = (xs * dt[..., None]).view(b, c, chunk, h, p).permute(0, 3, 1, 2, 4)  # (b, H, c, L, P)
    a = (dt * A).view(b, c, chunk, h).permute(0, 3, 1, 2)  # (b, H, c, L)
    B, C = B.view(b, 1, c, chunk, n), C.view(b, 1, c, chunk, n)  # one group, broadcast over the heads
    a_cum = a.cumsum(-1)  # log decay from the chunk start to each step, inclusive

    # 2. Within each chunk (diagonal blocks): y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j.
    y = ((C @ B.transpose(-1, -2)) * torch.exp(segsum(a))) @ xdt  # (b, H, c, L, P)

    # 3. The state each chunk adds on its own, decayed to the chunk's end.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, H, c, L)
    states = xdt.transpose(-1, -2) @ (B * to_end[..., None])  # (b, H, c, P, N)

    # 4. Pass states between chunks: the state entering chunk z sums every earlier chunk's state (and the initial
    #    one), decayed over the chunks in between; the state after the last chunk is the final state.
    if initial_state is None:
        initial_state = xs.new_zeros(b, h, p, n)
    states = torch.cat([initial_state.to(acc)[:, :, None], states], dim=2)  # (b, H, c+1, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, H, c+1, c+1)
    states = (chunk_decay @ states.flatten(3)).view(b, h, c + 1, p, n)
    entering, final = states[:, :, :-1], states[:, :, -1]

    # 5. Each step reads the state that entered its chunk, decayed from the chunk start.
    y = y + (C * torch.exp(a_cum)[..., None]) @ entering.transpose(-1, -2)
    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * chunk, h, p)
    return y[:, :t].to(x.dtype), final


# ---------------------------------------------------------------- GLA


def gla_ref(q, k, v, g, scale: float | None = None, initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention, one time step at a time:  S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale q_t S_t.

    q, k: (b, H, T, K); v: (b, H, T, V); g: (b, H, T, K) log decays (<= 0); scale defaults to K^-1/2;
    initial_state: (b, H, K, V) or None (zeros). Returns o (b, H, T, V) and the final state (b, H, K, V).
    """
    acc = _acc(q.dtype)
    qs, k, v, g = (u.to(acc) for u in (q, k, v, g))
    b, h, t, dk = qs.shape
    scale = dk**-0.5 if scale is None else scale
    state = qs.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(acc)
    outs = []
    for i in range(t):
        # 1. Decay each key channel's row of the state by its own gate; 2. write k^T v.
        state = g[:, :, i, :, None].exp() * state + k[:, :, i, :, None] * v[:, :, i, None, :]
        # 3. Read with the scaled query.
        outs.append(torch.einsum("bhk,bhkv->bhv", qs[:, :, i] * scale, state))
    return torch.stack(outs, 2).to(q.dtype), state


def gla_chunked(q, k, v, g, chunk_size: int, scale: float | None = None, initial_state=None,
                recompute: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``gla_ref`` in chunks: parallel within a chunk, states passed between chunks.

    Same arguments and results as ``gla_ref``; T need not be a multiple of ``chunk_size``. The per-channel decay
    cannot be factored as (q exp(G)) (k exp(-G))^T the way a scalar one can: exp(-G) overflows once the summed
    decay is large. So every decay is taken relative to a reference point between the two positions, which keeps
    each exponent <= 0: the position itself within a sub-chunk (pairwise), the start of the query's sub-chunk
    across sub-chunks, and the chunk's start or end across chunks. ``recompute`` as in ``ssd_chunked``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Blocks must be whole chunks: ``_gla`` rounds a short sequence's chunk up to whole sub-chunks.
    chunk = min(chunk_size, -(-q.shape[2] // GLA_SUB_CHUNK) * GLA_SUB_CHUNK)
    if use_recompute(recompute, q.shape[2], q, k, v, g, initial_state):
        o, (state,) = checkpoint_blocks(lambda *u: _gla(*u[:4], scale, chunk, u[4]), (q, k, v, g), 2,
                                        (initial_state,), recompute_block(chunk))
        return o, state
    return _gla(q, k, v, g, scale, chunk, initial_state)


def _gla(q, k, v, g, scale: float, chunk_size: int, initial_state):
    acc = _acc(q.dtype)
    qs, k, v, g = (u.to(acc) for u in (q, k, v, g))
    (b, h, t, dk), dv = qs.shape, v.shape[-1]
    qs = qs * scale
    # A short sequence makes one chunk, rounded up to whole sub-chunks.
    chunk = min(chunk_size, -(-t // GLA_SUB_CHUNK) * GLA_SUB_CHUNK)
    pad = -t % chunk
    qs, k, v, g = (_pad_time(u, 2, pad) for u in (qs, k, v, g))
    c = (t + pad) // chunk
    sub = math.gcd(chunk, GLA_SUB_CHUNK)
    m = chunk // sub  # sub-chunks per chunk

    # 1. Chunks, and the log decay from each chunk's start to each step, inclusive (<= 0, nonincreasing).
    qs, k, g, v = (u.view(b, h, c, chunk, -1) for u in (qs, k, g, v))
    gc = g.cumsum(3)

    # 2. Within a sub-chunk (diagonal blocks), pairwise per channel: A_ij = sum_k q_ik k_jk exp(gc_ik - gc_jk), j <= i.
    qb, kb, gb, vb = (u.view(b, h, c, m, sub, -1) for u in (qs, k, gc, v))
    causal = torch.ones(sub, sub, dtype=torch.bool, device=q.device).tril()
    pair = (gb[..., :, None, :] - gb[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    scores = (qb[..., :, None, :] * kb[..., None, :, :] * pair.exp()).sum(-1)  # (b, H, c, m, S, S)
    o = (scores @ vb).view(b, h, c, chunk, dv)

    # 3. Across sub-chunks (key sub-chunk n before query sub-chunk m): measured from r, the log decay at the start
    #    of sub-chunk m, both q_i exp(gc_i - r) and k_j exp(r - gc_j) have exponents <= 0. Keys at or after
    #    sub-chunk m get a zero weight, so each query sub-chunk takes one matmul with all the chunk's keys.
    if m > 1:
        r = gb[..., 0, :]  # (b, H, c, m, K)
        q_off = qb * torch.exp(gb - r[..., None, :])  # (b, H, c, m, S, K)
        earlier = torch.ones(m, m, dtype=torch.bool, device=q.device).tril(-1)  # [m, n]: n < m
        to_r = (r[..., :, None, None, :] - gb[..., None, :, :, :]).masked_fill(~earlier[:, :, None, None],
                                                                                 float("-inf"))
        k_off = (kb[..., None, :, :, :] * to_r.exp()).flatten(4, 5)  # (b, H, c, m, L, K)
        scores = (q_off @ k_off.transpose(-1, -2)).view(b, h, c, chunk, chunk)  # rows: query, columns: key
        o = o + scores @ v

    # 4. The state each chunk adds on its own: k_j^T v_j decayed to the chunk's end (exponent gc_last - gc_j <= 0).
    last = gc[..., -1, :]  # (b, H, c, K)
    local = (k * torch.exp(last[..., None, :] - gc)).transpose(-1, -2) @ v  # (b, H, c, K, V)

    # 5. Pass states between chunks in order (the decay is per key channel, so this is a short loop over chunks).
    state, entering = (qs.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.to(acc)), []
    for z in range(c):
        entering.append(state)
        state = last[:, :, z, :, None].exp() * state + local[:, :, z]
    entering = torch.stack(entering, 2)  # (b, H, c, K, V)

    # 6. Each step reads the state that entered its chunk, decayed from the chunk start (exponent gc_i <= 0).
    o = o + (qs * gc.exp()) @ entering
    return o.reshape(b, h, c * chunk, dv)[:, :, :t].to(q.dtype), state
