"""Training checkpoints: the model and optimizer state gathered across ranks, plus RNG state, for exact resume.

The folder format (``step_000100/``, its manifest, ``latest``, rotation) is ``slmforge.checkpoint``'s; this module
adds only what needs training: the optimizer, the RNG streams and ``torch.distributed`` (through
``train/distributed``). Everything is stored without pickle: the RNG streams are tensors (torch, CUDA) and plain
lists and numbers (Python's ``random`` state, NumPy's MT19937 key and position), read back bit for bit.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slmforge.checkpoint import (checkpoint_name, load_model_weights, read_checkpoint, read_state,
                                 verify_checkpoint, write_checkpoint)
from slmforge.train.distributed import DistInfo, barrier, full_state, load_full_state, unwrap


def rng_state() -> dict:
    """Every RNG stream training draws from, as tensors, lists and numbers (no pickle needed to store it)."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
             "numpy": {"bit_generator": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``'s streams; also the tuples a format-1 checkpoint (state.pt) holds."""
    torch.set_rng_state(state["torch"])
    py, npy = state["python"], state["numpy"]
    random.setstate(py if isinstance(py, tuple) else (py["version"], tuple(py["internal"]), py["gauss_next"]))
    if isinstance(npy, dict):
        npy = (npy["bit_generator"], np.array(npy["key"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


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
    """Verify the checkpoint, load weights (and optimizer + RNG when given an optimizer); return the saved state.

    Works at any world size; under torchrun every rank calls it. A damaged checkpoint is a one-line ValueError.
    """
    verify_checkpoint(path)
    if optimizer is None:
        load_model_weights(model, path, verify=False)
        return read_state(path, verify=False)
    weights, state = read_checkpoint(path, tied=unwrap(model).cfg.tie_embeddings, verify=False)
    load_full_state(model, optimizer, weights, state["optimizer"], info or DistInfo())
    set_rng_state(state["rng"])
    return state
