"""``MainConfig``: the main build's recipe, one file for every stage from the budget to the final report.

A main-build recipe is a YAML file with ``kind: main`` at the top; ``slmforge run`` and ``slmforge plan`` read it
through this class (``config.load``, so ``key=value`` overrides and did-you-mean errors work as everywhere).
``base`` is an ordinary run config: the data sources (the synthesizer's output becomes one of them), the curation
switches, the vocabulary, the sequence length and the training defaults every run of the build shares. Each
later section only says what differs for its stage: the proxies' model and steps, the scaling runs' sizes, the
target's size, steps and anneal mix, the post-training stages, the evaluations, and the GPUs the plan prices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from slmforge.config import PostConfig, RunConfig, check_min


@dataclass
class ProxySpec:
    model: dict[str, Any] = field(default_factory=dict)  # model keys of the proxies (over base.model)
    steps: int = 200  # training steps of each proxy
    mixtures: list[list[float]] = field(default_factory=list)  # one weight per base.data.sources entry, >= 3 rows
    target: list[str] = field(default_factory=list)  # sources whose validation loss decides; [] = all
    seeds: int = 1


@dataclass
class ScalingSpec:
    scales: list[dict[str, Any]] = field(default_factory=list)  # model keys per size, >= 4 for a tested law
    steps: int = 300  # every scaling run and the target's forecast run: the same tokens (the fixed subset)
    # Sequences per step of those runs; 0 = base.train.batch_size. Fewer per step and more steps at the same tokens:
    # too few steps leave the larger sizes short of optimisation and bend the curve the law extrapolates.
    batch_size: int = 0
    seeds: int = 1  # the whole ladder and the target's forecast run once per seed
    params: Literal["non_embedding", "total"] = "non_embedding"


@dataclass
class TargetSpec:
    model: dict[str, Any] = field(default_factory=dict)  # model keys of the target (over base.model)
    steps: int = 600  # pre-training steps of the target, its anneal included
    anneal_fraction: float = 0.2  # the last share of the target's tokens: the anneal mix while the WSD decay runs
    anneal_weights: dict[str, float] = field(default_factory=dict)  # source -> weight in the anneal; {} = no anneal
    ablation: bool = True  # also train the target with the anneal's tokens on the chosen mix: the anneal gain


@dataclass
class EvalSpec:
    gsm8k_limit: int = 200  # held-out procedural problems scored per model (0 = all)
    gsm8k_source: str = "math"  # the data source whose test split holds the problems
    max_new_tokens: int = 128
    niah_lengths: list[int] = field(default_factory=lambda: [128, 256])  # [] = no needle test
    niah_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    niah_samples: int = 4  # needles per (length, depth) cell
    niah_kinds: list[str] = field(default_factory=lambda: ["passkey", "kv"])  # one needle each (synth/niah.py)


@dataclass
class GpuPlanSpec:
    gpu: str = "h100"
    gpu_counts: list[int] = field(default_factory=lambda: [1, 8, 64])
    mfu: float = 0.4
    fsdp: bool = True
    micro_batch_size: int = 8
    budget_gpu_hours: float = 0.0  # the stated budget the plan is checked against; 0 = none stated


@dataclass
class MainConfig:
    kind: Literal["main"] = "main"
    name: str = "main"
    out_dir: str = "runs"
    base: RunConfig = field(default_factory=RunConfig)
    synth: dict[str, Any] = field(default_factory=dict)  # synthesizer job keys (synth/jobs.py); {} = no synthesis
    synth_source: str = "synth"  # the base.data.sources entry the synthesizer's kept records fill
    proxy: ProxySpec = field(default_factory=ProxySpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    post: list[PostConfig] = field(default_factory=list)  # SFT, ORPO, ... after the target, each from the one before
    evals: EvalSpec = field(default_factory=EvalSpec)
    plan: GpuPlanSpec = field(default_factory=GpuPlanSpec)

    def validate(self, prefix: str = "") -> None:
        sources = list(self.base.data.sources)
        if not sources:
            raise ValueError(f"{prefix}base.data.sources is empty: the main build mixes named sources")
        if self.synth and self.synth_source not in sources:
            raise ValueError(f"{prefix}synth_source={self.synth_source!r} is not one of base.data.sources {sources}")
        if len(self.proxy.mixtures) < 3:
            raise ValueError(f"{prefix}proxy.mixtures has {len(self.proxy.mixtures)} rows; give at least 3")
        for i, row in enumerate(self.proxy.mixtures):
            if len(row) != len(sources) or min(row) < 0 or sum(row) <= 0:
                raise ValueError(f"{prefix}proxy.mixtures[{i}]={row}: expected {len(sources)} non-negative weights "
                                 f"(one per source: {sources})")
        if len(self.scaling.scales) < 3:
            raise ValueError(f"{prefix}scaling.scales has {len(self.scaling.scales)} sizes; a 3-parameter law needs "
                             f"at least 3 (4 or more to test it)")
        unknown = sorted(set(self.target.anneal_weights) - set(sources))
        if unknown:
            raise ValueError(f"{prefix}target.anneal_weights names {unknown}, not in base.data.sources {sources}")
        if not 0 < self.target.anneal_fraction < 1:
            raise ValueError(f"{prefix}target.anneal_fraction={self.target.anneal_fraction}: expected (0, 1)")
        check_min(self.proxy, f"{prefix}proxy.", 1, "steps seeds")
        check_min(self.scaling, f"{prefix}scaling.", 1, "steps seeds")
        check_min(self.scaling, f"{prefix}scaling.", 0, "batch_size")
        check_min(self.target, f"{prefix}target.", 2, "steps")
        check_min(self.evals, f"{prefix}evals.", 0, "gsm8k_limit niah_samples")
