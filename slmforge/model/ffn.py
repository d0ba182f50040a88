"""Feed-forward networks. Each returns ``(y, aux_loss)`` so that MoE can add a balance loss.

SwiGLU: Shazeer 2020 (arXiv 2002.05202). Shapes: B batch, T time, C d_model, F hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cost import LayerCost
from slmforge.model.layers import init_linear, linear


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = cfg.ffn_dim
        # w1 (gate) and w3 (up) fused into one matmul; rows [0, F) are w1, [F, 2F) are w3.
        self.w13 = nn.Linear(cfg.d_model, 2 * self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, cfg.d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        init_linear(self.w13, std)
        init_linear(self.w2, out_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        gate, up = linear(x, self.w13.weight).chunk(2, dim=-1)  # (B, T, F) each
        return linear(F.silu(gate) * up, self.w2.weight), 0.0

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        """Parameters, FLOPs and saved activations per token (``model/cost.py``); the same at every length."""
        h, f = cfg.d_model, cfg.ffn_dim
        params = 3 * h * f  # w1, w3 (h -> f), w2 (f -> h)
        # Saved: the normed input, w1 and w3 outputs, silu(w1 x) and the product (w2's input).
        return LayerCost(params, params, activation_bytes=2 * (h + 4 * f))
