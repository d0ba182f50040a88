"""Decoding caches, one per layer, created by the layer's mixer (``mixer.init_cache``).

Every cache knows the batch's left padding: prompts of different lengths decode in one batch padded on the left
(``LM.init_cache(..., num_pad=...)``), and each mixer keeps its padded slots from touching the real ones (attention
masks them, the recurrent mixers leave their state unchanged there), so every row decodes as it would alone.
Shapes: B batch, T new tokens, K kv heads, D head dim.
"""

from __future__ import annotations

import torch


class Cache:
    """What every layer cache knows: ``pos``, the number of slots (time steps) written, the same for every row; and
    ``num_pad``, (B,) long, each row's left padding, or None when no row is padded (then nothing is masked).

    Slot s of row b holds a real token when s >= num_pad[b]; that token sits at RoPE position s - num_pad[b].
    """

    def __init__(self):
        self.pos = 0
        self.left_pad(None)

    def left_pad(self, num_pad: torch.Tensor | None) -> None:
        """Set the left padding of each row, (B,) ints; None or all zeros = none."""
        # One host sync here spares one per step: an unpadded batch takes exactly the unpadded code path.
        self.max_pad = 0 if num_pad is None else int(num_pad.max())  # slots from here on are real in every row
        self.num_pad = num_pad if self.max_pad else None

    def pad_mask(self, t: int) -> torch.Tensor | None:
        """(B, T) bool, True where the next ``t`` slots are padding; None when none of them is."""
        if self.pos >= self.max_pad:
            return None
        slots = torch.arange(self.pos, self.pos + t, device=self.num_pad.device)
        return slots[None, :] < self.num_pad[:, None]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ((B',) long), so finished rows stop costing compute."""
        if self.num_pad is not None:
            self.left_pad(self.num_pad[rows])
        if getattr(self, "ffn_state", None) is not None:  # an FFN's per-row state (FlexMoE's running sums)
            self.ffn_state = tuple(part[rows] for part in self.ffn_state)


class KVCache(Cache):
    """Preallocated keys and values for one attention layer.

    k, v: (B, K, max_len, D). ``pos`` is the number of slots already written; without padding it is also the
    position of the next token, which RoPE needs. With padding, ``valid`` (B, max_len) bool (True = a real token)
    and ``rope_pos`` (B, max_len) (slot - num_pad, 0 on padding) are built once, so a decoding step only slices them.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        super().__init__()

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def left_pad(self, num_pad: torch.Tensor | None) -> None:
        super().left_pad(num_pad)
        self.valid = self.rope_pos = None
        if self.num_pad is not None:
            slots = torch.arange(self.max_len, device=self.num_pad.device)
            self.valid = slots[None, :] >= self.num_pad[:, None]
            self.rope_pos = (slots[None, :] - self.num_pad[:, None]).clamp(min=0)

    def positions(self, t: int) -> torch.Tensor | None:
        """(B, T) RoPE positions of the next ``t`` slots; None when no row is padded (position = slot)."""
        return None if self.rope_pos is None else self.rope_pos[:, self.pos : self.pos + t]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, K, T, D) new keys/values; return views over everything written so far."""
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {t} tokens > max_len {self.max_len}")
        self.k[:, :, self.pos : self.pos + t] = k
        self.v[:, :, self.pos : self.pos + t] = v
        self.pos += t
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        self.k, self.v = self.k[rows], self.v[rows]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class IndexedKVCache(KVCache):
    """A KVCache plus the lightning indexer's keys of DeepSeek sparse attention (``model/dsa.py``).

    index_k: (B, max_len, D_I), one key per slot shared by all indexer heads, written with the slot's K and V.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, index_dim: int, device,
                 dtype):
        super().__init__(batch_size, num_kv_heads, max_len, head_dim, device, dtype)
        self.index_k = torch.zeros(batch_size, max_len, index_dim, device=device, dtype=dtype)

    def append_indexed(self, k: torch.Tensor, v: torch.Tensor,
                       index_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write (B, K, T, D) keys/values and (B, T, D_I) indexer keys; return views over everything written."""
        k, v = self.append(k, v)  # checks the room left first
        self.index_k[:, self.pos - index_k.shape[1] : self.pos] = index_k
        return k, v, self.index_k[:, : self.pos]

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        self.index_k = self.index_k[rows]

    def nbytes(self) -> int:
        return super().nbytes() + self.index_k.numel() * self.index_k.element_size()


class RecurrentCache(Cache):
    """The fixed-size state of one recurrent layer (SSM, linear attention): it does not grow with the sequence.

    state: the recurrent state, (B, H, P, N) for the SSM or (B, H, K, V) for linear attention, kept in at least
    float32 because it accumulates over every step; conv: the last k-1 inputs of a causal depthwise convolution,
    (B, k-1, channels), or None. The mixer overwrites both in place; ``pos`` counts the slots seen.
    """

    def __init__(self, state: torch.Tensor, conv: torch.Tensor | None = None):
        super().__init__()
        self.state, self.conv = state, conv

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        self.state = self.state[rows]
        self.conv = None if self.conv is None else self.conv[rows]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state, self.conv) if t is not None)
