"""Training checkpoints: the model and optimizer state gathered across ranks, plus RNG state, for exact resume.

The folder format (``step_000100/``, ``latest``, rotation) is ``slmforge.checkpoint``'s; this module adds only
what needs training: the optimizer, the RNG streams and ``torch.distributed`` (through ``train/distributed``).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slmforge.checkpoint import checkpoint_name, load_model_weights, read_checkpoint, read_state, write_checkpoint
from slmforge.train.distributed import DistInfo, barrier, full_state, load_full_state, unwrap


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: str | Path, step: int, model: nn.Module, optimizer, extra: dict, keep: int = 2,
                    info: DistInfo | None = None) -> Path:
    """Write ``step_NNNNNN/`` atomically. Collective under torchrun: every rank calls it, rank 0 writes.

    The state is gathered unsharded and keyed by parameter names, so a checkpoint written at one world
    size (DDP, FSDP2 or a single process) loads at any other.
    """
    info = info or DistInfo()
    model_state, optim_state = full_state(model, optimizer, info)
    if info.is_main:
        state = {"step": step, "optimizer": optim_state, "rng": rng_state(), **extra}
        write_checkpoint(ckpt_dir, step, model_state, state, keep, tied=unwrap(model).cfg.tie_embeddings)
    barrier(info)
    return Path(ckpt_dir) / checkpoint_name(step)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, info: DistInfo | None = None) -> dict:
    """Load weights (and optimizer + RNG when given an optimizer); return the saved state dict.

    Works at any world size; under torchrun every rank calls it.
    """
    if optimizer is None:
        state = read_state(path)
        load_model_weights(model, path)
        return state
    weights, state = read_checkpoint(path, tied=unwrap(model).cfg.tie_embeddings)
    load_full_state(model, optimizer, weights, state["optimizer"], info or DistInfo())
    set_rng_state(state["rng"])
    return state
