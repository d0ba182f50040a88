"""Engram conditional memory: hashed n-gram embedding tables read at chosen layers (Cheng et al., arXiv 2601.07372).

A lookup costs no matmul per table row, so the tables can be far larger than the model (millions of rows) at nearly
the compute per token of the model without them. At a layer listed in ``model.engram.layers``, before its block:

1. **Compression**: a token id maps to a canonical id (``compression_map``: ids that differ only by case or a
   leading space are one), a buffer ``LM.token_map`` saved with the model.
2. **N-grams and hashing**: for each order n in 2..N and head k in 1..K, the n compressed ids ending at t hash to
   a row of table (n, k): ``(c_t * a_0 XOR c_{t-1} * a_1 XOR ... XOR c_{t-n+1} * a_{n-1}) mod p_{n,k}``, with odd
   multipliers drawn per layer from a fixed seed and a distinct prime table size per head (collisions of one head
   rarely repeat in another). Ids before the sequence start (or in another packed document, or left padding) are
   ``boundary``. ``hash_rows`` beside the loop reference ``hash_rows_ref``.
3. **Lookup**: the (N-1) * K rows, one ``dim``-wide embedding each, concatenated: the memory m_t. With
   ``engram.offload`` the tables stay in host memory when the model moves (``_apply``); rows depend on the tokens
   only, so ``LM.engram_memory(tokens)`` can run ahead of the forward (prefetch) and go in as ``memory=``.
4. **Context-aware gating**: k = W_k m, v = W_v m, alpha = sigmoid(<norm(h), norm(k)> / sqrt(C)); v~ = alpha * v.
5. **Short convolution**: y = v~ + SiLU(conv(norm(v~))), depthwise and causal, width ``kernel``, dilated by N; its
   weight starts at zero. The residual becomes h + y. With alpha = 0 the layer adds exactly zero.

Decoding keeps, per Engram layer, the last N-1 compressed ids and the convolution's past inputs in an
``EngramCache`` around the mixer's own cache. Shapes: B batch, T time, C d_model, H = (N-1) * K tables, D dim.
"""

from __future__ import annotations

import math
import random
import unicodedata

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cost import LayerCost
from slmforge.model.layers import RMSNorm, linear


def compression_map(tokens: list[str]) -> list[int]:
    """Canonical id of every token (by id): tokens equal after NFKC, lower-casing and dropping a leading space (or
    byte-level BPE's "Ġ") share the id of the first of them; canonical ids are dense, 0..distinct-1."""
    canonical, out = {}, []
    for tok in tokens:
        key = unicodedata.normalize("NFKC", tok).replace("Ġ", " ").lower()
        key = key.lstrip(" ") or key  # a token of spaces only stays itself
        out.append(canonical.setdefault(key, len(canonical)))
    return out


def table_sizes(rows: int, count: int) -> list[int]:
    """The first ``count`` primes at or above ``rows``: one distinct prime size per table."""
    out, n = [], max(2, rows)
    while len(out) < count:
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            out.append(n)
        n += 1
    return out


def multipliers(layer: int, max_order: int, num_heads: int) -> list[list[list[int]]]:
    """[order - 2][head][i]: odd hash multipliers below 2**31, fixed by the layer (ids < 2**31 keep products < 2**62)."""
    rng = random.Random(f"engram-{layer}")
    return [[[rng.randrange(1, 1 << 31) | 1 for _ in range(max_order)] for _ in range(num_heads)]
            for _ in range(max_order - 1)]


