"""``slmforge run RECIPE``: walk ``STAGES``, a list of named stages, in one run folder.

The stages, in order: data, [dedup], [quality], [decontaminate], tokenizer, shards, train, eval, samples,
report; the bracketed ones run only when switched on in the recipe's ``curate`` section (slmforge/corpus.py
holds the data stages). A stage whose ``done(cfg)`` is true (its output exists) is skipped, so a killed run
resumes where it stopped; training itself resumes from its latest checkpoint. Eval, samples and the report run
every time: they are quick and read the newest checkpoint.

Adding a stage (SFT, ORPO, vision, ...) is one entry in ``STAGES``:

    Stage("sft", done=lambda cfg: RunDir.of(cfg).<its output>.exists(), run=run_sft,
          enabled=lambda cfg: cfg.sft.enabled)

placed where it runs (after "train", before "eval" for SFT). ``run(cfg, walk)`` does the work, writes its
output under ``RunDir.of(cfg)`` and returns what later stages need (``walk.results["sft"]``); ``done(cfg)``
checks that output; ``enabled`` is for a stage that can be switched off, and defaults to always on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import slmforge.corpus as corpus
from slmforge.checkpoint import load_for_inference
from slmforge.config import RunConfig, dump_yaml
from slmforge.corpus import shard_dirs
from slmforge.log import log
from slmforge.metrics import evaluate_loss
from slmforge.model.block import check_model
from slmforge.plan import count_params
from slmforge.runs import MetricsLog, RunDir, write_json, write_text
from slmforge.serve.generate import generate
from slmforge.tokens.mixture import Source
from slmforge.tokens.shards import TokenLoader, load_shards
from slmforge.train.loop import train


@dataclass
class Walk:
    """One walk of the stage list: when it began, and what each stage that ran returned, by stage name."""

    start: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)


def _always(cfg: RunConfig) -> bool:
    return True


def _never(cfg: RunConfig) -> bool:
    return False


@dataclass(frozen=True)
class Stage:
    name: str
    done: Callable[[RunConfig], bool]  # its output exists: skip it
    run: Callable[[RunConfig, Walk], Any]  # does the work; the result goes to walk.results[name]
    enabled: Callable[[RunConfig], bool] = _always  # false: the recipe switched it off
    reused: str = "reusing its output"  # the message when done() is true


def resolve_mixture(cfg: RunConfig) -> RunConfig:
    """Mixture sources of ``data.sources`` read <shards_dir>/<name>/train; no mixture sources = all of them."""
    mix = cfg.data.mixture
    if not cfg.data.sources or not mix.stages:
        return cfg
    run = RunDir.of(cfg)
    sources = mix.sources or [Source(name=name) for name in cfg.data.sources]
    sources = [dataclasses.replace(s, shards=s.shards or str(run.split_shards(f"{s.name}/train"))) for s in sources]
    mix = dataclasses.replace(mix, sources=sources)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mixture=mix))


# ---------------------------------------------------------------- train, eval, samples


def train_done(cfg: RunConfig) -> bool:
    path = RunDir.of(cfg).train_result
    return path.exists() and json.loads(path.read_text())["steps"] >= cfg.train.max_steps


def run_train(cfg: RunConfig) -> dict:
    log(f"train: {cfg.train.max_steps} steps -> {RunDir.of(cfg).root}")
    return train(resolve_mixture(cfg), resume=True).__dict__


def unigram_entropy(shard_dir: Path) -> float:
    """Entropy of the token frequency distribution, nats/token: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(load_shards(shard_dir).tokens), minlength=1).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def evaluate_run(cfg: RunConfig) -> dict:
    """Loss, perplexity and bits per byte on the first 50 validation and test batches, and the unigram entropy."""
    shards = shard_dirs(cfg)
    model, _, _ = load_for_inference(RunDir.of(cfg).root)
    result = {"unigram_entropy_nats": unigram_entropy(shards["train"])}
    for split in ("validation", "test"):
        loader = TokenLoader(shards[split], cfg.data.seq_len, cfg.train.batch_size, shuffle=False)
        batches = list(itertools.islice(loader, 50))
        loss = evaluate_loss(model, batches, "cpu")
        meta = load_shards(shards[split]).meta
        # Inline (not metrics.bits_per_byte) so that the product is rounded as in earlier reports, bit for bit.
        result[split] = {"loss": loss, "perplexity": math.exp(loss),
                         "bits_per_byte": loss * meta["num_tokens"] / meta["num_bytes"] / math.log(2),
                         "tokens": sum(x.numel() for x, _ in batches)}
    return result


def samples(cfg: RunConfig) -> list[dict]:
    model, tok, _ = load_for_inference(RunDir.of(cfg).root)
    return [{"prompt": p, "completion": generate(model, tok, p, cfg.sample_tokens, temperature=0.7, seed=i)}
            for i, p in enumerate(cfg.sample_prompts)]


# ---------------------------------------------------------------- report


