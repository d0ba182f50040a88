"""The data stages of ``slmforge run``: the corpus splits, the optional curation stages, the tokenizer, the shards.

Every path comes from ``RunDir``. A corpus file is named by its *key*: ``train``, ``validation``, ``test`` and, with
``data.sources``, ``<source>/<split>``. Curation cleans the training keys only (``train`` and each
``<source>/train``): the held-out splits are neither deduplicated nor decontaminated. Each enabled curation stage
(``curate.dedup``, ``curate.quality``, ``curate.decontaminate``, in that order) reads the previous one's kept
documents (the first reads data/<key>.jsonl) and writes curate/<stage>/<key>/ (kept/, report.json, ...); the
tokenizer and the shards then read the last one's kept documents. With curation off they read data/<key>.jsonl,
exactly as before curation existed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

from slmforge.config import DataConfig, RunConfig, merge
from slmforge.curate.dedup import DedupConfig, dedup
from slmforge.curate.documents import Document, expand_paths, read_documents, write_jsonl
from slmforge.curate.filters import GSM8K_TEST, FilterConfig, filter_corpus
from slmforge.curate.steps import shard_name
from slmforge.log import log
from slmforge.runs import RunDir
from slmforge.synth.procedural import build_corpus
from slmforge.tokens.mixture import MixtureConfig
from slmforge.tokens.shards import tokenize_to_shards
from slmforge.tokens.tokenizer import train_tokenizer

SPLITS = ("train", "validation", "test")
CURATION = ("dedup", "quality", "decontaminate")


# ---------------------------------------------------------------- corpus


def read_corpus(d: DataConfig, where: str = "data") -> dict[str, list[Document]]:
    """``{split: [Document]}`` of one corpus described by data keys (source, families, paths, ...).

    source=files: a split with files in ``val_paths``/``test_paths`` is exactly their documents; the other
    documents go to validation when a stable hash of their text falls below ``val_fraction``, to test when it
    falls in the next ``test_fraction``, else to train. A split with neither paths nor a fraction stays empty.
    """
    if d.source == "procedural":
        return build_corpus(d.families, d.num_train_docs, d.num_val_docs, d.num_test_docs, d.seed)
    if d.source != "files":
        raise ValueError(f"{where}.source={d.source!r}: choose 'procedural' or 'files'")
    if not d.paths:
        raise ValueError(f"{where}.source=files needs {where}.paths (files or globs of text/JSONL/Parquet)")
    files = split_files(d, where)
    corpus = {split: list(_documents(d, files[split])) if split != "train" else [] for split in SPLITS}
    val_end = 0.0 if d.val_paths else d.val_fraction
    test_end = val_end + (0.0 if d.test_paths else d.test_fraction)
    for doc in _documents(d, files["train"]):
        # A stable hash decides the split, so the same document always lands in the same one.
        h = int(hashlib.sha1(doc.text.encode()).hexdigest()[:8], 16) / 2**32
        corpus["validation" if h < val_end else "test" if h < test_end else "train"].append(doc)
    _check_splits(d, corpus, where)
    return corpus


def _documents(d: DataConfig, files: list[Path]):
    return read_documents(files, text_field=d.text_field, text_split=d.text_split, chunk_chars=d.chunk_chars)


HELD_OUT = {"validation": "val", "test": "test"}  # split -> the prefix of its data keys (val_paths, val_fraction)


def split_files(d: DataConfig, where: str = "data") -> dict[str, list[Path]]:
    """``{split: files}``: the held-out files of ``val_paths`` and ``test_paths``, and the files of ``paths`` that
    neither lists (compared as resolved paths), whose documents make train and the fraction-based splits."""
    files, held = {}, {}
    for split, key in HELD_OUT.items():
        files[split] = _expand(getattr(d, f"{key}_paths"), f"{where}.{key}_paths")
        for path in files[split]:
            other = held.setdefault(path.resolve(), split)
            if other != split:
                raise ValueError(f"{path} is listed in both {where}.val_paths and {where}.test_paths: "
                                 f"hold a file out once")
    files["train"] = [p for p in _expand(d.paths, f"{where}.paths") if p.resolve() not in held]
    if not files["train"]:
        raise ValueError(f"{where}.paths: every file is held out by {where}.val_paths or {where}.test_paths; "
                         f"leave some files to train on")
    return files


def _expand(patterns: list[str], key: str) -> list[Path]:
    try:
        return expand_paths(patterns) if patterns else []
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _check_splits(d: DataConfig, corpus: dict[str, list[Document]], where: str) -> None:
    """A split that should hold documents and got none is an error naming the keys that fix it."""
    num_docs = sum(len(docs) for docs in corpus.values())
    fix = (f"raise {where}.{{key}}_fraction, list held-out files in {where}.{{key}}_paths, or cut plain text into "
           f"more documents ({where}.text_split=chunk, smaller {where}.chunk_chars)")
    if not corpus["train"]:
        raise ValueError(f"{where}: the train split got none of the {num_docs} documents; lower "
                         f"{where}.val_fraction and {where}.test_fraction, or cut plain text into more documents "
                         f"({where}.text_split=chunk)")
    for split, key in HELD_OUT.items():
        if corpus[split]:
            continue
        if getattr(d, f"{key}_paths"):
            raise ValueError(f"{where}.{key}_paths: the files hold no documents (only empty text)")
        if getattr(d, f"{key}_fraction") > 0:
            raise ValueError(f"{where}: the {split} split got none of the {num_docs} documents at "
                             f"{where}.{key}_fraction={getattr(d, f'{key}_fraction')}; " + fix.format(key=key))


def source_configs(cfg: RunConfig) -> dict[str, DataConfig]:
    """Each ``data.sources`` entry as a whole DataConfig: the top-level data keys, then the entry's own."""
    base = dataclasses.replace(cfg.data, sources={}, mixture=MixtureConfig())
    out = {}
    for name, keys in cfg.data.sources.items():
        if not isinstance(keys, dict) or {"sources", "mixture", "tokenizer", "shards_dir", "split_digits"} & set(keys):
            raise ValueError(f"data.sources.{name}: expected a mapping of corpus keys (source, families, paths, "
                             f"num_train_docs, ...), got {keys!r}")
        out[name] = merge(base, keys, f"data.sources.{name}")
    return out


