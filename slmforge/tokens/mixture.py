"""Data mixtures: named token-shard sources, stages with token budgets, and a loader that mixes them by row.

A recipe names its sources (shard folders written by ``tokenize_to_shards``, whatever made the text: files,
procedural generators, a synthesizer) and a list of stages, each with a token budget and a weight per source,
as in SmolLM2's multi-stage training (arXiv:2502.02737). The last stage is typically the anneal mix of
high-quality data, timed to start with the LR decay::

    data:
      mixture:
        seed: 0
        sources:
          - {name: web, shards: runs/corpus/shards/web}
          - {name: math, shards: runs/corpus/shards/math}
        stages:
          - name: stable
            tokens: 80000000
            weights: [{source: web, weight: 0.8}, {source: math, weight: 0.2}]
          - name: anneal
            tokens: 20000000
            weights: [{source: web, weight: 0.4}, {source: math, weight: 0.6}]

A source left out of a stage has weight 0 there; weights are normalised per stage.

Each row (not each batch) is drawn from one source. Every batch is then itself close to the mix, so no
optimizer step sees one source only, and a stage hits its proportions to within about 1.5 rows rather than
a whole batch. The choice is smooth weighted round-robin (nginx's; the largest-deficit rule): row n of a
stage goes to the source with the largest ``(n + 1) * w_s - count_s + offset_s``, where the offsets, drawn
per stage from the mixture seed in [-0.5, 0.5), make the order depend on the seed. Counts then stay within
about 1.5 rows of ``n * w_s`` at every point of the stage, so a stage of 80 rows is within 2% of its weights.
The choice depends only on the counts, which the state keeps: resuming needs no other bookkeeping.

Each source is read through its own ``TokenLoader`` (batch size 1, a seed derived from the mixture seed and
the source name), which shuffles it, counts its epochs and hands ranks disjoint rows. Every rank makes the
same choices, so ranks stay in step. Token counts (budgets, ``stage_at``, ``realised``) are global:
rows x seq_len x world_size.

Shapes: B = batch_size, T = seq_len; the loader yields ``x, y`` of shape (B, T), int64, like ``TokenLoader``.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

# The dataclasses live in config (the ground floor); re-exported here, where they are used.
from slmforge.config import MixtureConfig, Source, SourceWeight, Stage
from slmforge.log import log
from slmforge.tokens.shards import TokenLoader

__all__ = ["MixtureConfig", "MixtureLoader", "Source", "SourceWeight", "Stage"]


class MixtureLoader:
    """Infinite (or, with ``after_last="stop"``, budget-long), seeded, resumable (x, y) batches from a mixture.

    ``state_dict()`` taken after a batch points past it; ``load_state_dict`` continues the same stream. Budgets
    and weights may change between a save and a load (to lengthen a stage, say); source and stage names may not.
    """

    def __init__(self, cfg: MixtureConfig, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 mode: str = "window"):
        cfg.validate()
        self.cfg, self.seq_len, self.batch_size = cfg, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.loaders = []
        for i, source in enumerate(cfg.sources):
            if not Path(source.shards).is_dir():
                raise ValueError(f"mixture.sources[{i}] ({source.name!r}).shards: no folder {source.shards}; "
                                 f"write it with tokenize_to_shards first")
            seed = int(np.random.SeedSequence([cfg.seed, zlib.crc32(source.name.encode())]).generate_state(1)[0])
            self.loaders.append(TokenLoader(source.shards, seq_len, 1, seed=seed, rank=rank,
                                            world_size=world_size, mode=mode))
        self.weights = cfg.normalised_weights()  # (num_stages, num_sources)
        self.offsets = np.stack([np.random.default_rng([cfg.seed, k]).random(len(cfg.sources)) - 0.5
                                 for k in range(len(cfg.stages))])  # (num_stages, num_sources)
        self.counts = np.zeros(self.weights.shape, np.int64)  # rows drawn on this rank per stage and source
        self._warned: set[int] = set()

    @property
    def num_tokens(self) -> int:
        """Tokens drawn so far by all ranks together."""
        return int(self.counts.sum()) * self.seq_len * self.world_size

    @property
    def current_stage(self) -> tuple[int, Stage]:
        """(index, stage) of the next row."""
        return self.cfg.stage_at(self.num_tokens)

    def realised(self) -> dict[str, dict[str, int]]:
        """Tokens drawn so far by all ranks, ``{stage: {source: tokens}}``, every stage and source listed."""
        per_row = self.seq_len * self.world_size
        return {stage.name: {source.name: int(c) * per_row for source, c in zip(self.cfg.sources, row)}
                for stage, row in zip(self.cfg.stages, self.counts)}

    def _choose(self, k: int, counts: np.ndarray) -> int:
        """Smooth weighted round-robin: the source of stage k furthest behind its share of the next row."""
        score = (counts.sum() + 1) * self.weights[k] - counts + self.offsets[k]
        score[self.weights[k] == 0] = -np.inf
        return int(np.argmax(score))

    def _plan(self) -> list[tuple[int, int]] | None:
        """(stage, source) of each row of the next batch, or None when the budget is spent and after_last=stop.

        Chosen on a copy of the counts, so that an exhausted source raises before any state changes.
        """
        first = int(self.counts.sum())
        tokens_per_row = self.seq_len * self.world_size
        if self.cfg.after_last == "stop" and first * tokens_per_row >= self.cfg.total_tokens:
            return None
        counts, plan = self.counts.copy(), []
        for row in range(first, first + self.batch_size):
            k, _ = self.cfg.stage_at(row * tokens_per_row)
            s = self._choose(k, counts[k])
            counts[k, s] += 1
            plan.append((k, s))
        if self.cfg.on_exhausted == "stop":
            for s, loader in enumerate(self.loaders):
                stages = [k for k, source in plan if source == s]
                left = len(loader) - loader.position
                if len(stages) > left:
                    self._raise_exhausted(s, stages[left], left)
        return plan

    def _raise_exhausted(self, s: int, k: int, rows_left: int) -> None:
        source, stage, tokens_per_row = self.cfg.sources[s], self.cfg.stages[k], self.seq_len * self.world_size
        drawn = (int(self.counts[:, s].sum()) + rows_left) * tokens_per_row
        in_stage = (int(self.counts[k, s]) + rows_left) * tokens_per_row
        raise RuntimeError(
            f"mixture source {source.name!r} ran out of data in stage {stage.name!r} after {drawn:,} of its "
            f"tokens ({in_stage:,} in this stage; {self.num_tokens:,} mixture tokens drawn before this batch) "
            f"with on_exhausted='stop': add data to {source.shards}, lower its weight, or set on_exhausted='repeat'")

    def __iter__(self):
        import torch

        while (plan := self._plan()) is not None:
            xs, ys = [], []
            for k, s in plan:
                loader = self.loaders[s]
                if loader.position >= len(loader) and s not in self._warned:
                    self._warned.add(s)
                    # A line, not a warning: a planned repeat (the demo sees its problems 1.7 times) is news,
                    # not a fault, and a warning would print the loop's source line under it.
                    log(f"mixture: source {self.cfg.sources[s].name!r} finished epoch {loader.epoch} in stage "
                        f"{self.cfg.stages[k].name!r}; repeating it from epoch {loader.epoch + 1} "
                        f"(on_exhausted='repeat')")
                # One row: the rest of the source's epoch (or the next epoch), of which we take the first batch.
                x, y = next(loader.iter_epoch_once())
                self.counts[k, s] += 1
                xs.append(x)
                ys.append(y)
            yield torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict[str, Any]:
        stages, sources = self.cfg.stages, self.cfg.sources
        return dict(seed=self.cfg.seed, seq_len=self.seq_len, world_size=self.world_size,
                    rows={stage.name: {source.name: int(c) for source, c in zip(sources, row)}
                          for stage, row in zip(stages, self.counts)},
                    sources={source.name: loader.state_dict() for source, loader in zip(sources, self.loaders)})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in (("seed", self.cfg.seed), ("seq_len", self.seq_len), ("world_size", self.world_size)):
            if state[key] != value:
                raise ValueError(f"mixture loader state has {key}={state[key]!r} but this loader has {value!r}")
        stages, sources = sorted(s.name for s in self.cfg.stages), sorted(s.name for s in self.cfg.sources)
        if sorted(state["rows"]) != stages or sorted(state["sources"]) != sources:
            raise ValueError(f"mixture loader state has stages {sorted(state['rows'])} and sources "
                             f"{sorted(state['sources'])} but the config has stages {stages} and sources {sources}; "
                             f"names must stay the same to resume")
        for k, stage in enumerate(self.cfg.stages):
            for s, source in enumerate(self.cfg.sources):
                self.counts[k, s] = state["rows"][stage.name][source.name]
        for source, loader in zip(self.cfg.sources, self.loaders):
            loader.load_state_dict(state["sources"][source.name])
