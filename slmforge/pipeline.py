"""``slmforge run RECIPE``: data -> tokenizer -> shards -> train -> eval -> samples -> report, in one folder.

Each stage is skipped when its output already exists, so a killed run picks up where it stopped
(training itself resumes from its latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np

from slmforge.config import DataConfig, RunConfig, dump_yaml, merge
from slmforge.tokens.mixture import MixtureConfig, Source
from slmforge.runs import write_json, write_text

SPLITS = ("train", "validation", "test")


def _log(msg: str) -> None:
    print(f"[slmforge] {msg}", flush=True)


def _corpus(d: DataConfig, where: str = "data") -> dict[str, list]:
    """``{split: [Document]}`` of one corpus described by data keys (source, families, paths, ...)."""
    from slmforge.curate.documents import read_documents

    if d.source == "procedural":
        from slmforge.synth.procedural import build_corpus

        return build_corpus(d.families, d.num_train_docs, d.num_val_docs, d.num_test_docs, d.seed)
    if d.source != "files":
        raise ValueError(f"{where}.source={d.source!r}: choose 'procedural' or 'files'")
    if not d.paths:
        raise ValueError(f"{where}.source=files needs {where}.paths (files or globs of text/JSONL/Parquet)")
    corpus = {s: [] for s in SPLITS}
    for doc in read_documents(d.paths, text_field=d.text_field, text_split=d.text_split):
        # A stable hash decides the split, so the same document always lands in the same one.
        h = int(hashlib.sha1(doc.text.encode()).hexdigest()[:8], 16) / 2**32
        corpus["validation" if not d.val_paths and h < d.val_fraction else "train"].append(doc)
    if d.val_paths:
        corpus["validation"] = list(read_documents(d.val_paths, text_field=d.text_field, text_split=d.text_split))
    return corpus


def source_configs(cfg: RunConfig) -> dict[str, DataConfig]:
    """Each ``data.sources`` entry as a whole DataConfig: the top-level data keys, then the entry's own."""
    base = dataclasses.replace(cfg.data, sources={}, mixture=MixtureConfig())
    out = {}
    for name, keys in cfg.data.sources.items():
        if not isinstance(keys, dict) or {"sources", "mixture", "tokenizer", "shards_dir"} & set(keys):
            raise ValueError(f"data.sources.{name}: expected a mapping of corpus keys (source, families, paths, "
                             f"num_train_docs, ...), got {keys!r}")
        out[name] = merge(base, keys, f"data.sources.{name}")
    return out


def build_data(cfg: RunConfig) -> dict[str, Path]:
    """Write the corpus splits as JSONL under <run_dir>/data; return their paths.

    With ``data.sources`` each source is written to <run_dir>/data/<name>/, and <run_dir>/data/ holds them all.
    """
    from slmforge.curate.documents import write_jsonl

    out = {s: cfg.run_dir / "data" / f"{s}.jsonl" for s in SPLITS}
    if all(p.exists() for p in out.values()):
        _log(f"data: reusing {out['train'].parent}")
        return out
    if not cfg.data.sources:
        corpus = _corpus(cfg.data)
    else:
        corpus = {s: [] for s in SPLITS}
        for name, d in source_configs(cfg).items():
            part = _corpus(d, f"data.sources.{name}")
            for split in SPLITS:
                n = write_jsonl(out[split].parent / name / f"{split}.jsonl", part[split])
                _log(f"data: {name}/{split}: {n} documents")
                corpus[split] += part[split]
        # Interleaved, so that the first validation batches (all the training loop scores) hold every source.
        for split in SPLITS:
            random.Random(f"{cfg.data.seed}:{split}").shuffle(corpus[split])
    for split, path in out.items():
        n = write_jsonl(path, corpus[split])
        _log(f"data: {split}: {n} documents -> {path}")
    return out


def tokenizer_path(cfg: RunConfig) -> Path:
    return Path(cfg.data.tokenizer) if cfg.data.tokenizer else cfg.run_dir / "tokenizer.json"


def build_tokenizer(cfg: RunConfig, data: dict[str, Path] | None) -> Path:
    from slmforge.curate.documents import read_documents
    from slmforge.tokens.tokenizer import train_tokenizer

    path = tokenizer_path(cfg)
    if path.exists():
        _log(f"tokenizer: reusing {path}")
        return path
    t0 = time.perf_counter()
    texts = (doc.text for doc in read_documents(data["train"]))
    tok = train_tokenizer(texts, cfg.model.vocab_size, path)
    _log(f"tokenizer: {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s -> {path}")
    return path


def shard_dirs(cfg: RunConfig) -> dict[str, Path]:
    """Shard folder per split ("train", ...) and, with data.sources, per "<source>/<split>"."""
    from slmforge.train.loop import shard_paths

    root = shard_paths(cfg)[0].parent
    names = [""] + [f"{name}/" for name in cfg.data.sources]
    return {f"{name}{split}": root / f"{name}{split}" for name in names for split in SPLITS}


