"""``slmforge run RECIPE``: walk ``STAGES``, a list of named stages, in one run folder.

The stages, in order: data, [dedup], [quality], [decontaminate], tokenizer, shards, train, eval, [math],
samples, report; the bracketed ones run only when switched on in the recipe (``curate``; ``math_eval``, held-out
arithmetic scored for the report); slmforge/corpus.py holds the data stages. A stage whose ``done(cfg)`` is true
(its output exists) is skipped, so a killed run resumes where it stopped; training itself resumes from its latest
checkpoint. Eval, math, samples and the report run every time: they are quick and read the newest checkpoint.

The recipe's ``post`` list (SFT, ORPO, DPO; slmforge/post/) runs after samples, each stage into its own run folder.
Adding a stage (vision, ...) is one entry in ``STAGES``:

    Stage("vision", done=lambda cfg: RunDir.of(cfg).<its output>.exists(), run=run_vision,
          enabled=lambda cfg: cfg.vision.enabled)

placed where it runs. ``run(cfg, walk)`` does the work, writes its
output under ``RunDir.of(cfg)`` and returns what later stages need (``walk.results["sft"]``); ``done(cfg)``
checks that output; ``enabled`` is for a stage that can be switched off, and defaults to always on;
``depends`` names the config keys its output depends on and ``outputs`` the paths it writes.

A run folder knows what made it: ``run`` on a folder whose config.yaml differs in a key that a built stage
depends on refuses before writing anything, listing the keys (``check_config_change``); ``force`` deletes that
stage's outputs and everything after it, then rebuilds. Keys that change nothing built (train.max_steps raised
to train further, sample_prompts) pass. Each invocation's wall time is kept so the report shows the total.

long: past 400 lines with the config-change check, which reads every stage's ``depends`` and ``outputs``: it
sits beside the stage list so that a new stage and the keys it depends on are written and read together.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import slmforge.corpus as corpus
from slmforge.checkpoint import load_for_inference
from slmforge.config import RunConfig, dump_yaml, merge, read_yaml, to_dict
from slmforge.corpus import shard_dirs
from slmforge.log import log
from slmforge.metrics import evaluate_loss
from slmforge.model.block import check_model
from slmforge.plan import count_params
from slmforge.post.run import post_done, run_post_stages
from slmforge.runs import MetricsLog, RunDir, write_json, write_text
from slmforge.serve.generate import generate
from slmforge.tokens.mixture import Source
from slmforge.tokens.shards import TokenLoader, load_shards
from slmforge.train.loop import train


@dataclass
class Walk:
    """One walk of the stage list: when it began, what each stage that ran returned (by stage name), and the wall
    seconds of the earlier invocations on this run folder, kept in ``timing`` (``RunDir.pipeline_time``)."""

    start: float = field(default_factory=time.perf_counter)
    results: dict[str, Any] = field(default_factory=dict)
    earlier: list[float] = field(default_factory=list)
    timing: Path | None = None

    def invocations(self) -> list[float]:
        """Wall seconds of every invocation, this one (so far) last."""
        return self.earlier + [round(time.perf_counter() - self.start, 3)]

    def save_time(self) -> None:
        if self.timing is not None:
            write_json(self.timing, {"invocation_seconds": self.invocations()})


def _always(cfg: RunConfig) -> bool:
    return True


def _never(cfg: RunConfig) -> bool:
    return False


def _outputs(*names: str) -> Callable[[RunConfig], list[Path]]:
    """The ``RunDir`` paths ``names`` of a run that lie inside its folder (a data.tokenizer elsewhere is not ours)."""

    def outputs(cfg: RunConfig) -> list[Path]:
        run = RunDir.of(cfg)
        return [path for path in (getattr(run, name) for name in names) if path.is_relative_to(run.root)]

    return outputs


@dataclass(frozen=True)
class Stage:
    name: str
    done: Callable[[RunConfig], bool]  # its output exists: skip it
    run: Callable[[RunConfig, Walk], Any]  # does the work; the result goes to walk.results[name]
    enabled: Callable[[RunConfig], bool] = _always  # false: the recipe switched it off
    reused: str = "reusing its output"  # the message when done() is true
    # The config keys its output depends on, as dotted prefixes; "-key" leaves a key out ("data",
    # "-data.num_workers": every data key but the number of workers). See check_config_change.
    depends: tuple[str, ...] = ()
    outputs: Callable[[RunConfig], list[Path]] = _outputs()  # what --force deletes (only inside the run folder)

    def depends_on(self, key: str) -> bool:
        def under(prefix: str) -> bool:
            return key == prefix or key.startswith(prefix + ".")

        return (any(under(p) for p in self.depends if not p.startswith("-"))
                and not any(under(p[1:]) for p in self.depends if p.startswith("-")))

    def built(self, cfg: RunConfig) -> bool:
        """Some of its output exists (a finished or a half-finished stage)."""
        return any(path.exists() for path in self.outputs(cfg))


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
        if not load_shards(shards[split]).meta["num_docs"]:
            log(f"eval: {split}: skipped, the split is empty (data.test_fraction / data.test_paths hold one out)")
            continue
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


def check_math_eval(cfg: RunConfig) -> None:
    """Refuse ``math_eval`` before any work when the corpus has no procedural arithmetic to hold out."""
    if not cfg.math_eval.decodings:
        return
    datas = list(corpus.source_configs(cfg).values()) if cfg.data.sources else [cfg.data]
    if not any(d.source == "procedural" and "arithmetic" in d.families for d in datas):
        raise ValueError("math_eval.decodings: the corpus has no procedural arithmetic to score (data.source="
                         "procedural with arithmetic in data.families, or a data.sources entry with it)")


def evaluate_math(cfg: RunConfig) -> dict:
    """{decoding: {"accuracy", "problems"}}: the test split's arithmetic problems, zero-shot and greedy, strict
    ``#### N`` match, once per ``math_eval.decodings`` (files under eval/gsm8k_procedural[_calculator])."""
    from slmforge.eval.gsm8k import GSM8KConfig, evaluate

    out = {}
    for mode in cfg.math_eval.decodings:
        gsm = GSM8KConfig(data="procedural", num_fewshot=0, limit=cfg.math_eval.limit, batch_size=32,
                          tools="calculator" if mode == "calculator" else "")
        result = evaluate(RunDir.of(cfg).root, gsm)
        out[mode] = {"accuracy": result["metrics"]["strict-match"]["exact_match"],
                     "problems": result["num_problems"]}
    return out


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
    seconds = walk.invocations()
    if "math" in walk.results:
        report["math"] = walk.results["math"]
    report.update({"train": json.loads(run.train_result.read_text()), "eval": walk.results["eval"],
                   "samples": walk.results["samples"], "seconds_total": sum(seconds),
                   "seconds_this_invocation": seconds[-1], "invocations": len(seconds)})
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
        f"| pipeline time | {report['seconds_total']:.0f} s over {_invocations(report['invocations'])} |",
        f"| unigram entropy of the corpus | {ev['unigram_entropy_nats']:.3f} nats/token |",
    ]
    for split in ("validation", "test"):
        e = ev.get(split)
        lines.append(f"| {split} loss | empty split, not evaluated |" if e is None else
                     f"| {split} loss | {e['loss']:.3f} nats/token (ppl {e['perplexity']:.2f}, "
                     f"{e['bits_per_byte']:.3f} bits/byte) |")
    for mode, m in report.get("math", {}).items():
        lines.append(f"| held-out arithmetic, {MATH_LABELS[mode]} | {m['accuracy']:.1%} of {m['problems']} problems "
                     f"(0-shot, greedy) |")
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


