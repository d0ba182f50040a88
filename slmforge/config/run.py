"""Run configuration: data (with the multi-stage mixture), training, curation, and the RunConfig that holds them.

``load_config(path, overrides)`` is ``load(RunConfig, path, overrides)``: defaults < ``preset`` < YAML recipe <
``key=value`` overrides. The mixture dataclasses live here rather than in ``tokens/mixture.py`` (which re-exports
them) so that config imports nothing above it.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slmforge.config.loading import check_choice, check_min, choice_error, load, merge
from slmforge.config.model import ModelConfig, preset
from slmforge.config.post import PostConfig
from slmforge.registry import lookup

# How plain-text files (.txt/.md) split into documents: one per file, per blank-line-separated block, per line,
# or in chunks of about data.chunk_chars characters cut at whitespace (curate/text_split.py).
TextSplit = Literal["file", "blank_line", "line", "chunk"]


# ---------------------------------------------------------------- data mixture (slmforge/tokens/mixture.py)


@dataclass
class Source:
    name: str = ""
    shards: str = ""  # token-shard folder written by tokenize_to_shards


@dataclass
class SourceWeight:
    source: str = ""
    weight: float = 0.0


@dataclass
class Stage:
    name: str = ""
    tokens: int = 0  # budget: training tokens of all ranks together spent in this stage
    weights: list[SourceWeight] = field(default_factory=list)  # sources left out get weight 0
    # Or the budget as a share of the run (train.max_steps x tokens per step), turned into tokens when training
    # starts: a recipe whose stages are fractions stays aligned when train.max_steps or the batch changes.
    fraction: float = 0.0

    def __post_init__(self):
        self.weights = [_as(SourceWeight, w, f"stage {self.name!r}.weights[{i}]") for i, w in enumerate(self.weights)]


@dataclass
class MixtureConfig:
    """Named token-shard sources and stages with token budgets; ``tokens/mixture.py`` explains the sampling."""

    sources: list[Source] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)  # empty = no mixture
    # A source at the end of an epoch: repeat it (a log line says so, once), or stop.
    on_exhausted: Literal["repeat", "stop"] = "repeat"
    after_last: Literal["continue", "stop"] = "continue"  # after the last budget: continue the last stage, or stop
    seed: int = 0

    def __post_init__(self):
        self.sources = [_as(Source, s, f"mixture.sources[{i}]") for i, s in enumerate(self.sources)]
        self.stages = [_as(Stage, s, f"mixture.stages[{i}]") for i, s in enumerate(self.stages)]

    @property
    def total_tokens(self) -> int:
        return sum(stage.tokens for stage in self.stages)

    def budgeted(self, run_tokens: int) -> "MixtureConfig":
        """Stages given as a ``fraction`` of the run turned into token budgets, ``round(fraction x run_tokens)``;
        stages given in tokens are kept, and a malformed stage is left for ``validate`` to name."""
        stages = [dataclasses.replace(stage, tokens=max(1, round(stage.fraction * run_tokens)), fraction=0.0)
                  if 0 < stage.fraction <= 1 and not stage.tokens else stage for stage in self.stages]
        return self if stages == self.stages else dataclasses.replace(self, stages=stages)

    def stage_at(self, tokens_seen: int) -> tuple[int, Stage]:
        """(index, stage) that the token after ``tokens_seen`` global tokens belongs to; the last stage past the end."""
        ends = np.cumsum([stage.tokens for stage in self.stages])
        index = min(bisect.bisect_right(ends, tokens_seen), len(self.stages) - 1)
        return index, self.stages[index]

    def normalised_weights(self) -> np.ndarray:
        """(num_stages, num_sources) weights, each row summing to 1, sources in ``self.sources`` order."""
        column = {source.name: i for i, source in enumerate(self.sources)}
        table = np.zeros((len(self.stages), len(self.sources)))
        for k, stage in enumerate(self.stages):
            for w in stage.weights:
                table[k, column[w.source]] = w.weight
        return table / table.sum(axis=1, keepdims=True)

    def validate(self, prefix: str = "mixture.") -> None:
        """Raise a ValueError naming the key for any mistake that does not need the shard folders to see.

        Run by the loader, not by ``load``: a recipe may leave the sources to ``data.sources`` (pipeline fills them).
        """
        check_choice(f"{prefix}on_exhausted", self.on_exhausted, ("repeat", "stop"))
        check_choice(f"{prefix}after_last", self.after_last, ("continue", "stop"))
        if not self.sources:
            raise ValueError(f"{prefix}sources is empty: list the token-shard folders to mix (name, shards)")
        if not self.stages:
            raise ValueError(f"{prefix}stages is empty: a mixture needs at least one stage (name, tokens, weights)")
        names = [source.name for source in self.sources]
        for i, source in enumerate(self.sources):
            if not source.name or not source.shards:
                raise ValueError(f"{prefix}sources[{i}]: needs a name and a shards folder, got {source}")
            if names.index(source.name) != i:
                raise ValueError(f"{prefix}sources[{i}]: source name {source.name!r} is used twice")
        stage_names = [stage.name for stage in self.stages]
        for k, stage in enumerate(self.stages):
            key = f"{prefix}stages[{k}] ({stage.name!r})"
            if not stage.name or stage_names.index(stage.name) != k:
                raise ValueError(f"{key}: stages need distinct, non-empty names")
            if stage.fraction and stage.tokens:
                raise ValueError(f"{key}: give tokens or fraction, not both")
            if stage.fraction and not 0 < stage.fraction <= 1:
                raise ValueError(f"{key}.fraction={stage.fraction}: expected a share of the run in (0, 1]")
            if stage.tokens <= 0 and not stage.fraction:
                raise ValueError(f"{key}.tokens={stage.tokens}: expected a positive token budget (or a fraction)")
            self._check_weights(key, stage, names)

    @staticmethod
    def _check_weights(key: str, stage: Stage, names: list[str]) -> None:
        seen = set()
        for w in stage.weights:
            try:
                lookup(dict.fromkeys(names), w.source, "source")
            except ValueError as exc:
                raise ValueError(f"{key}.weights: {exc}") from None
            if w.source in seen:
                raise ValueError(f"{key}.weights: source {w.source!r} is listed twice")
            seen.add(w.source)
            if not w.weight >= 0:
                raise ValueError(f"{key}.weights: source {w.source!r} has weight {w.weight}; expected >= 0")
        if sum(w.weight for w in stage.weights) <= 0:
            raise ValueError(f"{key}.weights sum to 0: give at least one source a positive weight")


def _as(cls, value, where: str):
    """A dataclass from a YAML mapping (``merge`` builds list items itself; this covers direct construction)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        keys = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"{where}: expected a mapping with keys {keys}, got {value!r}")
    return merge(cls(), value, where)


