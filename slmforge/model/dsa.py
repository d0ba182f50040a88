"""DeepSeek Sparse Attention: a lightning indexer picks the top-k keys of every query; attention reads only those.

DeepSeek-AI 2025, "DeepSeek-V3.2-Exp: Boosting Long-Context Efficiency with DeepSeek Sparse Attention". The indexer
scores query t against every earlier key s with a few small ReLU heads,
    I_ts = sum_j w_tj * ReLU(q_tj . k_s),
q_tj (index_heads of index_dim), w_tj and k_s (one RMS-normed key shared by the heads) projected from the layer's
detached input, RoPE on q and k. Each query keeps the ``top_k`` earlier keys by I_ts and the main attention (``attn``'s
heads, GQA and RoPE; no sliding window) takes its softmax over those alone. Ties go to the later key through one
integer sort key per candidate (``sort_keys``), so every path (reference, chunked, decoding) picks the same set.
Left out from the paper: MLA (the main attention here is MHA/GQA), FP8, the Hadamard rotation, partial RoPE.

Training (paper sec. 2.1): the indexer learns only from a KL loss towards the main attention's distribution
p_t = sum_h softmax_h(q_th . k) / H (detached): KL(p_t || softmax(I_t)), averaged over queries, times ``kl_weight``,
is the layer's ``aux_loss`` in training mode, which the block adds to the LM loss as it adds an FFN's. The indexer's
input is detached and the selection is discrete, so the LM loss never reaches the indexer and the KL never reaches the
model. ``dsa.mode=dense`` is the warm-up: full causal attention, KL over all earlier keys; ``sparse``: top-k attention,
KL over the selected keys; ``dsa.dense_steps`` makes a sparse run's first steps the warm-up (``at_step``). (The paper
freezes the main model during the warm-up; here it keeps learning from the LM loss, which the indexer does not see.)

Two implementations. ``dsa_reference`` builds the (T, S) scores and masks; the layer takes it while S fits one block,
where it is the cheaper one. The tests compare it with ``dsa_chunked``, which goes over blocks of ``block`` queries:
per block it scores the earlier keys ``SELECT_KEYS`` at a time keeping a running top-k, then copies the selected K/V
rows and attends under activation checkpointing. A training step keeps (T, N)
indices and per-block inputs, never a (T, S) matrix: memory grows with T * N. (The indexer's compute still grows
with T * S, as in the paper, at J * E per pair instead of the attention's H * D.) The dense warm-up's KL is chunked
the same way. Cached decoding keeps the indexer keys beside K and V (``IndexedKVCache``).
Shapes: B batch, T queries (new tokens), S keys (cached + new), H query heads, K kv heads, G = H / K, D head dim,
J indexer heads, E indexer dim, N top_k.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slmforge.config import ModelConfig
from slmforge.model.attention import MATMUL_ATTN_MAX_KEYS, Attention, attention_matmul, attention_padded, padded_mask
from slmforge.model.cache import IndexedKVCache
from slmforge.model.cost import LayerCost, mean_keys
from slmforge.model.layers import RMSNorm, apply_rope, init_linear, linear, rope_tables

NOT_ALLOWED = torch.iinfo(torch.int64).min  # the sort key of a candidate a query may not select
# Keys scored at once by the selection (at least ``block``): fewer, larger matmuls and top-k merges; the scores of a
# block of queries against this many keys are the largest transient, J * 4 bytes per pair (8 MiB for 256 x 2048).
SELECT_KEYS = 2048


def rope_at(module: nn.Module, dim: int, theta: float, start: int, t: int, positions: torch.Tensor | None):
    """cos, sin for ``apply_rope`` on (B, T, heads, dim) from ``module``'s tables (extended when too short):
    (T, 1, dim/2) at slots start.., or (B, T, 1, dim/2) at ``positions`` (B, T) of a left-padded batch."""
    if start + t > module.cos.shape[0]:
        module.cos, module.sin = rope_tables(dim, 2 * (start + t), theta, device=module.cos.device)
    if positions is None:
        return module.cos[start : start + t, None], module.sin[start : start + t, None]
    return module.cos[positions][:, :, None], module.sin[positions][:, :, None]


class Indexer(nn.Module):
    """The lightning indexer's projections: (B, T, C) -> queries (B, T, J, E), weights (B, T, J), keys (B, T, E)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, c = cfg.dsa, cfg.d_model
        self.num_heads, self.dim, self.theta = d.index_heads, d.index_dim, cfg.attn.rope_theta
        self.wq = nn.Linear(c, d.index_heads * d.index_dim, bias=False)
        self.wk = nn.Linear(c, d.index_dim, bias=False)
        self.k_norm = RMSNorm(d.index_dim, cfg.norm_eps)
        self.ww = nn.Linear(c, d.index_heads, bias=False)
        cos, sin = rope_tables(d.index_dim, cfg.max_seq_len, self.theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_parameters(self, std: float) -> None:
        for proj in (self.wq, self.wk, self.ww):
            init_linear(proj, std)
        self.k_norm.weight.data.fill_(1.0)
        self.cos, self.sin = rope_tables(self.dim, self.cos.shape[0], self.theta, device=self.cos.device)

    def forward(self, x: torch.Tensor, start: int, positions: torch.Tensor | None):
        x = x.detach()  # the indexer learns from its KL loss alone
        b, t, _ = x.shape
        rope = rope_at(self, self.dim, self.theta, start, t, positions)
        iq = apply_rope(linear(x, self.wq.weight).view(b, t, self.num_heads, self.dim), *rope)
        ik = apply_rope(self.k_norm(linear(x, self.wk.weight)).view(b, t, 1, self.dim), *rope)[:, :, 0]
        iw = linear(x, self.ww.weight) * (self.num_heads * self.dim) ** -0.5
        return iq, iw, ik


def index_scores(iq: torch.Tensor, iw: torch.Tensor, ik: torch.Tensor) -> torch.Tensor:
    """I_ts = sum_j w_tj ReLU(q_tj . k_s). iq (B, Tq, J, E), iw (B, Tq, J), ik (B, Sb, E) -> (B, Tq, Sb)."""
    return torch.einsum("btjs,btj->bts", torch.einsum("btje,bse->btjs", iq, ik).relu(), iw)


def allowed_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B or 1, Tq, Sb) bool: key slot <= query slot, and (left padding, ``valid`` (B, S)) a real key or the query's
    own slot, so a padding query sees itself and no softmax row is empty."""
    causal = k_slots[None, :] <= q_slots[:, None]
    if valid is None:
        return causal[None]
    return causal[None] & (valid[:, None, k_slots] | (k_slots[None, :] == q_slots[:, None])[None])


def sort_keys(scores: torch.Tensor, allowed: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
    """Unique int64 keys ordering candidates by score, ties by the later slot: the float32 score's bits mapped to
    an order-preserving int in the high half, the slot in the low half; NOT_ALLOWED where not allowed."""
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes +0.0
    ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)
    return ((ordered << 32) + k_slots).masked_fill(~allowed, NOT_ALLOWED)


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The main attention's probabilities summed over heads / H. q (B, H, Tq, D); k (B, K, S, D) with mask
    (B or 1, Tq, S), or gathered k (B, K, Tq, N, D) with mask (B, Tq, N) -> (B, Tq, S or N)."""
    b, h, tq, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(b, k.shape[1], h // k.shape[1], tq, d)
    spec = "bkgtd,bksd->bkgts" if k.dim() == 4 else "bkgtd,bktsd->bkgts"
    scores = torch.einsum(spec, qg, k.to(acc)) / math.sqrt(d)
    return scores.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1).mean((1, 2))