MATH_LABELS = {"plain": "the model's own arithmetic", "calculator": "with the calculator in decoding"}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _invocations(n: int) -> str:
    return f"{n} invocation{'s' if n > 1 else ''} of `slmforge run`"


# ---------------------------------------------------------------- the stage list


def _curation(name: str) -> Stage:
    """Curation stage ``name``, switched on by ``curate.<name>`` in the recipe."""
    return Stage(name, done=lambda cfg: corpus.curation_done(cfg, name),
                 run=lambda cfg, walk: corpus.curate(cfg, name), enabled=lambda cfg: getattr(cfg.curate, name),
                 depends=(f"curate.{name}", *CURATION_KEYS[name]),
                 outputs=lambda cfg: [RunDir.of(cfg).curate / name])


# Keys a curation stage reads besides its switch.
CURATION_KEYS = {"dedup": ("curate.dedup_threshold",), "quality": (),
                 "decontaminate": ("curate.eval_paths", "curate.eval_fields")}
# How a run runs, not what it computes: changing these never invalidates a checkpoint. train.max_steps is here
# too, so that raising it trains further.
OPERATIONAL = ("-model.fast_kernels", "-train.max_steps", "-train.eval_every", "-train.eval_batches",
               "-train.ckpt_every", "-train.log_every", "-train.num_threads", "-train.device", "-train.compile",
               "-train.parallel", "-train.activation_checkpointing", "-train.loggers")


