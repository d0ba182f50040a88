"""``slmforge run RECIPE``: data -> tokenizer -> shards -> train -> eval -> samples -> report, in one folder.

Each stage is skipped when its output already exists, so a killed run picks up where it stopped
(training itself resumes from its latest checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from slmforge.config import RunConfig, dump_yaml
from slmforge.runs import write_json, write_text

SPLITS = ("train", "validation", "test")


def _log(msg: str) -> None:
    print(f"[slmforge] {msg}", flush=True)


def build_data(cfg: RunConfig) -> dict[str, Path]:
    """Write the corpus splits as JSONL under <run_dir>/data; return their paths."""
    from slmforge.data.documents import read_documents, write_jsonl

    out = {s: cfg.run_dir / "data" / f"{s}.jsonl" for s in SPLITS}
    if all(p.exists() for p in out.values()):
        _log(f"data: reusing {out['train'].parent}")
        return out
    d = cfg.data
    if d.source == "procedural":
        from slmforge.data.synth.procedural import build_corpus

        corpus = build_corpus(d.families, d.num_train_docs, d.num_val_docs, d.num_test_docs, d.seed)
    elif d.source == "files":
        if not d.paths:
            raise ValueError("data.source=files needs data.paths (files or globs of text/JSONL/Parquet)")
        corpus = {s: [] for s in SPLITS}
        for doc in read_documents(d.paths, text_field=d.text_field):
            # A stable hash decides the split, so the same document always lands in the same one.
            h = int(hashlib.sha1(doc.text.encode()).hexdigest()[:8], 16) / 2**32
            corpus["validation" if not d.val_paths and h < d.val_fraction else "train"].append(doc)
        if d.val_paths:
            corpus["validation"] = list(read_documents(d.val_paths, text_field=d.text_field))
    else:
        raise ValueError(f"data.source={d.source!r}: choose 'procedural' or 'files'")
    for split, path in out.items():
        n = write_jsonl(path, corpus[split])
        _log(f"data: {split}: {n} documents -> {path}")
    return out


def build_tokenizer(cfg: RunConfig, data: dict[str, Path]) -> Path:
    from slmforge.data.documents import read_documents
    from slmforge.data.tokenizer import train_tokenizer

    path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else cfg.run_dir / "tokenizer.json"
    if path.exists():
        _log(f"tokenizer: reusing {path}")
        return path
    t0 = time.perf_counter()
    texts = (doc.text for doc in read_documents(data["train"]))
    tok = train_tokenizer(texts, cfg.model.vocab_size, path)
    _log(f"tokenizer: {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s -> {path}")
    return path


def build_shards(cfg: RunConfig, data: dict[str, Path], tokenizer: Path) -> dict[str, Path]:
    from slmforge.data.documents import read_documents
    from slmforge.data.shards import tokenize_to_shards
    from slmforge.train.loop import shard_paths

    train_dir, val_dir = shard_paths(cfg)
    out = {"train": train_dir, "validation": val_dir, "test": train_dir.parent / "test"}
    for split, shard_dir in out.items():
        if (shard_dir / "meta.json").exists():
            continue
        texts = (doc.text for doc in read_documents(data[split]))
        meta = tokenize_to_shards(texts, tokenizer, shard_dir, num_workers=cfg.data.num_workers)
        _log(f"shards: {split}: {meta['num_tokens']:,} tokens from {meta['num_docs']:,} documents")
    return out


def unigram_entropy(shard_dir: Path) -> float:
    """Entropy of the token frequency distribution, nats/token: the loss of the best context-free model."""
    from slmforge.data.shards import load_shards

    counts = np.bincount(np.asarray(load_shards(shard_dir).tokens), minlength=1).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def evaluate_run(cfg: RunConfig, shards: dict[str, Path]) -> dict:
    import itertools

    import torch

    from slmforge.data.shards import TokenLoader, load_shards
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
    data = build_data(cfg)
    tokenizer = build_tokenizer(cfg, data)
    shards = build_shards(cfg, data, tokenizer)
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
    lines += ["", "![loss](loss.png)", "", "## Samples", ""]
    for s in report["samples"]:
        lines += [f"**Prompt:** `{s['prompt']}`", "", "```", s["prompt"] + s["completion"], "```", ""]
    lines += ["## Config", "", "```yaml", dump_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)
