"""Hymba-style hybrid-head mixer (Dong et al. 2024, "Hymba: A Hybrid-head Architecture for Small Language
Models", arXiv 2411.13676).

Attention heads and SSM heads read the same input in parallel, in one layer. Each branch's output is
RMS-normalised and scaled per channel, and one output projection maps their sum back:
    y = W_out (beta1 * norm(attn_heads(x)) + beta2 * norm(ssm_heads(x)))
Both betas start at 1/2, so the layer starts from the branches' mean as in the paper. The attention heads are an
``Attention`` (its ``wo`` is the one output projection, its ``attn.window`` replaced by ``hymba.window``); the SSM
heads are ``SSMHeads`` of the same width, whose gated RMSNorm weight is beta2. Meta tokens and cross-layer KV
sharing, also in the paper, are left out. The cache pairs a KV cache with the SSM's recurrent cache.
Shapes: b batch, T time, d d_model, H attention heads, K kv heads, D head dim, W = H D the width of each branch.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.attention import Attention
from slmforge.model.cache import KVCache, RecurrentCache
from slmforge.model.cost import LayerCost
from slmforge.model.layers import RMSNorm, linear
from slmforge.model.ssm import SSMHeads


class HymbaCache:
    """A KV cache for the attention heads and a recurrent cache for the SSM heads, advanced (and padded) together."""

    def __init__(self, kv: KVCache, ssm: RecurrentCache):
        self.kv, self.ssm = kv, ssm

    @property
    def pos(self) -> int:
        return self.kv.pos

    def left_pad(self, num_pad: torch.Tensor | None) -> None:
        self.kv.left_pad(num_pad)
        self.ssm.left_pad(num_pad)

    def keep(self, rows: torch.Tensor) -> None:
        self.kv.keep(rows)
        self.ssm.keep(rows)
        if getattr(self, "ffn_state", None) is not None:
            self.ffn_state = tuple(part[rows] for part in self.ffn_state)

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.ssm.nbytes()


def attention_heads(attn: Attention, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """``Attention.forward`` without its output projection: (b, T, d) -> the heads' outputs (b, T, W)."""
    return attn.heads(x, cache)


class Hymba(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(dataclasses.replace(cfg, attn=dataclasses.replace(cfg.attn, window=cfg.hymba.window)))
        width = self.attn.num_heads * self.attn.head_dim
        self.attn_norm = RMSNorm(width, cfg.norm_eps)  # its weight is beta1
        self.ssm = SSMHeads(cfg, width)  # its gated RMSNorm's weight is beta2

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        self.attn.reset_parameters(std, out_std)  # attn.wo, the one output projection, gets out_std
        self.ssm.reset_parameters(std)
        self.attn_norm.weight.fill_(0.5)
        self.ssm.norm.weight.fill_(0.5)

    def init_cache(self, batch_size: int, max_len: int, device, dtype) -> HymbaCache:
        return HymbaCache(self.attn.init_cache(batch_size, max_len, device, dtype),
                          self.ssm.init_cache(batch_size, max_len, device, dtype))

    def forward(self, x: torch.Tensor, cache: HymbaCache | None = None) -> torch.Tensor:
        a = attention_heads(self.attn, x, None if cache is None else cache.kv)  # (b, T, W)
        s = self.ssm(x, None if cache is None else cache.ssm)  # (b, T, W), normalised and scaled by beta2
        return linear(self.attn_norm(a) + s, self.attn.wo.weight)

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        """Parameters, FLOPs and saved activations per token (``model/cost.py``): both branches, the attention
        branch's norm (beta1) and its normed output."""
        attn = Attention.cost(dataclasses.replace(cfg, attn=dataclasses.replace(cfg.attn, window=cfg.hymba.window)),
                              seq_len)
        width = cfg.attn.num_heads * cfg.head_dim
        return attn + SSMHeads.heads_cost(cfg, width, seq_len) + LayerCost(width, 0, activation_bytes=2 * width)

    @staticmethod
    def state_bytes(cfg: ModelConfig, tokens: int, nbytes: int) -> int:
        """Bytes of ``init_cache`` for one sequence: the KV cache and the SSM heads' recurrent cache."""
        width = cfg.attn.num_heads * cfg.head_dim
        return Attention.state_bytes(cfg, tokens, nbytes) + SSMHeads.heads_state_bytes(cfg, width, nbytes)
