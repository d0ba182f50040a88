"""Learning-rate schedules as pure functions of the step.

WSD (warmup-stable-decay): Hu et al. 2024, MiniCPM (arXiv 2404.06395); Hägele et al. 2024
(arXiv 2405.18392) for the ``1 - sqrt`` decay shape. Cosine: Loshchilov & Hutter 2016.
"""

from __future__ import annotations

import math
from dataclasses import replace

from slmforge.config import RunConfig, TrainConfig
from slmforge.metrics import tokens_per_step
from slmforge.registry import lookup


def _decay_linear(p: float) -> float:
    return 1.0 - p


def _decay_sqrt(p: float) -> float:
    return 1.0 - math.sqrt(p)


def _decay_cosine(p: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * p))


# Each maps decay progress p in [0, 1] to a factor going from 1 to 0.
DECAY_SHAPES = {"linear": _decay_linear, "sqrt": _decay_sqrt, "cosine": _decay_cosine}


def wsd(step: int, cfg: TrainConfig) -> float:
    peak, floor = cfg.lr_peak, cfg.lr_peak * cfg.lr_min_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    decay_steps = round(cfg.decay_fraction * cfg.max_steps)
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return peak
    p = min(1.0, (step - decay_start + 1) / decay_steps)
    return floor + (peak - floor) * lookup(DECAY_SHAPES, cfg.decay_shape, "decay shape")(p)


def cosine(step: int, cfg: TrainConfig) -> float:
    peak, floor = cfg.lr_peak, cfg.lr_peak * cfg.lr_min_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps + 1) / span)
    return floor + (peak - floor) * _decay_cosine(p)


SCHEDULES = {"wsd": wsd, "cosine": cosine}


def stage_budgets(cfg: RunConfig, world_size: int = 1) -> RunConfig:
    """``cfg`` with its mixture stages given as fractions of the run turned into token budgets
    (``MixtureConfig.budgeted`` of ``train.max_steps x tokens per step``)."""
    mix = cfg.data.mixture.budgeted(cfg.train.max_steps * tokens_per_step(cfg, world_size))
    return cfg if mix is cfg.data.mixture else replace(cfg, data=replace(cfg.data, mixture=mix))


def anneal_aligned(cfg: RunConfig, world_size: int = 1) -> TrainConfig:
    """``cfg.train`` with the WSD decay starting at the first step of mixture stage ``train.anneal_stage``.

    That step is the first made only of the stage's rows, ``ceil(tokens before the stage / tokens per step)``;
    the decay then runs to ``max_steps``. Without ``anneal_stage`` the config is returned unchanged.
    """
    t = cfg.train
    if not t.anneal_stage:
        return t
    stages = cfg.data.mixture.stages
    names = [stage.name for stage in stages]
    if t.schedule != "wsd":
        raise ValueError(f"train.anneal_stage={t.anneal_stage!r} needs train.schedule=wsd, not {t.schedule!r}")
    if t.anneal_stage not in names:
        raise ValueError(f"train.anneal_stage={t.anneal_stage!r}: no such data.mixture stage; stages: {names}")
    before = sum(stage.tokens for stage in stages[: names.index(t.anneal_stage)])
    start = -(-before // tokens_per_step(cfg, world_size))
    if not t.warmup_steps <= start < t.max_steps:
        raise ValueError(f"train.anneal_stage={t.anneal_stage!r} starts at step {start}, outside the "
                         f"stable phase [{t.warmup_steps}, {t.max_steps}) (train.warmup_steps, train.max_steps)")
    return replace(t, decay_fraction=(t.max_steps - start) / t.max_steps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based); the last step reaches the floor."""
    return lookup(SCHEDULES, cfg.schedule, "schedule (train.schedule)")(step, cfg)