def context_ids(c: torch.Tensor, order: int, boundary: int, doc: torch.Tensor | None = None,
                history: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) compressed ids -> (B, T, order): [..., i] = the id i steps back, ``boundary`` before the start, in
    another document (``doc``, (B, T)) or, with ``history`` (B, order - 1), continuing the ids before these."""
    B, T = c.shape
    prev = c.new_full((B, order - 1), boundary) if history is None else history
    full = torch.cat([prev, c], dim=1)  # (B, order - 1 + T)
    out = torch.stack([full[:, order - 1 - i : order - 1 - i + T] for i in range(order)], dim=-1)
    if doc is not None:
        docs = torch.cat([doc.new_full((B, order - 1), -1), doc], dim=1)
        same = torch.stack([docs[:, order - 1 - i : order - 1 - i + T] == doc for i in range(order)], dim=-1)
        out = torch.where(same, out, torch.full_like(out, boundary))
    return out


def hash_rows(ctx: torch.Tensor, mult: torch.Tensor, primes: torch.Tensor) -> torch.Tensor:
    """(B, T, N) context ids, (N-1, K, N) multipliers, (N-1, K) primes -> (B, T, (N-1) * K) row of each table."""
    N = ctx.shape[-1]
    h = torch.zeros(*ctx.shape[:2], *primes.shape, dtype=torch.long, device=ctx.device)  # (B, T, N-1, K)
    for i in range(N):
        # order n = o + 2 reads ids 0..n-1 back: id i joins the orders above i - 1
        used = (torch.arange(N - 1, device=ctx.device) + 2 > i).view(-1, 1)  # (N-1, 1)
        h = h ^ torch.where(used, ctx[..., i, None, None] * mult[..., i], 0)
    return (h % primes).flatten(2)


def hash_rows_ref(ctx: list[list[list[int]]], mult: list, primes: list) -> list[list[list[int]]]:
    """``hash_rows`` with Python ints and loops: [b][t][table]."""
    out = []
    for row in ctx:
        out.append([])
        for ids in row:
            rows = []
            for o, heads in enumerate(mult):
                for k, a in enumerate(heads):
                    h = 0
                    for i in range(o + 2):
                        h ^= ids[i] * a[i]
                    rows.append(h % primes[o][k])
            out[-1].append(rows)
    return out


class Engram(nn.Module):
    """The memory of one layer: its tables, gate and convolution. ``forward(x, memory, cache)`` -> the residual
    addition y (B, T, C); ``memory`` (B, T, H * D) comes from ``lookup(rows(...))``."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        e, C = cfg.engram, cfg.d_model
        self.order, self.offload, self.dilation = e.max_order, e.offload, e.max_order
        sizes = table_sizes(e.table_rows, (e.max_order - 1) * e.num_heads)
        self.register_buffer("mult", torch.tensor(multipliers(layer, e.max_order, e.num_heads)), persistent=False)
        self.register_buffer("primes", torch.tensor(sizes).view(e.max_order - 1, e.num_heads), persistent=False)
        self.register_buffer("offsets", torch.tensor([0] + sizes[:-1]).cumsum(0), persistent=False)
        self.table = nn.Embedding(sum(sizes), e.dim)
        mem = len(sizes) * e.dim
        self.key = nn.Linear(mem, C, bias=False)
        self.value = nn.Linear(mem, C, bias=False)
        self.h_norm, self.k_norm, self.v_norm = RMSNorm(C, cfg.norm_eps), RMSNorm(C, cfg.norm_eps), RMSNorm(C, cfg.norm_eps)
        self.conv = nn.Parameter(torch.zeros(C, e.kernel))  # (C, w); w-1 is the newest input

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.table.weight, std=std)
        nn.init.normal_(self.key.weight, std=std)
        nn.init.normal_(self.value.weight, std=out_std)
        for norm in (self.h_norm, self.k_norm, self.v_norm):
            norm.weight.data.fill_(1.0)
        # Zero: the convolution starts as the identity's complement (y = v~), as in the paper.
        self.conv.data.zero_()

    def _apply(self, fn, recurse=True):
        # Offloaded tables stay where they are (host memory) when the model moves or changes dtype.
        if not self.offload:
            return super()._apply(fn, recurse)
        table = self._modules.pop("table")
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules["table"] = table

    @property
    def conv_len(self) -> int:
        return (self.conv.shape[1] - 1) * self.dilation

    def rows(self, ctx: torch.Tensor) -> torch.Tensor:
        """(B, T, N) context ids -> (B, T, H) rows of the concatenated tables."""
        return hash_rows(ctx, self.mult, self.primes) + self.offsets

    def lookup(self, rows: torch.Tensor, device=None) -> torch.Tensor:
        """(B, T, H) rows -> the memory (B, T, H * D) on ``device`` (the table's when None)."""
        m = self.table(rows.to(self.table.weight.device)).flatten(2)
        return m if device is None else m.to(device, non_blocking=True)

    def gate(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, T, 1) alpha = sigmoid(<norm(h), norm(k)> / sqrt(C))."""
        score = (self.h_norm(h) * self.k_norm(k)).sum(-1, keepdim=True) / math.sqrt(h.shape[-1])
        return torch.sigmoid(score)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: EngramCache | None = None,
                doc: torch.Tensor | None = None) -> torch.Tensor:
        memory = memory.to(x.dtype)
        v = self.gate(x, linear(memory, self.key.weight)) * linear(memory, self.value.weight)  # (B, T, C)
        u = self.v_norm(v)
        pad = None if cache is None else cache.pad_mask(x.shape[1])
        if pad is not None:  # padded slots feed the convolution nothing, as if the row were alone
            u = u.masked_fill(pad[..., None], 0.0)
        past = None if cache is None else cache.conv
        if cache is not None:
            cache.conv = torch.cat([past, u], dim=1)[:, -self.conv_len :] if self.conv_len else past
        return v + F.silu(self._conv(u, past, doc))

    def _conv(self, u: torch.Tensor, past: torch.Tensor | None, doc: torch.Tensor | None) -> torch.Tensor:
        """Depthwise causal convolution of (B, T, C) as a sum of shifted copies (a packed document sees only itself)."""
        B, T, C = u.shape
        w = self.conv.shape[1]
        past = u.new_zeros(B, self.conv_len, C) if past is None else past
        full = torch.cat([past, u], dim=1)  # (B, conv_len + T, C)
        y = torch.zeros_like(u)
        for j in range(w):
            s = (w - 1 - j) * self.dilation  # how far back tap j reads
            tap = full[:, self.conv_len - s : self.conv_len - s + T]
            if doc is not None and s:
                tap = tap * (doc == F.pad(doc, (s, 0), value=-1)[:, :T])[..., None]
            y = y + tap * self.conv[:, j]
        return y

    @staticmethod
    def cost(cfg: ModelConfig) -> LayerCost:
        """The compute part (projections, norms, convolution); the tables are ``table_params``."""
        e, C = cfg.engram, cfg.d_model
        mem = (e.max_order - 1) * e.num_heads * e.dim
        return LayerCost(2 * mem * C + 3 * C + C * e.kernel, 2 * mem * C, activation_bytes=2 * (mem + 4 * C))

    @staticmethod
    def table_params(cfg: ModelConfig) -> int:
        e = cfg.engram
        return sum(table_sizes(e.table_rows, (e.max_order - 1) * e.num_heads)) * e.dim


def engram_ref(m: Engram, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``Engram.forward`` without a cache, one position at a time, the convolution by its definition."""
    B, T, C = x.shape
    w = m.conv.shape[1]
    v = torch.stack([m.gate(x[:, t], linear(memory[:, t], m.key.weight)) * linear(memory[:, t], m.value.weight)
                     for t in range(T)], dim=1)
    u = m.v_norm(v)
    y = torch.zeros_like(v)
    for t in range(T):
        for j in range(w):
            back = t - (w - 1 - j) * m.dilation
            if back >= 0:
                y[:, t] += u[:, back] * m.conv[:, j]
    return v + F.silu(y)


class EngramCache:
    """A layer's decoding cache wrapped with its memory's state: ``history`` (B, N-1), the last compressed ids, and
    ``conv`` (B, conv_len, C), the convolution's last inputs. Everything else is the mixer's cache, ``inner``."""

    def __init__(self, inner, engram: Engram, batch_size: int, boundary: int, device, dtype):
        self.inner = inner
        self.history = torch.full((batch_size, engram.order - 1), boundary, dtype=torch.long, device=device)
        self.conv = torch.zeros(batch_size, engram.conv_len, engram.conv.shape[0], device=device, dtype=dtype)

    def __getattr__(self, name):  # pos, pad_mask, max_len, ...: the mixer cache's
        return getattr(self.__dict__["inner"], name)

    def left_pad(self, num_pad: torch.Tensor | None) -> None:
        self.inner.left_pad(num_pad)

    def keep(self, rows: torch.Tensor) -> None:
        self.inner.keep(rows)
        self.history, self.conv = self.history[rows], self.conv[rows]

    def nbytes(self) -> int:
        return self.inner.nbytes() + self.history.nbytes + self.conv.nbytes
