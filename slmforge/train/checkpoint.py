"""Checkpoints: weights in safetensors, plus optimizer, step, data-loader and RNG state.

Each checkpoint is a folder ``step_000100/`` written under a temporary name and renamed when
complete, so a crash never leaves a half-written checkpoint; ``latest`` names the newest.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from slmforge.runs import write_text


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


def save_weights(model: nn.Module, path: str | Path) -> None:
    # save_model drops the duplicate name of tied tensors, which safetensors cannot store twice.
    safetensors.torch.save_model(model, str(path))


def load_weights(model: nn.Module, path: str | Path) -> None:
    missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    # The tied head is stored once, under the embedding's name.
    missing = [m for m in missing if not (m == "head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def save_checkpoint(ckpt_dir: str | Path, step: int, model: nn.Module, optimizer, extra: dict, keep: int = 2,
                    info=None) -> Path:
    """Write ``step_NNNNNN/`` atomically. Collective under torchrun: every rank calls it, rank 0 writes.

    The state is gathered unsharded and keyed by parameter names, so a checkpoint written at one world
    size (DDP, FSDP2 or a single process) loads at any other.
    """
    from slmforge.train.distributed import DistInfo, barrier, full_state

    info = info or DistInfo()
    model_state, optim_state = full_state(model, optimizer, info)
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:06d}"
    if info.is_main:
        tmp = ckpt_dir / f".tmp_step_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # safetensors stores a tensor once: the tied head is the embedding, restored on load.
        weights = {k: v.detach().cpu().contiguous() for k, v in model_state.items()
                   if not (k == "head.weight" and _tied(model))}
        safetensors.torch.save_file(weights, str(tmp / "model.safetensors"))
        torch.save({"step": step, "optimizer": optim_state, "rng": rng_state(), **extra}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_text(ckpt_dir / "latest", final.name + "\n")
        for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def _tied(model: nn.Module) -> bool:
    from slmforge.train.distributed import unwrap

    return unwrap(model).cfg.tie_embeddings


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, info=None) -> dict:
    """Load weights (and optimizer + RNG when given an optimizer); return the saved state dict.

    Works at any world size; under torchrun every rank calls it.
    """
    from slmforge.train.distributed import DistInfo, load_full_state

    path = Path(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if optimizer is None:
        load_weights(model, path / "model.safetensors")
        return state
    weights = safetensors.torch.load_file(str(path / "model.safetensors"))
    if _tied(model):
        weights["head.weight"] = weights["tok_emb.weight"]
    load_full_state(model, optimizer, weights, state["optimizer"], info or DistInfo())
    set_rng_state(state["rng"])
    return state


def load_for_inference(path: str | Path, device: str = "cpu"):
    """A run folder or a checkpoint folder -> (model in eval mode, tokenizer, RunConfig)."""
    from slmforge.config import load_config
    from slmforge.tokens.tokenizer import Tokenizer
    from slmforge.model.lm import LM

    path = Path(path)
    if (path / "model.safetensors").exists():
        ckpt, run_dir = path, path.parent.parent
    else:
        run_dir, ckpt = path, latest_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise ValueError(f"{path}: no checkpoint found (expected {path}/checkpoints/latest)")
    if not (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir}: no config.yaml; pass a run folder made by `slmforge train`")
    cfg = load_config(run_dir / "config.yaml")
    model = LM(cfg.model)
    load_weights(model, ckpt / "model.safetensors")
    tok_path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else run_dir / "tokenizer.json"
    return model.to(device).eval(), Tokenizer.load(tok_path), cfg