def build_shards(cfg: RunConfig, data: dict[str, Path] | None, tokenizer: Path) -> dict[str, Path]:
    from slmforge.curate.documents import read_documents
    from slmforge.tokens.shards import tokenize_to_shards

    out = shard_dirs(cfg)
    for key, shard_dir in out.items():
        if (shard_dir / "meta.json").exists():
            continue
        texts = (doc.text for doc in read_documents(data["train"].parent / f"{key}.jsonl"))
        meta = tokenize_to_shards(texts, tokenizer, shard_dir, num_workers=cfg.data.num_workers)
        _log(f"shards: {key}: {meta['num_tokens']:,} tokens from {meta['num_docs']:,} documents")
    return out


def prepare(cfg: RunConfig) -> tuple[Path, dict[str, Path]]:
    """Tokenizer and shard folders; the JSONL corpus is built only when one of them is missing."""
    ready = tokenizer_path(cfg).exists() and all((d / "meta.json").exists() for d in shard_dirs(cfg).values())
    if ready:
        _log("data: reusing the tokenizer and shards; the corpus is not needed")
    data = None if ready else build_data(cfg)
    tokenizer = build_tokenizer(cfg, data)
    return tokenizer, build_shards(cfg, data, tokenizer)


def resolve_mixture(cfg: RunConfig) -> RunConfig:
    """Mixture sources of ``data.sources`` read <shards_dir>/<name>/train; no mixture sources = all of them."""
    mix = cfg.data.mixture
    if not cfg.data.sources or not mix.stages:
        return cfg
    root = shard_dirs(cfg)["train"].parent
    sources = mix.sources or [Source(name=name) for name in cfg.data.sources]
    sources = [dataclasses.replace(s, shards=s.shards or str(root / s.name / "train")) for s in sources]
    mix = dataclasses.replace(mix, sources=sources)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mixture=mix))


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


def unigram_entropy(shard_dir: Path) -> float:
    """Entropy of the token frequency distribution, nats/token: the loss of the best context-free model."""
    from slmforge.tokens.shards import load_shards

    counts = np.bincount(np.asarray(load_shards(shard_dir).tokens), minlength=1).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def evaluate_run(cfg: RunConfig, shards: dict[str, Path]) -> dict:
    import itertools

    import torch

    from slmforge.tokens.shards import TokenLoader, load_shards
    from slmforge.train.checkpoint import load_for_inference
    from slmforge.train.loop import evaluate

    model, _, _ = load_for_inference(cfg.run_dir)
    result = {"unigram_entropy_nats": unigram_entropy(shards["train"])}
    for split in ("validation", "test"):
        loader = TokenLoader(shards[split], cfg.data.seq_len, cfg.train.batch_size, shuffle=False)
        batches = list(itertools.islice(loader, 50))
        loss = evaluate(model, batches, torch.device("cpu"), None)
        meta = load_shards(shards[split]).meta
        result[split] = {"loss": loss, "perplexity": math.exp(loss),
                         "bits_per_byte": loss * meta["num_tokens"] / meta["num_bytes"] / math.log(2),
                         "tokens": sum(x.numel() for x, _ in batches)}
    return result


def samples(cfg: RunConfig) -> list[dict]:
    from slmforge.serve.generate import generate
    from slmforge.train.checkpoint import load_for_inference

    model, tok, _ = load_for_inference(cfg.run_dir)
    return [{"prompt": p, "completion": generate(model, tok, p, cfg.sample_tokens, temperature=0.7, seed=i)}
            for i, p in enumerate(cfg.sample_prompts)]


def run(cfg: RunConfig) -> dict:
    """The whole tiny pipeline; returns the report's numbers (also in <run_dir>/report.json)."""
    from slmforge.train.loop import train

    t0 = time.perf_counter()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_text(cfg.run_dir / "config.yaml", dump_yaml(cfg))
    _, shards = prepare(cfg)
    cfg = resolve_mixture(cfg)
    done = cfg.run_dir / "train_result.json"
    if done.exists() and json.loads(done.read_text())["steps"] >= cfg.train.max_steps:
        _log("train: already finished")
        train_result = json.loads(done.read_text())
    else:
        _log(f"train: {cfg.train.max_steps} steps -> {cfg.run_dir}")
        train_result = train(cfg, resume=True).__dict__
    evals = evaluate_run(cfg, shards)
    report = {"train": train_result, "eval": evals, "samples": samples(cfg),
              "seconds_total": time.perf_counter() - t0}
    if cfg.data.mixture.stages:
        from slmforge.runs import MetricsLog

        report["stages"] = stage_summary(MetricsLog(cfg.run_dir / "metrics.jsonl").read())
    write_json(cfg.run_dir / "report.json", report)
    write_text(cfg.run_dir / "report.md", render_report(cfg, report))
    _log(f"report: {cfg.run_dir / 'report.md'}")
    return report


def render_report(cfg: RunConfig, report: dict) -> str:
    from slmforge.plan import count_params

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
