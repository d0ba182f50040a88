"""One driver for document steps: read, take this shard, pipe through the steps, write what they keep.

``run_steps(steps, inputs, out_dir)`` streams the documents of ``inputs`` (files, directories or globs; a bad
record is skipped and counted), takes shard ``rank`` of ``num_shards`` with ``shard_of`` (every num_shards-th
document, so the shards are disjoint and cover the input), pipes it through each ``Step`` in order and writes

  out_dir/kept/RANK-of-N.jsonl     the documents every step kept, in input order
  out_dir/removed/RANK-of-N.jsonl  id, reason and details of each document a step dropped
  out_dir/reports/RANK-of-N.json   num_docs, num_kept, num_removed, removed (per reason), read, examples, ...
  out_dir/report.json              the shards' reports merged, once every shard's report exists

each atomically. ``shard_index=None`` runs every shard in turn, in a temporary folder moved into place at the end;
a job array runs one shard index per task, in place. Reading no document, or skipping more than half the records,
is an error (``documents.check_read``); some skipped records, or no document kept, are a warning line on stderr.

A step tells the driver what it drops through an ``on_drop(doc, record)`` attribute (``record["reason"]``
names the rule), which the driver points at the shard's ``DropLog``. A step without one still has its
drops counted, under its class name, from the documents that went in and came out.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from slmforge.curate.dedup import skip_reason
from slmforge.curate.documents import (Document, DropStep, ReadStats, Step, checked, read_documents, read_warning,
                                      shard_of, write_jsonl)
from slmforge.runs import atomic_path, save_config, staged_dir, write_json


class DropLog:
    """Counts drops by reason, keeps a few examples per reason and writes every record to ``file`` (JSONL).

    A record with an ``eval_item`` (decontamination's evidence) is also tallied per evaluation item.
    """

    def __init__(self, num_examples: int):
        self.num_examples = num_examples
        self.counts: Counter = Counter()
        self.eval_items: Counter = Counter()
        self.examples: dict[str, list] = {}
        self.file: IO[str] | None = None

    def __call__(self, doc: Document, record: dict) -> None:
        record = {"id": doc.id, **record}
        self.counts[record["reason"]] += 1
        if "eval_item" in record:
            self.eval_items[record["eval_item"]] += 1
        examples = self.examples.setdefault(record["reason"], [])
        if len(examples) < self.num_examples:
            examples.append(dict(record, head=doc.text[:200]))
        if self.file is not None:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")


class DocumentGuard(DropStep):
    """Step: drops empty, too large and unencodable documents (``dedup.skip_reason``) before any other step."""

    def __init__(self, max_doc_bytes: int, on_drop=None):
        self.max_doc_bytes, self.on_drop = max_doc_bytes, on_drop

    def why_dropped(self, doc: Document) -> dict | None:
        reason = skip_reason(doc.text, self.max_doc_bytes)
        return None if reason is None else {"reason": reason}


def shard_name(rank: int, num_shards: int) -> str:
    return f"{rank:05d}-of-{num_shards:05d}"


def check_shard(label: str, shard_index: int | None, num_shards: int) -> None:
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ValueError(f"{label}: shard_index must be in [0, {num_shards}), got {shard_index}")


def _counted(docs: Iterable[Document], counts: list[int], k: int) -> Iterator[Document]:
    for doc in docs:
        counts[k] += 1
        yield doc


def run_shard(steps: list[Step], inputs: list[str], out_dir: str | Path, rank: int, num_shards: int,
              text_field: str = "text", text_split: str = "file", num_examples: int = 5, label: str = "steps") -> dict:
    """Run ``steps`` over shard ``rank`` of ``inputs``; write its kept, removed and report files; return the report.

    Reading no document, or skipping most records, is a ValueError (``documents.check_read``) before the shard's
    kept and removed files are renamed into place.
    """
    start, out, name = time.perf_counter(), Path(out_dir), shard_name(rank, num_shards)
    stats, log = ReadStats(), DropLog(num_examples)
    # counts[k]: documents into step k; counts[-1]: documents out of the last step
    counts = [0] * (len(steps) + 1)
    # keep_raw: a kept document that no step changed is written as the JSON line it was read from.
    docs = checked(read_documents(inputs, text_field, text_split, stats, on_error="skip", keep_raw=True), stats, label,
                   inputs, text_field)
    docs = _counted(shard_of(docs, rank, num_shards), counts, 0)
    for k, step in enumerate(steps):
        if hasattr(step, "on_drop"):
            step.on_drop = log
        docs = _counted(step.run(docs, rank, num_shards), counts, k + 1)
    with atomic_path(out / "removed" / f"{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        log.file = f
        num_kept = write_jsonl(out / "kept" / f"{name}.jsonl", docs, text_field)
    log.file = None
    for k, step in enumerate(steps):
        if not hasattr(step, "on_drop") and counts[k] > counts[k + 1]:
            log.counts[type(step).__name__] += counts[k] - counts[k + 1]
    report = dict(num_docs=counts[0], num_kept=num_kept, num_removed=sum(log.counts.values()),
                  removed=dict(log.counts.most_common()), read=asdict(stats), num_bytes=stats.num_bytes,
                  eval_items=dict(log.eval_items.most_common()), examples=log.examples,
                  seconds=round(time.perf_counter() - start, 3))
    write_json(out / "reports" / f"{name}.json", report)
    return report


def merge_reports(reports: list[dict], num_examples: int) -> dict:
    """One report for the whole input from the per-shard reports."""
    removed: Counter = Counter()
    eval_items: Counter = Counter()
    examples: dict[str, list] = {}
    for r in reports:
        removed.update(r["removed"])
        eval_items.update(r["eval_items"])
        for reason, items in r["examples"].items():
            examples[reason] = (examples.get(reason, []) + items)[:num_examples]
    # Every shard reads all input (shard_of), so the reader's counts are the same in each: take one.
    return dict(num_docs=sum(r["num_docs"] for r in reports), num_kept=sum(r["num_kept"] for r in reports),
                num_removed=sum(removed.values()), removed=dict(removed.most_common()), read=reports[0]["read"],
                num_eval_items_matched=len(eval_items), eval_items=dict(eval_items.most_common(20)),
                examples=examples, seconds=round(sum(r["seconds"] for r in reports), 3), num_shards=len(reports))


def run_steps(steps: list[Step], inputs: list[str], out_dir: str | Path, shard_index: int | None = None,
              num_shards: int = 1, text_field: str = "text", text_split: str = "file", num_examples: int = 5,
              label: str = "steps", config: dict | None = None, save: object | None = None,
              map_shards: Callable = map) -> dict:
    """Run ``steps`` over ``inputs`` into ``out_dir`` (see the module docstring); return the merged report once
    every shard is done (with ``config`` added when given), else the report of the last shard run here.

    ``label`` starts the progress lines and errors ("filter 0-of-4: kept ..."); ``save``, a config dataclass, is
    written as config.yaml beside the outputs. Every shard at once (``shard_index=None``) is written to a temporary
    folder beside ``out_dir`` and moved into place when all succeeded, so a failure leaves ``out_dir`` as it was;
    one shard of a job array writes in place. ``map_shards(fn, ranks)`` runs ``run_shard`` for each rank, in turn
    (the builtin ``map``) or as Ray tasks (``curate/executor.py``); this process prints and merges.
    """
    check_shard(label, shard_index, num_shards)
    if shard_index is not None:
        if save is not None:
            save_config(out_dir, save)
        return _run_steps(steps, inputs, Path(out_dir), [shard_index], num_shards, text_field, text_split,
                          num_examples, label, config, map_shards)
    with staged_dir(out_dir, last=("report.json",)) as tmp:
        if save is not None:
            save_config(tmp, save)
        return _run_steps(steps, inputs, tmp, range(num_shards), num_shards, text_field, text_split, num_examples,
                          label, config, map_shards)


def _run_steps(steps: list[Step], inputs: list[str], out: Path, ranks, num_shards: int, text_field: str,
               text_split: str, num_examples: int, label: str, config: dict | None, map_shards: Callable) -> dict:
    shard = functools.partial(run_shard, steps, inputs, out, num_shards=num_shards, text_field=text_field,
                              text_split=text_split, num_examples=num_examples, label=label)
    for rank, report in zip(ranks, map_shards(shard, ranks)):
        print(f"{label} {rank}-of-{num_shards}: kept {report['num_kept']:,} of {report['num_docs']:,} documents "
              f"({report['num_bytes'] / 1e6 / max(report['seconds'], 1e-9):.1f} MB/s)")
    warning = read_warning(ReadStats(**report["read"]), label, inputs, text_field)
    if warning:
        print(warning, file=sys.stderr)
    paths = [out / "reports" / f"{shard_name(r, num_shards)}.json" for r in range(num_shards)]
    if not all(p.exists() for p in paths):
        return report
    merged = merge_reports([json.loads(p.read_text()) for p in paths], num_examples)
    if config is not None:
        merged["config"] = config
    write_json(out / "report.json", merged)
    if merged["num_docs"] and not merged["num_kept"]:
        print(f"{label}: warning: kept 0 of {merged['num_docs']:,} documents (removed: {merged['removed']})",
              file=sys.stderr)
    return merged
