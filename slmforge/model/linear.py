"""Gated linear attention with a data-dependent, per-channel decay (GLA: Yang et al. 2023, arXiv 2312.06635).

Linear attention whose matrix state S (K x V per head) decays through a gate computed from the input:
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,    o_t = q_t S_t / sqrt(K),    g_t = logsigmoid(W_up W_down x_t + b) / 16
(RWKV-6 has the same matrix state and decay form, arXiv 2404.05892). The decay comes from a low-rank projection
and the division by ``linear.decay_normalizer`` keeps it close to 1 (slow forgetting) at init. Each head's output
is RMS-normalised, gated by silu(W_gate x) and projected back. Training and prefill run ``gla_chunked`` (on CUDA,
flash-linear-attention's kernel when installed: ``ops/kernels.py``); decoding (T = 1) runs the recurrence
``gla_ref``. The cache is the state, of fixed size; left padding enters with k = 0 and g = 0, which leaves it as is.
Shapes: b batch, T time, d d_model, H heads, K key dim and V value dim per head, R decay rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cache import RecurrentCache
from slmforge.model.cost import LayerCost
from slmforge.model.layers import RMSNorm, init_linear, linear
from slmforge.model.ops import gla_ref
from slmforge.model.ops.scan import checkpoint_blocks, recompute_block, use_recompute
from slmforge.model.ops.kernels import gla_scan


class GatedLinear(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.linear
        key_width, value_width = int(cfg.d_model * c.expand_k), int(cfg.d_model * c.expand_v)
        if not key_width or not value_width or key_width % c.num_heads or value_width % c.num_heads:
            raise ValueError(f"linear: d_model * expand_k = {key_width} and d_model * expand_v = {value_width} must "
                             f"be positive multiples of linear.num_heads={c.num_heads}")
        self.num_heads, self.key_dim, self.value_dim = c.num_heads, key_width // c.num_heads, value_width // c.num_heads
        self.chunk_size, self.decay_normalizer, self.fast_kernels = c.chunk_size, c.decay_normalizer, cfg.fast_kernels
        self.widths = [key_width, key_width, value_width, value_width, c.decay_rank]  # q, k, v, gate, decay (down)
        # One fused projection for q, k, v, the output gate and the low-rank decay's first half.
        self.in_proj = nn.Linear(cfg.d_model, sum(self.widths), bias=False)
        self.decay_proj = nn.Linear(c.decay_rank, key_width)  # the decay's second half, with a bias
        self.norm = RMSNorm(self.value_dim, cfg.norm_eps)  # per head, one weight shared by the heads
        self.out_proj = nn.Linear(value_width, cfg.d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        init_linear(self.in_proj, std)
        init_linear(self.decay_proj, std)
        self.norm.weight.fill_(1.0)
        init_linear(self.out_proj, out_std)

    def init_cache(self, batch_size: int, max_len: int, device, dtype) -> RecurrentCache:
        # max_len is not needed: the state has the same size at every length.
        return RecurrentCache(torch.zeros(batch_size, self.num_heads, self.key_dim, self.value_dim, device=device,
                                          dtype=torch.promote_types(dtype, torch.float32)))

    def forward(self, x: torch.Tensor, cache: RecurrentCache | None = None) -> torch.Tensor:
        t = x.shape[1]
        if cache is None and use_recompute(None, t, x, self.in_proj.weight):
            # Training on a long sequence (CPU): blocks of the whole mixer under checkpointing, the state carried
            # between them; backward recomputes one block at a time.
            o, _ = checkpoint_blocks(self._step, (x,), 1, (None,), recompute_block(self.chunk_size))
            return o
        o, state = self._step(x, None if cache is None else cache.state, None if cache is None else cache.pad_mask(t))
        if cache is not None:
            cache.state.copy_(state)
            cache.pos += t
        return o

    def _step(self, x: torch.Tensor, initial: torch.Tensor | None,
              pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixer over x (b, T, d) from the state ``initial`` (None: zeros): the output and the final state."""
        b, t, _ = x.shape
        h, dk, dv = self.num_heads, self.key_dim, self.value_dim
        q, k, v, gate, low = linear(x, self.in_proj.weight).split(self.widths, dim=-1)
        g = F.logsigmoid(F.linear(low, self.decay_proj.weight, self.decay_proj.bias)) / self.decay_normalizer
        q, k, g = (u.view(b, t, h, dk).transpose(1, 2) for u in (q, k, g))  # (b, H, T, K)
        v = v.view(b, t, h, dv).transpose(1, 2)  # (b, H, T, V)
        if pad is not None:
            # Padding (b, T) leaves the state as an unpadded row's: no input (k = 0) and no decay (g = 0).
            k, g = (u.masked_fill(pad[:, None, :, None], 0.0) for u in (k, g))
        # The scan runs in float32 at least, also under bf16 autocast: exponentials of long sums need it.
        with torch.autocast(x.device.type, enabled=False):
            if t == 1 and initial is not None:  # decoding
                o, state = gla_ref(q, k, v, g, initial_state=initial)
            else:
                o, state = gla_scan(q, k, v, g, self.chunk_size, initial, self.fast_kernels)
        o = self.norm(o.transpose(1, 2)).reshape(b, t, h * dv) * F.silu(gate)  # (b, T, H V)
        return linear(o, self.out_proj.weight), state

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        """Parameters, FLOPs and saved activations per token (``model/cost.py``)."""
        c, h = cfg.linear, cfg.d_model
        keys, values, chunk = int(h * c.expand_k), int(h * c.expand_v), min(c.chunk_size, seq_len)
        # in_proj (q, k, v, gate, decay down), decay up, out_proj
        matmul = h * (2 * keys + 2 * values + c.decay_rank) + c.decay_rank * keys + values * h
        params = matmul + keys + values // c.num_heads  # + the decay bias and the per-head norm
        # Per token: q.k scores and their use on v within a chunk, and the state each token adds and reads.
        scan = 2 * chunk * (keys + values) + 2 * 2 * keys * values // c.num_heads
        # Saved (bf16): the input, the in_proj output, the decay, the normed and gated outputs; fp32 scan output.
        act = 2 * (h + 2 * keys + 2 * values + c.decay_rank + keys + 2 * values) + 4 * values
        return LayerCost(params, matmul, scan, scan, act)

    @staticmethod
    def state_bytes(cfg: ModelConfig, tokens: int, nbytes: int) -> int:
        """Bytes of ``init_cache`` for one sequence, the same at every length: the state (H, K, V), at least fp32."""
        c = cfg.linear
        return int(cfg.d_model * c.expand_k) * int(cfg.d_model * c.expand_v) // c.num_heads * max(nbytes, 4)