def kl_sum(p: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """sum over queries of KL(p || softmax(logits)) over the keys in ``mask``; p is 0 outside it. ``tau`` > 1 first
    flattens the target to p^(1/tau), renormalised (``dsa.kl_temperature``): the same ranking of keys, so the same
    top-k, with the far tail's keys weighing more in the loss."""
    if tau != 1.0:
        p = torch.where(mask, p.log() / tau, float("-inf")).softmax(-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logq = logits.masked_fill(~mask, float("-inf")).log_softmax(-1).masked_fill(~mask, 0.0)
    return (torch.xlogy(p, p) - p * logq.to(p.dtype)).sum()


def dsa_reference(q, k, v, iq, iw, ik, top_k: int, dense: bool, valid=None, with_kl: bool = False, tau: float = 1.0):
    """Plain DSA: the (T, S) scores, masked. q (B, H, T, D); k, v (B, K, S, D), the last T keys the queries';
    iq (B, T, J, E), iw (B, T, J), ik (B, S, E); valid (B, S) or None -> (B, H, T, D), mean KL per query (or 0)
    (``tau``: ``kl_sum``'s)."""
    t, s = q.shape[2], k.shape[2]
    k_slots = torch.arange(s, device=q.device)
    allowed = allowed_mask(k_slots[s - t :], k_slots, valid)
    mask = allowed.expand(q.shape[0], t, s)
    index = index_scores(iq, iw, ik) if with_kl or not dense else None
    if not dense:
        keys = sort_keys(index.detach(), allowed, k_slots).topk(min(top_k, s), dim=-1).values
        # summed, not written: the places of keys not allowed all point at slot 0
        chosen = torch.zeros(mask.shape, device=q.device).scatter_add_(-1, keys & 0xFFFFFFFF,
                                                                        (keys != NOT_ALLOWED).float())
        mask = mask & (chosen > 0)
    b, h, _, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(b, k.shape[1], h // k.shape[1], t, d)  # GQA: (B, K, G, T, D) against (B, K, 1, S, D)
    scores = qg @ k.to(acc)[:, :, None].transpose(-1, -2) / math.sqrt(d)
    probs = scores.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1)
    y = (probs @ v.to(acc)[:, :, None]).view(b, h, t, d).to(q.dtype)
    if not with_kl:
        return y, 0.0
    return y, kl_sum(probs.detach().mean((1, 2)), index, mask, tau) / (b * t)


def dsa_chunked(q, k, v, iq, iw, ik, top_k: int, block: int, valid=None, with_kl: bool = False, tau: float = 1.0):
    """Sparse DSA over blocks of ``block`` queries, never a (T, S) matrix; the arguments and results of
    ``dsa_reference`` in sparse mode."""
    b, h, t, d = q.shape
    s = k.shape[2]
    k_slots = torch.arange(s, device=q.device)
    kvh = k.shape[1]
    kt, vt = k.transpose(1, 2).reshape(b * s * kvh, d), v.transpose(1, 2).reshape(b * s * kvh, d)  # rows to select
    heads = torch.arange(kvh, device=q.device)
    ys, kl = [], q.new_zeros((), dtype=torch.promote_types(q.dtype, torch.float32))
    for a in range(0, t, block):
        e = min(t, a + block)
        hi = s - t + e  # keys after the block's last query are never allowed
        with torch.no_grad():
            keys = select_block(iq[:, a:e], iw[:, a:e], ik[:, :hi], k_slots[s - t + a : hi], valid, top_k, block)
        rows = (keys & 0xFFFFFFFF) + s * torch.arange(b, device=q.device)[:, None, None]  # (B, Tq, N) rows of ik
        args = (q[:, :, a:e], kt, vt, rows, rows[:, :, None] * kvh + heads[:, None], keys != NOT_ALLOWED, iq[:, a:e],
                iw[:, a:e], ik.reshape(b * s, -1), with_kl, tau)
        y, part = checkpoint(sparse_block, *args, use_reentrant=False) if torch.is_grad_enabled() \
            else sparse_block(*args)
        ys.append(y)
        kl = kl + part
    return torch.cat(ys, 2), (kl / (b * t) if with_kl else 0.0)


def select_block(iq, iw, ik, q_slots, valid, top_k: int, block: int) -> torch.Tensor:
    """Sort keys (B, Tq, N) of the top_k keys of a block of queries (at ``q_slots``) among ik (B, S, E), scored
    ``SELECT_KEYS`` keys at a time with a running top-k (NOT_ALLOWED fills the places of keys a query cannot have)."""
    best = torch.full((*iq.shape[:2], top_k), NOT_ALLOWED, dtype=torch.int64, device=iq.device)
    step = max(block, SELECT_KEYS)
    for c in range(0, ik.shape[1], step):
        k_slots = torch.arange(c, min(c + step, ik.shape[1]), device=iq.device)
        keys = sort_keys(index_scores(iq, iw, ik[:, c : c + step]), allowed_mask(q_slots, k_slots, valid), k_slots)
        best = torch.cat((best, keys), -1).topk(top_k, dim=-1).values
    return best


def sparse_block(q, kt, vt, rows, kv_rows, chosen, iq, iw, ikt, with_kl: bool, tau: float = 1.0):
    """Attention of a block of queries over their selected keys and, with ``with_kl``, the indexer's summed KL
    towards it. q (B, H, Tq, D); kt, vt (B * S * K, D): keys and values as rows, key slot-major; ikt (B * S, E);
    rows, chosen (B, Tq, N): the selected slots' rows of ikt and which are real; kv_rows (B, Tq, K, N) their rows of
    kt -> (B, H, Tq, D), KL. Row selection (``index_select``) copies whole rows straight into the (B, Tq, K, N, D)
    layout the matmuls batch over: several times faster on CPU than ``gather`` with an expanded index over a
    (B, K, S, D) tensor, and so is its backward (``index_add``)."""
    b, h, tq, d = q.shape
    kvh = kv_rows.shape[2]
    kg, vg = (x.index_select(0, kv_rows.reshape(-1)).view(*kv_rows.shape, d) for x in (kt, vt))
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).transpose(1, 2).reshape(b, tq, kvh, h // kvh, d)  # (B, Tq, K, G, D)
    scores = qg @ kg.to(acc).transpose(-1, -2) / math.sqrt(d)  # (B, Tq, K, G, N)
    probs = scores.masked_fill(~chosen[:, :, None, None], float("-inf")).softmax(-1)
    y = (probs @ vg.to(acc)).view(b, tq, h, d).transpose(1, 2).to(q.dtype)
    if not with_kl:
        return y, q.new_zeros((), dtype=acc)
    ig = ikt.index_select(0, rows.reshape(-1)).view(*rows.shape, -1)
    logits = torch.einsum("btjn,btj->btn", torch.einsum("btje,btne->btjn", iq, ig).relu(), iw)
    return y, kl_sum(probs.detach().mean((2, 3)), logits, chosen, tau)


def dense_kl_chunked(q, k, iq, iw, ik, block: int, valid=None, tau: float = 1.0) -> torch.Tensor:
    """The warm-up's mean KL per query over all allowed keys, a block of queries at a time (checkpointed)."""
    t, s = q.shape[2], k.shape[2]
    k_slots = torch.arange(s, device=q.device)
    kl = q.new_zeros((), dtype=torch.promote_types(q.dtype, torch.float32))
    for a in range(0, t, block):
        e = min(t, a + block)
        hi = s - t + e
        allowed = allowed_mask(k_slots[s - t + a : hi], k_slots[:hi], valid)
        args = (q[:, :, a:e].detach(), k[:, :, :hi].detach(), iq[:, a:e], iw[:, a:e], ik[:, :hi], allowed, tau)
        kl = kl + (checkpoint(_dense_kl_block, *args, use_reentrant=False) if torch.is_grad_enabled()
                   else _dense_kl_block(*args))
    return kl / (q.shape[0] * t)


def _dense_kl_block(q, k, iq, iw, ik, allowed, tau: float) -> torch.Tensor:
    with torch.no_grad():
        p = head_mean_probs(q, k, allowed)
    return kl_sum(p, index_scores(iq, iw, ik), allowed.expand_as(p), tau)


class DSA(nn.Module):
    """The token mixer: ``attn``'s projections (``self.attn``, no sliding window) and a lightning indexer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(dataclasses.replace(cfg, attn=dataclasses.replace(cfg.attn, window=0)))
        self.indexer = Indexer(cfg)
        d = cfg.dsa
        self.top_k, self.mode, self.kl_weight, self.block = d.top_k, d.mode, d.kl_weight, d.block
        self.dense_steps = d.dense_steps if d.mode == "sparse" else 0  # the in-run warm-up (``at_step``)
        self.tau = d.kl_temperature
        self.reference = False  # True: dsa_reference (tests)
        self.aux_loss: torch.Tensor | float = 0.0  # the indexer's weighted KL of the last training-mode forward

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.attn.reset_parameters(std, out_std)
        self.indexer.reset_parameters(std)

    def init_cache(self, batch_size: int, max_len: int, device, dtype) -> IndexedKVCache:
        a = self.attn
        return IndexedKVCache(batch_size, a.num_kv_heads, max_len, a.head_dim, self.indexer.dim, device, dtype)

    def project(self, x: torch.Tensor, cache: IndexedKVCache | None = None):
        """(B, T, C) -> q (B, H, T, D); k, v (B, K, S, D); iq, iw; ik (B, S, E); valid (B, S) or None. With a cache
        the new keys are appended and S counts every slot written."""
        a, (b, t, _) = self.attn, x.shape
        h, kvh, d = a.num_heads, a.num_kv_heads, a.head_dim
        start = cache.pos if cache is not None else 0
        positions = None if cache is None else cache.positions(t)  # (B, T), or None when no row is padded
        qkv = linear(x, a.wqkv.weight).view(b, t, h + 2 * kvh, d)
        qk = apply_rope(qkv[:, :, : h + kvh], *rope_at(a, d, a.theta, start, t, positions)).transpose(1, 2)
        q, k = qk.split([h, kvh], dim=1)
        v = qkv[:, :, h + kvh :].transpose(1, 2)
        iq, iw, ik = self.indexer(x, start, positions)
        valid = None
        if cache is not None:
            k, v, ik = cache.append_indexed(k, v, ik)
            valid = None if cache.valid is None else cache.valid[:, : cache.pos]
        return q, k, v, iq, iw, ik, valid

    def forward(self, x: torch.Tensor, cache: IndexedKVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v, iq, iw, ik, valid = self.project(x, cache)
        with_kl = self.training and self.kl_weight > 0 and torch.is_grad_enabled()
        dense = self.mode == "dense"
        if self.reference or (k.shape[2] <= self.block and (with_kl or not dense)):
            # up to one block of keys the masked (T, S) form is the cheaper one: no gathers, one pass
            y, kl = dsa_reference(q, k, v, iq, iw, ik, self.top_k, dense, valid, with_kl, self.tau)
        elif dense:
            y = dense_attention(q, k, v, valid)
            kl = dense_kl_chunked(q, k, iq, iw, ik, self.block, valid, self.tau) if with_kl else 0.0
        else:
            y, kl = dsa_chunked(q, k, v, iq, iw, ik, self.top_k, self.block, valid, with_kl, self.tau)
        self.aux_loss = self.kl_weight * kl if with_kl else 0.0
        return linear(y.transpose(1, 2).reshape(b, t, -1), self.attn.wo.weight)

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        """Attention's cost with the context FLOPs of top_k keys per query (sparse) or all (dense), plus the
        indexer: its projections, and J * E multiply-adds per (query, earlier key) pair."""
        d, c = cfg.dsa, cfg.d_model
        attn = Attention.cost(dataclasses.replace(cfg, attn=dataclasses.replace(cfg.attn, window=0)), seq_len)
        index_params = c * (d.index_heads * d.index_dim + d.index_dim + d.index_heads)
        per_key, per_index_key = 2 * 2 * cfg.attn.num_heads * cfg.head_dim, 2 * d.index_heads * (d.index_dim + 1)
        keys = 0 if d.mode == "dense" else d.top_k  # mean_keys' window 0 = every key
        # saved: the indexer's q, k, w; sparse: the (T, N) int64 indices
        act = 2 * (d.index_heads * d.index_dim + d.index_dim + d.index_heads) + (8 * d.top_k if keys else 0)
        return LayerCost(attn.params + index_params + d.index_dim, attn.matmul_params + index_params,
                         per_key * mean_keys(seq_len, keys, False) + per_index_key * seq_len,
                         per_key * mean_keys(seq_len, keys, True) + per_index_key * mean_keys(seq_len, 0, True),
                         attn.activation_bytes + act)

    @staticmethod
    def state_bytes(cfg: ModelConfig, tokens: int, nbytes: int) -> int:
        """Bytes of ``init_cache`` for one sequence: attention's keys and values, and the indexer keys (T, E)."""
        return Attention.state_bytes(cfg, tokens, nbytes) + tokens * cfg.dsa.index_dim * nbytes


def at_step(model: nn.Module, step: int) -> None:
    """The training loop's DSA hook, before each optimizer step: a layer with ``dsa.dense_steps`` runs dense (the
    warm-up) while ``step`` < dense_steps, then sparse. The mode follows from the step alone, so resume is exact."""
    for layer in model.modules():
        if isinstance(layer, DSA) and layer.dense_steps:
            layer.mode = "dense" if step < layer.dense_steps else "sparse"


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Full causal attention (the warm-up) by attention's kernels; ``valid`` (B, S): a left-padded cache's slots."""
    t, s, gqa = q.shape[2], k.shape[2], q.shape[1] != k.shape[1]
    if valid is not None:
        return attention_padded(q, k, v, padded_mask(valid, t, 0))
    if q.device.type == "cpu" and s <= MATMUL_ATTN_MAX_KEYS:
        return attention_matmul(q, k, v)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.arange(s, device=q.device)[None, :] <= torch.arange(s - t, s, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@torch.no_grad()
def indexer_recall(layer: DSA, x: torch.Tensor, k: int, mass: bool = False) -> float:
    """Fraction of the main attention's top-k keys (by head-mean probability) that the indexer's top-k also picks,
    over the queries of x (B, T, C), the layer's input, that have more than k earlier keys. Builds (T, T) scores.
    ``mass``: the attention probability on the indexer's picks over that on the attention's own top-k instead (a
    missed key counts by its weight: the far tail's near-equal keys barely count)."""
    q, keys, _, iq, iw, ik, _ = layer.project(x)
    t = q.shape[2]
    slots = torch.arange(t, device=x.device)
    allowed = allowed_mask(slots, slots, None).expand(q.shape[0], t, t)
    p = head_mean_probs(q, keys, allowed)
    main = p.masked_fill(~allowed, -1.0).topk(k, dim=-1).indices
    picked = sort_keys(index_scores(iq, iw, ik), allowed, slots).topk(k, dim=-1).values & 0xFFFFFFFF
    if mass:
        return (p.gather(-1, picked)[:, k:].sum() / p.gather(-1, main)[:, k:].sum()).item()
    hits = torch.zeros_like(allowed).scatter_(-1, picked, True).gather(-1, main)  # (B, T, k)
    return hits[:, k:].float().mean().item()
