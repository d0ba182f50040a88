"""Sweeps: run a list of RunConfigs one after another on one shared corpus, tokenizer and set of shards.

``share_data`` builds the data once under ``<sweep_dir>/shared`` and points a base config at it; ``run_sweep``
calls ``pipeline.run`` per config. A run whose ``sweep.json`` exists (written last, with its config) is done and
is only read; a half-finished one resumes from its latest checkpoint (``pipeline.run`` does that). A finished
run whose config differs from the requested one is an error rather than a silent reuse.

Science configs (``MixConfig``, ``ForecastConfig``) hold a ``base`` RunConfig plus their own keys, and load from
YAML with ``key=value`` overrides like every other stage (``config.load``; ``base.preset`` fills ``base.model``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

import slmforge.pipeline as pipeline
from slmforge.checkpoint import load_for_inference
from slmforge.config import RunConfig, merge, to_dict
from slmforge.corpus import shard_dirs
from slmforge.log import log
from slmforge.metrics import batch_losses
from slmforge.runs import RunDir, write_json
from slmforge.tokens.shards import TokenLoader


SHARED = "shared"  # the run folder of a sweep that holds its corpus, tokenizer and shards


def share_data(base: RunConfig, sweep_dir: Path) -> RunConfig:
    """Build corpus, tokenizer and shards once under <sweep_dir>/shared; ``base`` pointing at them."""
    shared = dataclasses.replace(base, name=SHARED, out_dir=str(sweep_dir))
    tokenizer, _ = pipeline.prepare(shared)
    root = shard_dirs(shared)["train"].parent
    return dataclasses.replace(base, data=dataclasses.replace(base.data, tokenizer=str(tokenizer),
                                                              shards_dir=str(root)))


def with_run(base: RunConfig, sweep_dir: Path, name: str, **updates) -> RunConfig:
    """``base`` renamed to run folder <sweep_dir>/<name>, with nested ``updates`` (``model={...}``) merged in."""
    cfg = dataclasses.replace(base, name=name, out_dir=str(sweep_dir))
    return merge(cfg, updates, where=f"run {name}")


@dataclasses.dataclass
class SweepRun:
    cfg: RunConfig
    report: dict  # pipeline.run's report
    eval_losses: dict[str, list[float]]  # per shard folder key: loss of each evaluation batch
    skipped: bool  # finished earlier; read from disk


def run_sweep(configs: list[RunConfig], eval_shards: dict[str, Path] | None = None,
              eval_batches: int = 20) -> list[SweepRun]:
    """Run each config in order (skipping finished ones) and score each on ``eval_shards`` per batch."""
    out = []
    for i, cfg in enumerate(configs):
        folder = RunDir.of(cfg)
        marker = folder.sweep_result
        if marker.exists():
            done = json.loads(marker.read_text())
            if not _same_config(done["config"], cfg):
                raise ValueError(f"{marker}: this folder holds a finished run with a different config; remove "
                                 f"{folder.root} or give the sweep another name")
            log(f"sweep: [{i + 1}/{len(configs)}] {cfg.name}: finished earlier, reusing")
            out.append(SweepRun(cfg, done["report"], done["eval_losses"], skipped=True))
            continue
        log(f"sweep: [{i + 1}/{len(configs)}] {cfg.name}")
        report = pipeline.run(cfg)
        losses = eval_losses(folder.root, eval_shards or {}, cfg.data.seq_len, cfg.train.batch_size, eval_batches)
        write_json(marker, {"config": to_dict(cfg), "report": report, "eval_losses": losses})
        out.append(SweepRun(cfg, report, losses, skipped=False))
    return out


def _same_config(saved: dict, cfg: RunConfig) -> bool:
    """Whether a finished run's saved config is ``cfg``; keys added to RunConfig since then take defaults."""
    try:
        return merge(RunConfig(), saved, where="sweep.json") == cfg
    except ValueError:
        return False


def eval_losses(run_dir: Path, shards: dict[str, Path], seq_len: int, batch_size: int,
                num_batches: int) -> dict[str, list[float]]:
    """Mean loss of each of the first ``num_batches`` unshuffled batches of every shard folder.

    Per-batch values, not one mean, so that fits can bootstrap over the evaluation data.
    """
    if not shards:
        return {}
    model, _, _ = load_for_inference(run_dir)
    out = {}
    for key, folder in shards.items():
        loader = TokenLoader(folder, seq_len, batch_size, shuffle=False)
        out[key] = batch_losses(model, itertools.islice(loader, min(num_batches, len(loader))))
    return out


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