STAGES: list[Stage] = [
    Stage("data", corpus.data_done, lambda cfg, walk: corpus.build_data(cfg),
          depends=("data", "-data.num_workers", "-data.tokenizer", "-data.shards_dir", "-data.seq_len",
                   "-data.packing", "-data.mixture"), outputs=_outputs("data")),
    *[_curation(name) for name in corpus.CURATION],
    Stage("tokenizer", corpus.tokenizer_done, lambda cfg, walk: corpus.build_tokenizer(cfg),
          depends=("model.vocab_size", "data.tokenizer"), outputs=_outputs("tokenizer")),
    Stage("shards", corpus.shards_done, lambda cfg, walk: corpus.build_shards(cfg),
          depends=("data.shards_dir",), outputs=_outputs("shards")),
    Stage("train", train_done, lambda cfg, walk: run_train(cfg), reused="already finished",
          depends=("model", "train", *OPERATIONAL, "data.seq_len", "data.packing", "data.mixture"),
          outputs=_outputs("checkpoints", "metrics", "loss_plot", "train_result")),
    Stage("eval", _never, lambda cfg, walk: evaluate_run(cfg), outputs=lambda cfg: [RunDir.of(cfg).root / "eval"]),
    Stage("math", _never, lambda cfg, walk: evaluate_math(cfg), enabled=lambda cfg: bool(cfg.math_eval.decodings)),
    Stage("samples", _never, lambda cfg, walk: samples(cfg)),
    # SFT, ORPO, DPO into their own run folders (<name>_sft, ...), each from the one before: slmforge/post/run.py
    Stage("post", post_done, lambda cfg, walk: run_post_stages(cfg), enabled=lambda cfg: bool(cfg.post),
          reused="every post-training stage already finished"),
    Stage("report", _never, write_report, outputs=_outputs("report_json", "report_md")),
]


def run_stages(cfg: RunConfig, stages: list[Stage], walk: Walk | None = None) -> Walk:
    """Run each enabled stage of ``stages`` in order, skipping those already done."""
    w = walk or Walk()
    for stage in stages:
        if not stage.enabled(cfg):
            continue
        if stage.done(cfg):
            log(f"{stage.name}: {stage.reused}")
            continue
        w.results[stage.name] = stage.run(cfg, w)
        w.save_time()
    return w


def run(cfg: RunConfig, force: bool = False) -> dict:
    """The whole pipeline; returns the report's numbers (also in <run_dir>/report.json).

    On an existing run folder, a changed key that an already built stage depends on is refused
    (``check_config_change``), or with ``force`` that stage's outputs and everything after it are deleted and
    rebuilt. config.yaml is written only once the check has passed.
    """
    check_model(cfg.model)
    check_math_eval(cfg)
    run_dir = RunDir.of(cfg)
    check_config_change(cfg, force)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.config, dump_yaml(cfg))
    timing = run_dir.pipeline_time
    walk = Walk(earlier=json.loads(timing.read_text())["invocation_seconds"] if timing.exists() else [], timing=timing)
    try:
        return run_stages(cfg, STAGES, walk).results["report"]
    finally:
        walk.save_time()