def stage_summary(records: list[dict]) -> list[dict]:
    """Per mixture stage: its steps and the validation loss when it started and when it ended."""
    out, last_val = [], None
    for r in records:
        if "stage" not in r:
            continue
        if not out or out[-1]["stage"] != r["stage"]:
            out.append({"stage": r["stage"], "first_step": r["step"], "val_loss_start": last_val, "val_loss_end": None})
        out[-1]["last_step"] = r["step"]
        if "val_loss" in r:
            last_val = out[-1]["val_loss_end"] = r["val_loss"]
    return out


def write_report(cfg: RunConfig, walk: Walk) -> dict:
    """report.json (the numbers) and report.md (a page a person reads); returns the numbers."""
    run, cfg = RunDir.of(cfg), resolve_mixture(cfg)
    report = {"curate": corpus.curation_summary(cfg)} if corpus.curation_stages(cfg) else {}
    report.update({"train": json.loads(run.train_result.read_text()), "eval": walk.results["eval"],
                   "samples": walk.results["samples"], "seconds_total": time.perf_counter() - walk.start})
    if cfg.data.mixture.stages:
        report["stages"] = stage_summary(MetricsLog(run.metrics).read())
    write_json(run.report_json, report)
    write_text(run.report_md, render_report(cfg, report))
    log(f"report: {run.report_md}")
    return report


def render_report(cfg: RunConfig, report: dict) -> str:
    pc = count_params(cfg.model)
    tr, ev = report["train"], report["eval"]
    lines = [
        f"# slmforge run `{cfg.name}`", "",
        "| | |", "|---|---|",
        f"| parameters | {pc.total:,} total, {pc.non_embedding:,} non-embedding |",
        f"| tokens trained | {tr['tokens']:,} ({tr['steps']} steps) |",
        f"| training time | {tr['seconds']:.0f} s ({tr['tokens_per_second']:,.0f} tokens/s) |",
        f"| pipeline time | {report['seconds_total']:.0f} s |",
        f"| unigram entropy of the corpus | {ev['unigram_entropy_nats']:.3f} nats/token |",
    ]
    for split in ("validation", "test"):
        e = ev[split]
        lines.append(f"| {split} loss | {e['loss']:.3f} nats/token (ppl {e['perplexity']:.2f}, "
                     f"{e['bits_per_byte']:.3f} bits/byte) |")
    if report.get("curate"):
        lines += ["", "| curation | documents | kept | removed |", "|---|---|---|---|"]
        lines += [f"| {stage} {key} | {c['num_docs']:,} | {c['num_kept']:,} | "
                  f"{', '.join(f'{n:,} {why}' for why, n in c['removed'].items()) or 0} |"
                  for stage, keys in report["curate"].items() for key, c in keys.items()]
    if report.get("stages"):
        lines += ["", "| stage | steps | val loss at start | val loss at end |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['first_step']}-{s['last_step']} | {_fmt(s['val_loss_start'])} | "
                  f"{_fmt(s['val_loss_end'])} |" for s in report["stages"]]
    lines += ["", "![loss](loss.png)", "", "## Samples", ""]
    for s in report["samples"]:
        lines += [f"**Prompt:** `{s['prompt']}`", "", "```", s["prompt"] + s["completion"], "```", ""]
    lines += ["## Config", "", "```yaml", dump_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------- the stage list


def _curation(name: str) -> Stage:
    """Curation stage ``name``, switched on by ``curate.<name>`` in the recipe."""
    return Stage(name, done=lambda cfg: corpus.curation_done(cfg, name),
                 run=lambda cfg, walk: corpus.curate(cfg, name), enabled=lambda cfg: getattr(cfg.curate, name))


STAGES: list[Stage] = [
    Stage("data", corpus.data_done, lambda cfg, walk: corpus.build_data(cfg)),
    *[_curation(name) for name in corpus.CURATION],
    Stage("tokenizer", corpus.tokenizer_done, lambda cfg, walk: corpus.build_tokenizer(cfg)),
    Stage("shards", corpus.shards_done, lambda cfg, walk: corpus.build_shards(cfg)),
    Stage("train", train_done, lambda cfg, walk: run_train(cfg), reused="already finished"),
    Stage("eval", _never, lambda cfg, walk: evaluate_run(cfg)),
    Stage("samples", _never, lambda cfg, walk: samples(cfg)),
    Stage("report", _never, write_report),
]


def run_stages(cfg: RunConfig, stages: list[Stage]) -> Walk:
    """Run each enabled stage of ``stages`` in order, skipping those already done."""
    w = Walk()
    for stage in stages:
        if not stage.enabled(cfg):
            continue
        if stage.done(cfg):
            log(f"{stage.name}: {stage.reused}")
            continue
        w.results[stage.name] = stage.run(cfg, w)
    return w


def run(cfg: RunConfig) -> dict:
    """The whole pipeline; returns the report's numbers (also in <run_dir>/report.json)."""
    check_model(cfg.model)
    run_dir = RunDir.of(cfg)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.config, dump_yaml(cfg))
    return run_stages(cfg, STAGES).results["report"]


def prepare(cfg: RunConfig) -> tuple[Path, dict[str, Path]]:
    """The stages before "train" (corpus, curation, tokenizer, shards); returns the tokenizer and shard folders."""
    run_stages(cfg, STAGES[: [s.name for s in STAGES].index("train")])
    return RunDir.of(cfg).tokenizer, shard_dirs(cfg)
