"""Causal self-attention with grouped-query heads (MHA / GQA / MQA), RoPE and an optional sliding window.

GQA: Ainslie et al. 2023 (arXiv 2305.13245). Two fast paths: ``F.scaled_dot_product_attention``, and on CPU
up to ``MATMUL_ATTN_MAX_KEYS`` keys ``attention_matmul`` (blocks of queries, two batched matmuls around a
softmax), which there beats SDPA's flash kernel: about 2.5x at 256 tokens in bf16, 1.25x in fp32.
``attention_ref`` is the plain-softmax reference the tests compare both with.
Shapes: B batch, T new tokens, S keys (cached + new), H query heads, K kv heads, G = H / K, D head dim, C d_model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cache import KVCache
from slmforge.model.cost import LayerCost, mean_keys
from slmforge.model.layers import apply_rope, init_linear, linear, rope_tables

# attention_matmul keeps about half of the (B, H, T, S) scores for backward, so long sequences go to SDPA's
# flash kernel, whose memory is O(T). Up to 1024 keys the matmul path is the faster one on CPU, 1.2-2x in fp32
# and bf16 (2 Zen 5 cores, head_dim 64, 2048 tokens per batch). 0 turns the matmul path off.
MATMUL_ATTN_MAX_KEYS = 1024


def causal_mask(t: int, s: int, window: int, device) -> torch.Tensor:
    """Boolean (T, S) mask, True = may attend. Query i sits at absolute position s - t + i."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return mask


def padded_mask(valid: torch.Tensor, t: int, window: int) -> torch.Tensor:
    """valid: (B, S) bool, True on slots that hold a real token, the last T the queries' -> (B, 1, T, S) bool mask
    for left-padded rows, True = may attend.

    Causal (and windowed) over slots as ``causal_mask``, and no query sees a padding key. A padding query (padding
    comes before a row's first real token) sees itself only: an empty softmax row would be NaN, and NaN values
    reach the real tokens through the next layer's attention (0 * NaN).
    """
    s = valid.shape[1]
    if t == 1:  # a decoding step: the query sees every real slot (in the window) and itself
        mask = valid.clone()
        mask[:, -1] = True
        if window:
            mask[:, : max(0, s - window)] = False
        return mask[:, None, None]
    mask = causal_mask(t, s, window, valid.device) & valid[:, None, :]  # (B, T, S)
    mask.diagonal(offset=s - t, dim1=1, dim2=2).fill_(True)
    return mask[:, None]


