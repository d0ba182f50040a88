"""What a training stage trains on (``Task``), pre-training's own task over token shards, and ``train.init_from``.

``loop.train`` steps on a ``Task``: the loader (endless batch tuples with an exact-resume state), the loss with its
step metrics, and the validation. Pre-training builds it from the token shards or the data mixture
(``shards_task``); post-training (``slmforge/post/``) builds SFT, ORPO and DPO tasks and passes them in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from slmforge.checkpoint import find_checkpoint, first_line, load_model_weights
from slmforge.config import RunConfig, TrainConfig
from slmforge.metrics import evaluate_loss
from slmforge.model.lm import LM
from slmforge.runs import RunDir
from slmforge.tokens.mixture import MixtureLoader
from slmforge.tokens.shards import TokenLoader, load_shards, recorded_tokenizer


def default_loss(model, batch) -> torch.Tensor:
    x, y = batch
    return model(x, targets=y)[1]


@dataclass
class Task:
    """What a training stage trains on. Pre-training builds its own from the token shards (``_shards_task``);
    post-training passes one to ``train``."""

    loader: Any  # an endless iterable of batch tuples of tensors, with state_dict / load_state_dict (exact resume)
    val_batches: list  # batch tuples
    loss: Callable  # (model, batch) -> loss, or (loss, {metric: float}) logged with each step
    evaluate: Callable  # (model, val_batches, device) -> {"val_loss": float, more metrics}
    tokenizer: Path | None = None  # copied into the run folder (the one generate, chat, serve and eval load)
    tokens_per_byte: float = float("nan")  # of the validation data, for bits per byte; nan = not reported
    stage: Callable[[], str | None] = lambda: None  # the data stage now trained (a mixture's), for the metrics


def build_train_loader(cfg: RunConfig, rank: int = 0, world_size: int = 1):
    """The mixture loader when the recipe declares stages, else one TokenLoader over <shards_dir>/train."""
    if cfg.data.mixture.stages:
        return MixtureLoader(cfg.data.mixture, cfg.data.seq_len, cfg.train.batch_size, rank, world_size,
                             mode=cfg.data.packing)
    return TokenLoader(RunDir.of(cfg).split_shards("train"), cfg.data.seq_len, cfg.train.batch_size,
                       seed=cfg.data.seed, rank=rank, world_size=world_size, mode=cfg.data.packing)


def reshard_loader_state(state: dict, batch_size: int, world_size: int) -> dict:
    """A TokenLoader state saved at another world size, for this one (the global batch must be equal)."""
    if state.get("world_size", world_size) == world_size or "position" not in state:
        return state
    old_global, new_global = state["batch_size"] * state["world_size"], batch_size * world_size
    if old_global != new_global:
        raise ValueError(f"resuming at world size {world_size}: the global batch was {old_global} sequences, "
                         f"now {new_global}; set train.batch_size={old_global // world_size}")
    # Global batch b went to rank b % world_size, so every rank's position counts global batches.
    return {**state, "batch_size": batch_size, "world_size": world_size}


def shards_task(cfg: RunConfig, run: RunDir, t: TrainConfig, rank: int, world_size: int) -> Task:
    """Pre-training: the token shards (or the mixture) and the validation shards' loss."""
    loader = build_train_loader(cfg, rank, world_size)
    val_dir = run.split_shards("validation")
    val_meta = load_shards(val_dir).meta
    val_batches = list(itertools.islice(TokenLoader(val_dir, cfg.data.seq_len, t.batch_size, shuffle=False),
                                        t.eval_batches))
    stage = (lambda: loader.current_stage[1].name) if cfg.data.mixture.stages else (lambda: None)
    return Task(loader, val_batches, default_loss, lambda model, batches, device: {
                    "val_loss": evaluate_loss(model, batches, device)},
                tokenizer=_shards_tokenizer(cfg, run), stage=stage,
                tokens_per_byte=val_meta["num_tokens"] / max(val_meta["num_bytes"], 1))


def init_checkpoint(source: str) -> Path:
    """``train.init_from``: a run folder (its newest valid checkpoint) or a checkpoint folder, checked now."""
    try:
        return find_checkpoint(source)[1]
    except (ValueError, OSError) as exc:
        raise ValueError(f"train.init_from={source}: {first_line(exc)}") from None


# Parts a model may add to the run it starts from (train.init_from); they keep their initialisation: the vision
# projector of a model that learns to read images (slmforge/post/vision.py).
FRESH_PARTS = ("projector.",)


def load_init(model: LM, ckpt: Path, source: str) -> None:
    """Weights only (a fresh optimizer and schedule follow); a model of another shape is a one-line error."""
    try:
        load_model_weights(model, ckpt, fresh=FRESH_PARTS)
    except RuntimeError as exc:  # load_state_dict's size mismatch or missing keys
        raise ValueError(f"train.init_from={source}: its weights do not fit this model ({first_line(exc)}); "
                         f"use the model config of {source}/config.yaml") from None



def _shards_tokenizer(cfg: RunConfig, run: RunDir) -> Path | None:
    """Trained from given shards (data.shards_dir, no data.tokenizer): the tokenizer they were made with, which is
    copied into the run folder so that generate, chat, serve, export and eval find it there."""
    if not cfg.data.shards_dir or cfg.data.tokenizer:
        return None
    return recorded_tokenizer(train_shards(cfg, run)[0])


def train_shards(cfg: RunConfig, run: RunDir) -> list:
    mix = cfg.data.mixture
    return [s.shards for s in mix.sources] if mix.stages else [run.split_shards("train")]


def freeze(model: LM, trainable: str) -> None:
    """``train.trainable``: only parameters whose names start with one of its comma-separated prefixes train (the
    optimizer skips the others, so they stay bit-identical); empty: every parameter trains."""
    prefixes = tuple(p.strip() for p in trainable.split(",") if p.strip())
    if not prefixes:
        return
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise ValueError(f"train.trainable={trainable}: no parameter starts with {prefix!r}; the model's parts: "
                             f"{', '.join(tops)}")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