# ---------------------------------------------------------------- data, train, run


@dataclass
class DataConfig:
    # "procedural" builds the embedded corpus (no teacher, no internet); "files" reads `paths`.
    source: Literal["procedural", "files"] = "procedural"
    paths: list[str] = field(default_factory=list)  # text/JSONL/Parquet files or globs (source=files)
    # source=files held-out splits: the files listed in val_paths/test_paths (never trained on, even when `paths`
    # matches them too), else the documents of `paths` whose text hashes below val_fraction (validation) or in
    # the next test_fraction (test). An empty test split is skipped by the evaluation with a note.
    val_paths: list[str] = field(default_factory=list)  # held-out validation files (source=files); [] = val_fraction
    test_paths: list[str] = field(default_factory=list)  # held-out test files (source=files); [] = test_fraction
    val_fraction: float = 0.02  # share of the documents of `paths` held out for validation, by a hash of the text
    test_fraction: float = 0.0  # the same for the test split; 0 = no test split (the report says so)
    text_field: str = "text"  # JSONL/Parquet column holding the text
    # Plain-text files (.txt/.md): a book becomes many documents with "chunk".
    text_split: TextSplit = "chunk"  # plain text: one document per file, blank_line-separated block, line, or chunk
    chunk_chars: int = 2000  # text_split=chunk: at most this many characters, cut at a blank line, line end or space
    num_train_docs: int = 20000  # procedural corpus size per split
    num_val_docs: int = 500
    num_test_docs: int = 500
    families: list[str] = field(default_factory=lambda: ["arithmetic", "narrative", "facts", "sorting"])
    seq_len: int = 256
    packing: Literal["window", "documents"] = "window"  # "window": fixed-length windows of the token stream; "documents": packed docs
    num_workers: int = 2  # processes for tokenization
    tokenizer: str = ""  # tokenizer.json; "" = <run_dir>/tokenizer.json (trained by `slmforge run`)
    split_digits: bool = True  # a tokenizer trained by `slmforge run` makes every digit its own token (Llama, SmolLM2)
    shards_dir: str = ""  # holds train/ and validation/ token shards; "" = <run_dir>/shards
    # Multi-stage data mixture over token-shard sources (slmforge/tokens/mixture.py); no stages = train on
    # <shards_dir>/train. Validation always uses <shards_dir>/validation.
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    # Named corpora built side by side (one shared tokenizer, shards in <shards_dir>/<name>/), each a mapping of
    # the data keys above that differ from the top-level ones, e.g. {math: {families: [arithmetic]},
    # wiki: {source: files, paths: [...]}}. Mixture sources with no shards folder read <shards_dir>/<name>/train.
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 1234

    def validate(self, prefix: str = "data.") -> None:
        """Numbers that would fail later, and each ``sources`` entry read as data keys (typos show now, not mid-run).

        The mixture is checked by its loader: its sources may be filled in from ``data.sources`` first."""
        check_min(self, prefix, 1, "seq_len chunk_chars")
        check_min(self, prefix, 0, "num_train_docs num_val_docs num_test_docs num_workers")
        for key in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{prefix}{key}={getattr(self, key)}: expected a fraction in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"{prefix}val_fraction + {prefix}test_fraction = {self.val_fraction + self.test_fraction}"
                             f": nothing would be left to train on; expected a sum below 1")
        for name, keys in self.sources.items():
            if not isinstance(keys, dict):
                raise ValueError(f"{prefix}sources.{name}: expected a mapping of data keys, got {keys!r}")
            entry = merge(dataclasses.replace(self, sources={}), keys, f"{prefix}sources.{name}")
            entry.validate(f"{prefix}sources.{name}.")