def document_positions(doc: torch.Tensor) -> torch.Tensor:
    """doc: (B, T) document ids of packed sequences (equal ids in a run) -> (B, T) each token's position inside its
    document, 0 at the document's first token: RoPE restarts per document, as if each ran alone."""
    idx = torch.arange(doc.shape[1], device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


def document_mask(doc: torch.Tensor, window: int) -> torch.Tensor:
    """doc: (B, T) -> (B, 1, T, T) bool: causal (and windowed) within a document, nothing across documents."""
    t = doc.shape[1]
    return (causal_mask(t, t, window, doc.device) & (doc[:, :, None] == doc[:, None, :]))[:, None]


def attention_ref(q, k, v, mask) -> torch.Tensor:
    """Plain softmax attention. q: (B, H, T, D); k, v: (B, K, S, D); mask: (T, S) bool."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32; float64 stays float64
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.to(acc)).to(q.dtype)


def attention_matmul(q, k, v, window: int = 0, block: int = 128) -> torch.Tensor:
    """Causal softmax attention as baddbmm -> softmax -> bmm, ``block`` queries at a time.

    q: (B, H, T, D); k, v: (B, K, S, D), the last T keys belonging to the queries -> (B, H, T, D).
    Each block of queries multiplies only the keys its causal (and sliding-window) mask lets through, which
    skips about half of the work and keeps each score block in cache. Within a block the G query heads that
    share a kv head are stacked along the rows, (B*K, G*Tb, D), so k and v are never repeated, and the mask
    enters as an additive bias inside the first matmul. Under bf16 the softmax reads bf16 scores and
    accumulates in fp32 (ATen's CPU kernel), which skips two fp32 copies of the score matrix.
    """
    t, s = q.shape[2], k.shape[2]
    if t == 1 and not (window and s > window):  # a decoding step that sees every key: no mask to build
        return _attention_block(q, k, v, None)
    mask = causal_mask(t, s, window, q.device)
    outs = []
    for a in range(0, t, block):
        b = min(t, a + block)
        # keys past the block's last query, or (with a window) before its first query's window, are masked
        lo, hi = (max(0, s - t + a - window + 1) if window else 0), s - t + b
        outs.append(_attention_block(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], mask[a:b, lo:hi]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def attention_padded(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Attention over a left-padded cache: q (B, H, T, D); k, v (B, K, S, D); mask (B, 1, T, S) bool, True = may
    attend (``padded_mask``) -> (B, H, T, D).

    On CPU up to ``MATMUL_ATTN_MAX_KEYS`` keys by ``_attention_block`` with the mask as a per-row bias: SDPA's CPU
    flash kernel with a mask builds a kernel for each new key count, which a decoding step (one more key every
    step) pays again and again: 4-12 ms stalls every few steps where a step of the tiny preset takes 3 ms.
    """
    if q.device.type == "cpu" and k.shape[2] <= MATMUL_ATTN_MAX_KEYS:
        return _attention_block(q, k, v, mask[:, 0])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _attention_block(q, k, v, mask) -> torch.Tensor:
    """q: (B, H, Tb, D); k, v: (B, K, Sb, D); mask: (Tb, Sb) bool for every row, (B, Tb, Sb) per row, or None for
    none -> (B, H, Tb, D)."""
    b, h, t, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    qs, ks = q.reshape(b * kvh, g * t, d), k.reshape(b * kvh, s, d).transpose(1, 2)
    if mask is None:
        scores = torch.bmm(qs, ks).mul_(1 / math.sqrt(d))  # (B*K, G*Tb, Sb)
    elif mask.dim() == 3:  # per row: each row's bias repeated over its K kv heads and G query heads
        bias = torch.zeros(b, 1, 1, t, s, dtype=q.dtype, device=q.device).masked_fill_(~mask[:, None, None],
                                                                                       float("-inf"))
        scores = torch.baddbmm(bias.expand(b, kvh, g, t, s).reshape(b * kvh, g * t, s), qs, ks, alpha=1 / math.sqrt(d))
    else:
        bias = torch.zeros(t, s, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf")).repeat(g, 1)
        scores = torch.baddbmm(bias.expand(b * kvh, g * t, s), qs, ks, alpha=1 / math.sqrt(d))
    y = torch.bmm(scores.softmax(-1).to(v.dtype), v.reshape(b * kvh, s, d))  # (B*K, G*Tb, D)
    return y.view(b, h, t, d)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.attn
        if a.num_heads % a.num_kv_heads:
            raise ValueError(f"attn.num_heads={a.num_heads} must be a multiple of attn.num_kv_heads={a.num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, cfg.head_dim
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        self.window, self.theta = a.window, a.rope_theta
        # RoPE scaling (model.attn.rope_scaling): the tables' frequencies follow the context trained before it.
        self.scale, self.original_len = a, a.rope_original_len or cfg.max_seq_len / a.rope_factor
        # One fused projection for q, k and v: a single larger matmul beats three small ones.
        self.wqkv = nn.Linear(cfg.d_model, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, cfg.d_model, bias=False)
        cos, sin = self._tables(cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        init_linear(self.wqkv, std)
        init_linear(self.wo, out_std)
        cos, sin = self._tables(self.cos.shape[0], device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def init_cache(self, batch_size: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch_size, self.num_kv_heads, max_len, self.head_dim, device, dtype)

    def _tables(self, max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.head_dim, max_len, self.theta, device, self.scale, self.original_len)

    def _rope(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + t > self.cos.shape[0]:  # decoding past max_seq_len: extend the tables
            self.cos, self.sin = self._tables(2 * (start + t), device=self.cos.device)
        return self.cos[start : start + t], self.sin[start : start + t]

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, doc: torch.Tensor | None = None) -> torch.Tensor:
        return linear(self.heads(x, cache, doc), self.wo.weight)

    def heads(self, x: torch.Tensor, cache: KVCache | None = None, doc: torch.Tensor | None = None) -> torch.Tensor:
        """Everything but the output projection: (B, T, C) -> the heads' outputs (B, T, H*D).

        With a left-padded cache (``cache.num_pad``: batched decoding of prompts of different lengths) each row
        gets its own RoPE positions, counted from its first real token, and a key mask (``padded_mask``), so every
        row attends as it would alone. With ``doc`` (B, T) (packed documents, no cache) positions restart at each
        document and a query sees only its own document's keys (``document_mask``). Otherwise positions follow the
        cache and ``_attend`` picks the kernel.
        """
        b, t, _ = x.shape
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = linear(x, self.wqkv.weight).view(b, t, h + 2 * kvh, d)
        cos, sin = self._rope(cache.pos if cache is not None else 0, t)  # (T, D/2)
        positions = None if cache is None else cache.positions(t)  # (B, T), or None when no row is padded
        if doc is not None:
            positions = document_positions(doc)
        if positions is None:
            rope = cos[:, None], sin[:, None]
        else:
            rope = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, T, 1, D/2)
        # q and k lie side by side in the fused projection, so one rotation covers both.
        qk = apply_rope(qkv[:, :, : h + kvh], *rope).transpose(1, 2)  # (B, H+K, T, D)
        q, k = qk.split([h, kvh], dim=1)
        v = qkv[:, :, h + kvh :].transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.append(k, v)
        if positions is None:
            y = self._attend(q, k, v)
        else:
            if doc is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc, self.window),
                                                   enable_gqa=h != kvh)
            else:
                y = attention_padded(q, k, v, padded_mask(cache.valid[:, : k.shape[2]], t, self.window))
        return y.transpose(1, 2).reshape(b, t, h * d)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, H, T, D); k, v: (B, K, S, D), the last T keys new -> (B, H, T, D), by the fastest kernel."""
        t, s, gqa = q.shape[2], k.shape[2], self.num_heads != self.num_kv_heads
        if q.device.type == "cpu" and s <= MATMUL_ATTN_MAX_KEYS:
            return attention_matmul(q, k, v, self.window)
        if t == s and not self.window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if t == 1 and not (self.window and s > self.window):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # one query sees all keys
        mask = causal_mask(t, s, self.window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        """Parameters, FLOPs and saved activations per token (``model/cost.py``)."""
        h, a = cfg.d_model, cfg.attn
        q_dim, kv_dim = a.num_heads * cfg.head_dim, a.num_kv_heads * cfg.head_dim
        params = h * q_dim + 2 * h * kv_dim + q_dim * h  # wqkv (q, k, v), wo
        # QK^T and AV: 2 FLOPs per multiply-add, q_dim per key, two matmuls
        per_key = 2 * 2 * q_dim
        # Saved for backward: the normed input (shared by q, k, v), Q, K, V, the attention output (also wo's input),
        # and SDPA's fp32 log-sum-exp per head. Flash attention recomputes the s x s scores instead of storing them.
        act = 2 * (h + q_dim + 2 * kv_dim + q_dim) + 4 * a.num_heads
        return LayerCost(params, params, per_key * mean_keys(seq_len, a.window, False),
                         per_key * mean_keys(seq_len, a.window, True), act)

    @staticmethod
    def state_bytes(cfg: ModelConfig, tokens: int, nbytes: int) -> int:
        """Bytes of ``init_cache`` for one sequence of ``tokens`` in a dtype of ``nbytes`` bytes: keys and values,
        (K, T, D) each, for every slot (a sliding window allocates them all too)."""
        return 2 * tokens * cfg.attn.num_kv_heads * cfg.head_dim * nbytes