def data_keys(cfg: RunConfig) -> list[str]:
    """Every corpus file: the splits, then with data.sources each "<source>/<split>"."""
    names = [""] + [f"{name}/" for name in cfg.data.sources]
    return [f"{name}{split}" for name in names for split in SPLITS]


def build_data(cfg: RunConfig) -> dict[str, Path]:
    """Write the corpus splits as JSONL under <run_dir>/data; return their paths.

    With ``data.sources`` each source is written to <run_dir>/data/<name>/, and <run_dir>/data/ holds them all.
    """
    run = RunDir.of(cfg)
    if not cfg.data.sources:
        corpus = read_corpus(cfg.data)
    else:
        corpus = {s: [] for s in SPLITS}
        for name, d in source_configs(cfg).items():
            part = read_corpus(d, f"data.sources.{name}")
            for split in SPLITS:
                n = write_jsonl(run.split_data(f"{name}/{split}"), part[split])
                log(f"data: {name}/{split}: {n} documents")
                corpus[split] += part[split]
        # Interleaved, so that the first validation batches (all the training loop scores) hold every source.
        for split in SPLITS:
            random.Random(f"{cfg.data.seed}:{split}").shuffle(corpus[split])
    if not corpus["validation"]:
        raise ValueError("data: the validation split is empty, and training scores one; hold out documents with "
                         "data.val_fraction (e.g. 0.05) or data.val_paths (source=files), or data.num_val_docs")
    out = {split: run.split_data(split) for split in SPLITS}
    for split, path in out.items():
        n = write_jsonl(path, corpus[split])
        log(f"data: {split}: {n} documents -> {path}")
    return out


def data_done(cfg: RunConfig) -> bool:
    """The splits are written, or the tokenizer and every shard exist already (then the corpus is not needed)."""
    run = RunDir.of(cfg)
    return all(run.split_data(s).exists() for s in SPLITS) or (tokenizer_done(cfg) and shards_done(cfg))


