"""AdamW with parameter groups: weight decay on matrices, none on norms, biases and embeddings."""

from __future__ import annotations

import torch
from torch import nn

from slmforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    # Embeddings include Engram's hashed tables (model/engram.py): decay would wear down rows that are simply rare.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # Decaying embeddings (tied or not) and 1-D gains/biases only hurts small LMs.
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # The fused kernel exists for CPU and CUDA and is the fastest; it is numerically the same update.
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr_peak, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True
    )
