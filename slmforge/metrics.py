"""Numbers that training, the pipeline report and the science sweeps compute the same way.

Mean loss over a list of batches (nats/token), bits per byte (comparable across tokenizers: Gao et al. 2020,
The Pile, arXiv 2101.00027) and tokens per optimizer step. Below ``train/`` so that evaluation and science code
need no training import.
"""

from __future__ import annotations

import math

import torch

from slmforge.config import RunConfig


@torch.no_grad()
def batch_losses(model, batches, device: torch.device | str = "cpu") -> list[float]:
    """The model's mean loss on each ``(x, y)`` batch, in eval mode; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    out = [model(x.to(device), targets=y.to(device))[1].item() for x, y in batches]
    model.train(was_training)
    return out


def evaluate_loss(model, batches, device: torch.device | str = "cpu") -> float:
    """Mean loss over ``batches`` (nats/token); 0.0 for no batches. Wrap in autocast for mixed precision."""
    total, count = 0.0, 0
    # Summed in order (not math.fsum), so values match the loop's earlier inline evaluation bit for bit.
    for loss in batch_losses(model, batches, device):
        total += loss
        count += 1
    return total / max(count, 1)


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """nats/token * tokens/byte / ln 2."""
    return loss * tokens_per_byte / math.log(2)


def tokens_per_step(cfg: RunConfig, world_size: int = 1) -> int:
    """Tokens in one optimizer step: batch x accumulation x sequence length x ranks."""
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len * world_size
