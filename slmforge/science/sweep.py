"""Sweeps: run a list of RunConfigs one after another on one shared corpus, tokenizer and set of shards.

``share_data`` builds the data once under ``<sweep_dir>/shared`` and points a base config at it; ``run_sweep``
calls ``pipeline.run`` per config. A run whose ``sweep.json`` exists (written last, with its config) is done and
is only read; a half-finished one resumes from its latest checkpoint (``pipeline.run`` does that). A finished
run whose config differs from the requested one is an error rather than a silent reuse.

Science configs (``MixConfig``, ``ForecastConfig``) hold a ``base`` RunConfig plus their own keys, and load from
YAML with ``key=value`` overrides like every other stage (``load_config``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np

from slmforge.config import RunConfig, merge, parse_overrides, preset, read_yaml, to_dict
from slmforge.runs import write_json


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """A science config dataclass from YAML and ``key=value`` overrides (``base.train.max_steps=50``).

    ``base.preset`` fills ``base.model`` before the recipe's own model keys, as ``slmforge.config`` does for runs.
    """
    raw = read_yaml(path)
    over = parse_overrides(overrides or [])
    cfg = cls()
    name = over.get("base", {}).get("preset", raw.get("base", {}).get("preset", ""))
    if name:
        cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base, preset=str(name), model=preset(str(name))))
    cfg = merge(cfg, raw, where=str(path) if path else "config")
    return merge(cfg, over, where="override")


def share_data(base: RunConfig, sweep_dir: Path) -> RunConfig:
    """Build corpus, tokenizer and shards once under <sweep_dir>/shared; ``base`` pointing at them."""
    from slmforge.pipeline import prepare, shard_dirs

    shared = dataclasses.replace(base, name="shared", out_dir=str(sweep_dir))
    tokenizer, _ = prepare(shared)
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
    from slmforge.pipeline import _log, run

    out = []
    for i, cfg in enumerate(configs):
        marker = cfg.run_dir / "sweep.json"
        if marker.exists():
            done = json.loads(marker.read_text())
            if not _same_config(done["config"], cfg):
                raise ValueError(f"{marker}: this folder holds a finished run with a different config; remove "
                                 f"{cfg.run_dir} or give the sweep another name")
            _log(f"sweep: [{i + 1}/{len(configs)}] {cfg.name}: finished earlier, reusing")
            out.append(SweepRun(cfg, done["report"], done["eval_losses"], skipped=True))
            continue
        _log(f"sweep: [{i + 1}/{len(configs)}] {cfg.name}")
        report = run(cfg)
        losses = eval_losses(cfg.run_dir, eval_shards or {}, cfg.data.seq_len, cfg.train.batch_size, eval_batches)
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
    import torch

    from slmforge.tokens.shards import TokenLoader
    from slmforge.train.checkpoint import load_for_inference

    if not shards:
        return {}
    model, _, _ = load_for_inference(run_dir)
    model.eval()
    out = {}
    with torch.no_grad():
        for key, folder in shards.items():
            loader = TokenLoader(folder, seq_len, batch_size, shuffle=False)
            batches = itertools.islice(loader, min(num_batches, len(loader)))
            out[key] = [model(x, targets=y)[1].item() for x, y in batches]
    return out


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