def prepare(cfg: RunConfig) -> tuple[Path, dict[str, Path]]:
    """The stages before "train" (corpus, curation, tokenizer, shards); returns the tokenizer and shard folders."""
    run_stages(cfg, STAGES[: [s.name for s in STAGES].index("train")])
    return RunDir.of(cfg).tokenizer, shard_dirs(cfg)


# ---------------------------------------------------------------- a changed config on an existing run folder


def changed_keys(cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every key that differs from the run folder's config.yaml.

    Both sides are read through RunConfig, so keys added to it since the run was made take their defaults; the
    mixture sources that ``resolve_mixture`` fills in count as unchanged.
    """
    path = RunDir.of(cfg).config
    saved = read_yaml(path)
    try:
        old = merge(RunConfig(), saved, where=str(path))
        old = _flat(to_dict(resolve_mixture(dataclasses.replace(old, name=cfg.name, out_dir=cfg.out_dir))))
    except ValueError:  # a key RunConfig no longer has: compare what was written
        old = _flat(saved)
    new = _flat(to_dict(resolve_mixture(cfg)))
    pairs = {k: (old.get(k, "(unset)"), new.get(k, "(unset)")) for k in {**old, **new}}
    return {k: (a, b) for k, (a, b) in pairs.items() if a != b and _read_by_corpus(k, old, new)}


# The data keys only a procedural corpus reads; those of neither list only a files one (paths, text_split, ...).
PROCEDURAL_ONLY = ("families", "num_train_docs", "num_val_docs", "num_test_docs")
EVERY_CORPUS = ("source", "seed", "sources", "seq_len", "packing", "num_workers", "tokenizer", "shards_dir", "mixture")


def _read_by_corpus(key: str, old: dict, new: dict) -> bool:
    """False for a data key the corpus kind (data.source, the same before and after) does not read."""
    parts, source = key.split("."), new.get("data.source")
    if parts[0] != "data" or parts[1] in EVERY_CORPUS or old.get("data.source") != source:
        return True
    return (parts[1] in PROCEDURAL_ONLY) == (source == "procedural")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_config_change(cfg: RunConfig, force: bool = False) -> None:
    """Refuse a config that changes a key some built stage depends on, naming the keys; with ``force``, delete
    the outputs of the first stage a changed key feeds and of every stage after it.

    The first affected stage is the earliest whose ``depends`` holds a changed key; every later stage reads its
    output, so it and all of them are stale if any of them is built. Keys no stage depends on (sample_prompts,
    train.max_steps, train.eval_every, ...) never block.
    """
    if not RunDir.of(cfg).config.exists():
        return
    # A stage counts if it runs now or ran before: curate.dedup_threshold means nothing while dedup is off.
    stages = [s for s in STAGES if s.enabled(cfg) or s.built(cfg)]
    changes = changed_keys(cfg).items()
    blocking = {k: v for k, v in changes if any(s.depends_on(k) for s in stages)}
    first = next((STAGES.index(s) for s in stages if any(s.depends_on(k) for k in blocking)), len(STAGES))
    built = [s.name for s in STAGES[first:] if s.built(cfg)]
    if not built:
        return
    if not force:
        listed = [f"{k} ({_show(old)} -> {_show(new)})" for k, (old, new) in sorted(blocking.items())]
        listed = ", ".join(listed[:8]) + (f" and {len(listed) - 8} more" if len(listed) > 8 else "")
        raise ValueError(f"{RunDir.of(cfg).config}: changed {listed}, which invalidates the stage "
                         f"{STAGES[first].name!r} and what follows it ({', '.join(built)}), built with the old "
                         f"values; give the run a new name=..., or add --force to delete those outputs and rebuild "
                         f"from {STAGES[first].name!r}")
    log(f"--force: {', '.join(sorted(blocking))} changed: deleting the outputs of {', '.join(built)}")
    for path in [path for stage in STAGES[first:] for path in stage.outputs(cfg)]:
        if path.is_dir():
            shutil.rmtree(path)
        path.unlink(missing_ok=True)
    if first == 0:  # nothing is left of the earlier invocations' work
        RunDir.of(cfg).pipeline_time.unlink(missing_ok=True)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