# ---------------------------------------------------------------- curation


def curation_stages(cfg: RunConfig) -> list[str]:
    """The enabled curation stages, in the order they run."""
    return [stage for stage in CURATION if getattr(cfg.curate, stage)]


def train_keys(cfg: RunConfig) -> list[str]:
    """The corpus files curation cleans: the train split, and each source's train split."""
    return ["train"] + [f"{name}/train" for name in cfg.data.sources]


def curation_dir(cfg: RunConfig, stage: str, key: str) -> Path:
    return RunDir.of(cfg).curate / stage / key


def documents_of(cfg: RunConfig, key: str) -> Path:
    """What the tokenizer and shards read for ``key``: a train key's last curated output, else data/<key>.jsonl."""
    stages = curation_stages(cfg)
    if stages and key in train_keys(cfg):
        return curation_dir(cfg, stages[-1], key) / "kept"
    return RunDir.of(cfg).split_data(key)


def curation_done(cfg: RunConfig, stage: str) -> bool:
    """Every train key has the stage's kept documents and report, or the tokenizer and shards exist already."""
    folders = [curation_dir(cfg, stage, key) for key in train_keys(cfg)]
    finished = all((f / "report.json").exists() and (f / "kept" / f"{shard_name(0, 1)}.jsonl").exists()
                   for f in folders)
    return finished or (tokenizer_done(cfg) and shards_done(cfg))


def curate(cfg: RunConfig, stage: str) -> dict[str, dict]:
    """Run curation ``stage`` on every train key; return {key: counts}.

    With ``data.sources`` the sources are curated one by one and the union ``train`` (the tokenizer's documents)
    is their kept documents put together, so the two never disagree; a source in ``curate.quality_skip`` passes
    the quality stage unchanged."""
    stages = curation_stages(cfg)
    previous = stages[stages.index(stage) - 1] if stages.index(stage) else None
    unknown = sorted(set(cfg.curate.quality_skip) - set(cfg.data.sources))
    if unknown:
        raise ValueError(f"curate.quality_skip names {unknown}, not in data.sources {sorted(cfg.data.sources)}")
    out = {}
    keys = train_keys(cfg)
    for key in keys[1:] + keys[:1] if cfg.data.sources else keys:
        source = curation_dir(cfg, previous, key) / "kept" if previous else RunDir.of(cfg).split_data(key)
        folder = curation_dir(cfg, stage, key)
        if key == "train" and cfg.data.sources:
            _concatenate([curation_dir(cfg, stage, k) for k in keys[1:]], folder)
        elif stage == "quality" and key.split("/")[0] in cfg.curate.quality_skip:
            _pass_through(source, folder)
        else:
            _CURATORS[stage](cfg, str(source), str(folder))
        out[key] = curation_counts(folder / "report.json")
        log(f"{stage}: {key}: removed {out[key]['num_removed']:,} of {out[key]['num_docs']:,} documents -> {folder}")
    return out


def _concatenate(inputs: list[Path], folder: Path) -> None:
    """``folder``/kept holding the kept documents of the curation folders ``inputs``, byte for byte, with a
    report.json summing their counts (the union of the sources)."""
    counts = {"num_docs": 0, "num_kept": 0, "num_removed": 0, "removed": {}}
    for path in inputs:
        c = curation_counts(path / "report.json")
        for k in ("num_docs", "num_kept", "num_removed"):
            counts[k] += c[k]
        for reason, n in c["removed"].items():
            counts["removed"][reason] = counts["removed"].get(reason, 0) + n
    _write_kept([f for path in inputs for f in sorted((path / "kept").glob("*.jsonl"))], folder, counts)


def _pass_through(source: Path, folder: Path) -> None:
    """``folder``/kept holding ``source``'s documents unchanged (a JSONL file or a kept/ folder): nothing removed."""
    files = sorted(source.glob("*.jsonl")) if source.is_dir() else [source]
    n = sum(1 for _ in read_documents(source))
    _write_kept(files, folder, {"num_docs": n, "num_kept": n, "num_removed": 0, "removed": {}, "passed_through": True})


