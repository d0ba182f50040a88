"""The checkpoint format, and loading a trained model for inference.

A checkpoint is a folder ``<run>/checkpoints/step_000100/`` holding ``model.safetensors`` (the weights, keyed by
parameter name, the tied head stored once under the embedding's name) and ``state.pt`` (everything else: step,
optimizer, RNG and data-loader state, or where an import came from). The folder is written under a temporary
name and renamed when complete, so a crash never leaves a half-written checkpoint; ``checkpoints/latest`` names
the newest, and only the newest ``keep`` are kept.

This module sits below ``train/``, ``serve/`` and ``eval/``: training gathers its state and calls
``write_checkpoint``; inference calls ``load_for_inference`` and never imports training code. Every byte of a
checkpoint folder is written and read here, so a change of format (a manifest, a pickle-free state file, another
rotation rule) is made in this file alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from slmforge.config import RunConfig, load_config
from slmforge.model.lm import LM
from slmforge.runs import RunDir, atomic_path, write_text
from slmforge.tokens.shards import recorded_tokenizer
from slmforge.tokens.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
STATE = "state.pt"
LATEST = "latest"
# A tied head is the embedding: stored once, under the embedding's name, and restored on load.
HEAD, EMBEDDING = "head.weight", "tok_emb.weight"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def save_weights(weights: dict[str, torch.Tensor], path: str | Path, tied: bool = False) -> None:
    """A full state dict as a safetensors file; ``tied``: the head is the embedding and is left out."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items() if not (k == HEAD and tied)}
    with atomic_path(path) as tmp:  # safetensors writes mode 0600; atomic_path gives the umask's mode
        safetensors.torch.save_file(tensors, str(tmp))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into ``model``; any name that does not match is a one-line error."""
    missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    missing = [m for m in missing if not (m == HEAD and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def write_checkpoint(ckpt_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                     keep: int = 2, tied: bool = False) -> Path:
    """Write ``<ckpt_dir>/step_NNNNNN/`` atomically, point ``latest`` at it and keep the newest ``keep``.

    ``weights``: a full (unsharded) state dict; ``tied``: the model ties its head to the embedding, so the head
    is left out. ``keep=0`` removes nothing. Returns the checkpoint folder.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(weights, tmp / WEIGHTS, tied)
    torch.save(state, tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    write_text(ckpt_dir / LATEST, final.name + "\n")
    _rotate(ckpt_dir, keep)
    return final


def _rotate(ckpt_dir: Path, keep: int) -> None:
    # Name order is step order while steps have at most six digits.
    for old in sorted(ckpt_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint folder ``latest`` names, or None when there is none (or it is incomplete)."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(ckpt_dir) / pointer.read_text().strip()
    return path if (path / STATE).exists() else None


def read_state(path: str | Path) -> dict:
    """The non-weight state of the checkpoint folder ``path`` (step, optimizer, RNG, loader, ...)."""
    # weights_only=False: the state holds Python and NumPy RNG states, which the safe unpickler refuses.
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)


def read_checkpoint(path: str | Path, tied: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, state) of the checkpoint folder ``path``; ``tied`` puts the embedding back as the head."""
    path = Path(path)
    state = read_state(path)
    weights = safetensors.torch.load_file(str(path / WEIGHTS))
    if tied:
        weights[HEAD] = weights[EMBEDDING]
    return weights, state


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """The weights of the checkpoint folder ``path`` into ``model`` (checked by name)."""
    load_weights(model, Path(path) / WEIGHTS)


def find_checkpoint(path: str | Path) -> tuple[RunDir, Path]:
    """A run folder or one of its checkpoint folders -> (the run folder, the checkpoint to load)."""
    path = Path(path)
    if (path / WEIGHTS).exists():
        return RunDir.at(path.parent.parent), path
    if not path.is_dir():
        raise ValueError(f"{path}: no such run folder; give one made by `slmforge train` or `slmforge run` "
                         f"(runs/<name>)")
    run = RunDir.at(path)
    ckpt = latest_checkpoint(run.checkpoints)
    if ckpt is None:
        raise ValueError(f"{path}: no checkpoint found (expected {run.checkpoints / LATEST}): not a run folder, or "
                         f"its training has not saved one yet (every train.ckpt_every steps, and at the end)")
    return run, ckpt


def find_tokenizer(run: RunDir, cfg: RunConfig) -> Path:
    """The run's tokenizer: data.tokenizer when its config names one, else <run>/tokenizer.json, else the one its
    shards record (data.shards_dir; runs trained before `slmforge train` copied it into the run folder)."""
    candidates = [Path(p) for p in (cfg.data.tokenizer, run.tokenizer) if p]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and cfg.data.shards_dir:
        try:
            found = recorded_tokenizer(RunDir.at(run.root, shards=cfg.data.shards_dir).split_shards("train"))
        except ValueError:
            pass
    if found is None:
        raise ValueError(f"{run.root}: no tokenizer (looked for {' and '.join(map(str, candidates))}); copy the "
                         f"tokenizer.json this run was trained with to {run.tokenizer}")
    return found


def load_for_inference(path: str | Path, device: str = "cpu") -> tuple[LM, Tokenizer, RunConfig]:
    """A run folder or a checkpoint folder -> (model in eval mode, tokenizer, RunConfig)."""
    run, ckpt = find_checkpoint(path)
    if not run.config.exists():
        raise ValueError(f"{run.root}: no config.yaml, so this is not a run folder; give one made by "
                         f"`slmforge train` or `slmforge run` (runs/<name>)")
    cfg = load_config(run.config)
    tokenizer = Tokenizer.load(find_tokenizer(run, cfg))
    model = LM(cfg.model)
    load_model_weights(model, ckpt)
    return model.to(device).eval(), tokenizer, cfg
