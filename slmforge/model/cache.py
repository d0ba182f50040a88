"""Decoding caches, one per layer, created by the layer's mixer (``mixer.init_cache``)."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for one attention layer.

    k, v: (B, KV heads, max_len, head_dim). ``pos`` is the number of positions already written;
    it is also the absolute position of the next token, which RoPE needs.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, KV, T, D) new keys/values; return views over everything written so far."""
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {t} tokens > max_len {self.max_len}")
        self.k[:, :, self.pos : self.pos + t] = k
        self.v[:, :, self.pos : self.pos + t] = v
        self.pos += t
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class RecurrentCache:
    """The fixed-size state of one recurrent layer (SSM, linear attention): it does not grow with the sequence.

    state: the recurrent state, (B, H, P, N) for the SSM or (B, H, K, V) for linear attention, kept in at least
    float32 because it accumulates over every step; conv: the last k-1 inputs of a causal depthwise convolution,
    (B, k-1, channels), or None. The mixer overwrites both in place; ``pos`` counts the tokens seen.
    """

    def __init__(self, state: torch.Tensor, conv: torch.Tensor | None = None):
        self.state, self.conv = state, conv
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state, self.conv) if t is not None)