def _write_kept(files: list[Path], folder: Path, counts: dict) -> None:
    kept = folder / "kept"
    kept.mkdir(parents=True, exist_ok=True)
    with open(kept / f"{shard_name(0, 1)}.jsonl", "wb") as dst:
        for f in files:
            data = f.read_bytes()
            dst.write(data if not data or data.endswith(b"\n") else data + b"\n")
    (folder / "report.json").write_text(json.dumps(counts))  # last: the stage counts as done only once it exists


def _dedup(cfg: RunConfig, source: str, out_dir: str) -> None:
    dedup(DedupConfig(inputs=[source], out_dir=out_dir, threshold=cfg.curate.dedup_threshold,
                      num_workers=max(cfg.data.num_workers, 1)))


def _quality(cfg: RunConfig, source: str, out_dir: str) -> None:
    filter_corpus(FilterConfig(inputs=[source], out_dir=out_dir, quality=True, decontaminate=False))


def _decontaminate(cfg: RunConfig, source: str, out_dir: str) -> None:
    filter_corpus(FilterConfig(inputs=[source], out_dir=out_dir, quality=False, decontaminate=True,
                               eval_paths=cfg.curate.eval_paths or [str(GSM8K_TEST)],
                               eval_fields=cfg.curate.eval_fields))


_CURATORS = {"dedup": _dedup, "quality": _quality, "decontaminate": _decontaminate}


def curation_counts(report_path: Path) -> dict:
    """A curation stage's report.json as {num_docs, num_kept, num_removed, removed: {reason: count}}."""
    r = json.loads(report_path.read_text())
    # dedup's report counts exact and near duplicates; the filters' count every drop reason
    removed = r["removed"] if "removed" in r else {"exact": r["num_exact_removed"], "near": r["num_near_removed"]}
    return dict(num_docs=r["num_docs"], num_kept=r["num_kept"], num_removed=r["num_removed"], removed=removed)


def curation_summary(cfg: RunConfig) -> dict[str, dict]:
    """{stage: {key: counts}} for the enabled curation stages, read back from their reports."""
    out = {}
    for stage in curation_stages(cfg):
        for key in train_keys(cfg):
            path = curation_dir(cfg, stage, key) / "report.json"
            if path.exists():
                out.setdefault(stage, {})[key] = curation_counts(path)
    return out


# ---------------------------------------------------------------- tokenizer and shards


def tokenizer_done(cfg: RunConfig) -> bool:
    return RunDir.of(cfg).tokenizer.exists()


def build_tokenizer(cfg: RunConfig) -> Path:
    """Train the BPE tokenizer on the training documents (the curated ones when curation is on)."""
    path, t0 = RunDir.of(cfg).tokenizer, time.perf_counter()
    texts = (doc.text for doc in read_documents(documents_of(cfg, "train")))
    tok = train_tokenizer(texts, cfg.model.vocab_size, path, split_digits=cfg.data.split_digits)
    log(f"tokenizer: {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s -> {path}")
    return path


def shard_dirs(cfg: RunConfig) -> dict[str, Path]:
    """Shard folder per split ("train", ...) and, with data.sources, per "<source>/<split>"."""
    run = RunDir.of(cfg)
    return {key: run.split_shards(key) for key in data_keys(cfg)}


def shards_done(cfg: RunConfig) -> bool:
    return all((d / "meta.json").exists() for d in shard_dirs(cfg).values())


def build_shards(cfg: RunConfig) -> dict[str, Path]:
    """Tokenize every corpus file that has no finished shard folder yet; return all the shard folders."""
    out, tokenizer = shard_dirs(cfg), RunDir.of(cfg).tokenizer
    for key, shard_dir in out.items():
        if (shard_dir / "meta.json").exists():
            continue
        texts = (doc.text for doc in read_documents(documents_of(cfg, key)))
        # A held-out split may be empty (test_fraction=0); a train split without documents is an error.
        meta = tokenize_to_shards(texts, tokenizer, shard_dir, num_workers=cfg.data.num_workers,
                                  allow_empty=key not in train_keys(cfg))
        log(f"shards: {key}: {meta['num_tokens']:,} tokens from {meta['num_docs']:,} documents")
    return out