@dataclass
class TrainConfig:
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 300
    lr_peak: float = 3e-3
    lr_min_ratio: float = 0.1  # final lr = lr_peak * lr_min_ratio
    warmup_steps: int = 30
    schedule: Literal["wsd", "cosine"] = "wsd"
    decay_fraction: float = 0.2  # WSD: fraction of steps spent decaying
    decay_shape: Literal["linear", "sqrt", "cosine"] = "sqrt"  # WSD decay; sqrt is 1 - sqrt
    # WSD: name of a data.mixture stage; the decay starts with it (replacing decay_fraction) and ends at max_steps.
    anneal_stage: str = ""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (bf16 there warns if emulated)
    device: str = "auto"  # auto, cpu, cuda or cuda:<index> (checked by validate: the index is free)
    # torch.compile each block: "auto" = on for CUDA (where it pays back quickly), off on CPU, where it
    # takes 20-30 s to compile and needs a C compiler; or true / false.
    compile: Literal["auto", "true", "false"] = "auto"
    parallel: Literal["ddp", "fsdp", "none"] = "ddp"  # under torchrun (fsdp: FSDP2 fully_shard); ignored in one process
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 2  # the newest checkpoints kept in <run>/checkpoints; 0 = every one
    log_every: int = 10
    seed: int = 0
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    # Start from another run's weights (its newest checkpoint, or a checkpoint folder): weights only, with a fresh
    # optimizer and schedule (continued pre-training, SFT, ORPO, DPO). Ignored on --resume (the checkpoint wins).
    init_from: str = ""
    # Comma-separated parameter-name prefixes that train, the rest frozen ("projector": LLaVA's stage 1); "" = all.
    trainable: str = ""
    # Where the step records go besides metrics.jsonl (always written: reports, plots and resume read it):
    # tensorboard (<run>/tensorboard/ event files), wandb (offline unless configured); pip install slmforge[track]
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])

    def validate(self, prefix: str = "train.") -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(choice_error(f"{prefix}device", self.device, ("auto", "cpu", "cuda", "cuda:<index>")))
        check_min(self, prefix, 1, "batch_size grad_accum eval_every eval_batches ckpt_every log_every")
        check_min(self, prefix, 0, "keep_checkpoints")
        check_min(self, prefix, 0, "max_steps warmup_steps lr_peak weight_decay grad_clip num_threads")
        for key in ("lr_min_ratio", "decay_fraction"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{prefix}{key}={getattr(self, key)}: expected a fraction in [0, 1]")


@dataclass
class CurateConfig:
    # Optional curation stages of `slmforge run`, between the corpus and the tokenizer (slmforge/curate/):
    # each reads the previous stage's kept documents and writes <run_dir>/curate/<stage>/.
    dedup: bool = False  # exact + MinHash near-duplicate removal
    quality: bool = False  # Gopher quality rules
    decontaminate: bool = False  # drop documents sharing a 13-gram with an evaluation set (GSM8K test)
    dedup_threshold: float = 0.8  # MinHash Jaccard similarity at which two documents count as duplicates
    eval_paths: list[str] = field(default_factory=list)  # decontamination sets; empty = curate/filters.GSM8K_TEST
    eval_fields: list[str] = field(default_factory=lambda: ["question", "answer"])  # joined into one item text
    # data.sources the quality rules pass through unchanged: procedural arithmetic is correct by construction, and
    # Gopher's rules (most words alphabetic, ...) would drop every equation-heavy document.
    quality_skip: list[str] = field(default_factory=list)


@dataclass
class MathEvalConfig:
    """Held-out procedural arithmetic scored at the end of ``slmforge run`` and shown in the report: the corpus's
    test-split problems, zero-shot and greedy, as ``slmforge eval gsm8k RUN data=procedural`` scores them."""

    decodings: list[str] = field(default_factory=list)  # plain (the model's own arithmetic), calculator; [] = off
    limit: int = 0  # the first `limit` problems; 0 = all

    def validate(self, prefix: str = "math_eval.") -> None:
        for i, mode in enumerate(self.decodings):
            check_choice(f"{prefix}decodings[{i}]", mode, MATH_DECODINGS)
        check_min(self, prefix, 0, "limit")


MATH_DECODINGS = ("plain", "calculator")


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    preset: str = ""  # model preset applied before the recipe's own model keys
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    finetune: PostConfig = field(default_factory=PostConfig)  # what this run is: "" = pre-training, or sft/orpo/dpo
    post: list[PostConfig] = field(default_factory=list)  # stages `slmforge run` chains after training (SFT, ORPO)
    sample_prompts: list[str] = field(default_factory=lambda: ["Question: Tom has 3 apples"])
    sample_tokens: int = 64
    math_eval: MathEvalConfig = field(default_factory=MathEvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def apply_preset(self, name: str) -> RunConfig:
        """This config with the preset's model; ``load`` calls it before the recipe's own keys merge in."""
        return dataclasses.replace(self, preset=name, model=preset(name))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig: defaults < preset < YAML recipe < overrides (``load(RunConfig, ...)``)."""
    return load(RunConfig, path, overrides)
