"""Synthetic-data jobs: a YAML job file names a template and its seed material; ``synthesize`` runs it resumably.

A ``SynthJob`` plans one request per (seed item, sample index): seed items are the template's grid (topics x
audiences x styles) or the job's seed documents. Each request's id is a hash of (job name, seed item, template
name, sample index), so the same job plans the same ids on every run. The template's name, not its text, is
hashed: fixing a typo in a prompt does not re-request what is done (use a new job name to start over).

Output folder (``out_dir``; by default runs/synth/<job name>, under the git-ignored runs/):
  shards/NNNNN.jsonl   append-only records: id, template, seed, sample, prompt (the messages), raw (the teacher's
                       text), fields (parsed), text (the training text), model, usage, retries
  rejects.jsonl        id, reason, raw: answers that failed parsing or a check, and requests the server refused
  config.yaml, summary.json
Crash safety: every record is one line written by one ``os.write`` on an O_APPEND descriptor, so a crash or
SIGKILL can lose only the requests in flight. A rerun first cuts a torn last line (no newline: a write cut
short by power loss or a full disk) and then skips every id already in a shard, so no id is ever written
twice; ``.lock`` (flock) refuses a second run on the same folder at the same time.
Rejected ids count as done: a reject comes from the answer's content (format, length, a wrong sum) or a 4xx
refusal, and re-asking would mostly pay to fail the same way; ``retry_rejects=true`` asks again (their old
lines stay in rejects.jsonl; a success then also writes a record). Requests that ran out of retries are
neither written nor rejected, so the next run asks again.

Quality: ``parse_answer`` checks every answer as it arrives (prompts.py); ``clean`` then runs the data engine's
exact and MinHash dedup (dedup.py) and 13-gram decontamination (filters.py) over the shards, into dedup/ and
decontam/ (with ``dedup``/``decontaminate`` set, at the end of every run; the summary names the final folder).
A job with no accepted answer at all is an error naming the main reject reasons (``rejection_reasons``).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Iterator, Literal

from tqdm import tqdm

from slmforge.config import TextSplit, check_choice, dump_yaml, load
from slmforge.curate.documents import read_documents
from slmforge.curate.dedup import DedupConfig, dedup
from slmforge.curate.filters import GSM8K_TEST, FilterConfig, filter_corpus
from slmforge.progress import progress_bar
from slmforge.registry import lookup
from slmforge.runs import save_config, write_json
from slmforge.synth.prompts import (MATH_CHECKS, Reject, Template, load_template, parse_answer,
                                    render_messages, training_text)
from slmforge.synth.teacher import (TEACHERS, Completion, Request, RequestRejected, RetriesExhausted,
                                    RetryBudgetExhausted, TeacherConfig)


@dataclass
class SynthJob:
    name: str = "synth"  # part of every request id: a new name starts a new set of ids
    template: str = "textbook"  # a built-in template name or a template YAML path
    out_dir: str = ""  # "" = runs/synth/<name> (runs/ is git-ignored): one folder per job, never the clone's top
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    topics: list[str] = field(default_factory=list)  # grid templates: topics x audiences x styles
    audiences: list[str] = field(default_factory=lambda: ["high-school students"])
    styles: list[str] = field(default_factory=lambda: ["a clear, friendly textbook"])
    inputs: list[str] = field(default_factory=list)  # document templates: files, directories or globs
    text_field: str = "text"
    text_split: TextSplit = "blank_line"  # .txt/.md inputs
    max_seed_docs: int = 0  # 0 = all
    min_passage_chars: int = 0  # shorter seed documents (headings, captions) are skipped
    max_passage_chars: int = 4000  # longer passages are cut at a word boundary
    samples_per_item: int = 1
    max_requests: int = 0  # new requests per run; 0 = all
    records_per_shard: int = 10_000
    math_check: Literal["annotations", "strict", "none"] = "annotations"  # gsm8k templates (prompts.MATH_CHECKS)
    retry_rejects: bool = False  # ask again for ids in rejects.jsonl
    dedup: bool = False  # after the run: exact + MinHash near dedup of the shards into clean/
    decontaminate: bool = False  # after the run: drop records sharing a 13-gram with eval_paths
    eval_paths: list[str] = field(default_factory=lambda: [str(GSM8K_TEST)])
    eval_fields: list[str] = field(default_factory=lambda: ["question", "answer"])


def load_job(path: str | Path | None = None, overrides: list[str] | None = None) -> SynthJob:
    """Defaults < job YAML < ``key=value`` overrides (dotted, e.g. ``teacher.concurrency=16``); the teacher name
    is checked here against ``TEACHERS``, the table it names."""
    job = load(SynthJob, path, overrides)
    check_choice("teacher.name", job.teacher.name, TEACHERS)
    return job


def output_dir(job: SynthJob) -> Path:
    """The job's folder: ``out_dir``, else runs/synth/<name>."""
    return Path(job.out_dir or f"runs/synth/{job.name}")


def request_id(job_name: str, seed_key: str, template: str, sample: int) -> str:
    key = "\x1f".join((job_name, seed_key, template, str(sample)))
    return hashlib.blake2b(key.encode("utf-8"), digest_size=10).hexdigest()


def _seeds(job: SynthJob, t: Template) -> Iterator[tuple[str, dict]]:
    """(seed key, placeholder values) per seed item, in a fixed order."""
    if t.seed == "grid":
        if not job.topics:
            raise ValueError(f"template {t.name!r} needs topics: set topics: [...] in the job")
        grid = [list(dict.fromkeys(x)) for x in (job.topics, job.audiences, job.styles)]
        for topic, audience, style in product(*grid):
            yield json.dumps([topic, audience, style]), {"topic": topic, "audience": audience, "style": style}
        return
    if not job.inputs:
        raise ValueError(f"template {t.name!r} needs seed documents: set inputs: [files or globs] in the job")
    num_docs = 0
    for doc in read_documents(job.inputs, job.text_field, job.text_split):
        passage = doc.text.strip()
        if len(passage) < job.min_passage_chars:
            continue
        if job.max_seed_docs and num_docs >= job.max_seed_docs:
            break
        num_docs += 1
        if len(passage) > job.max_passage_chars:
            passage = passage[: job.max_passage_chars].rsplit(None, 1)[0]
        digest = hashlib.blake2b(passage.encode("utf-8"), digest_size=8).hexdigest()
        yield f"{doc.id}:{digest}", {"passage": passage, "doc_id": doc.id}


def plan_requests(job: SynthJob, t: Template) -> Iterator[Request]:
    """Every request of the job, ids unique, in a fixed order (seed item-major, then sample index)."""
    seen: set[str] = set()
    for seed_key, seed in _seeds(job, t):
        for sample in range(job.samples_per_item):
            rid = request_id(job.name, seed_key, t.name, sample)
            if rid not in seen:
                seen.add(rid)
                yield Request(rid, t.name, t.procedural, render_messages(t, seed), seed, sample, list(t.fields))


# ---------------------------------------------------------------- append-only storage


def _repair(path: Path) -> list[bytes]:
    """The complete lines of a JSONL file, after cutting a torn last line (one without a newline) off it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end].splitlines()


def _ids(path: Path, lines: list[bytes]) -> list[str]:
    out = []
    for k, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} line {k}: not a synth record (expected JSON with an 'id'); "
                             f"move the file away or repair it") from None
    return out


class Store:
    """Shards of records plus rejects.jsonl, appended one whole line per ``os.write`` (see the module docstring)."""

    def __init__(self, out_dir: Path, records_per_shard: int):
        self.shard_dir, self.records_per_shard = out_dir / "shards", records_per_shard
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        # Two runs appending to one folder would write ids twice. The kernel drops the lock when its process
        # dies, SIGKILL included, so a crashed run never blocks the next one.
        self.lock = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock)
            raise ValueError(f"{out_dir}: another synth run is writing to this folder") from None
        self.written: set[str] = set()
        shards, lines = sorted(self.shard_dir.glob("*.jsonl")), []
        for path in shards:
            lines = _repair(path)
            self.written.update(_ids(path, lines))
        self.shard_index, self.shard_count = (int(shards[-1].stem) if shards else 0), len(lines)
        self.rejects_path = out_dir / "rejects.jsonl"
        self.rejected = set(_ids(self.rejects_path, _repair(self.rejects_path)))
        self.fds: dict[Path, int] = {}

    def _append(self, path: Path, record: dict) -> None:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        while line:  # a regular file takes the whole line in one write unless the disk is full
            line = line[os.write(self.fds[path], line):]

    def write_record(self, record: dict) -> None:
        if self.shard_count >= self.records_per_shard:
            self.shard_index, self.shard_count = self.shard_index + 1, 0
        self._append(self.shard_dir / f"{self.shard_index:05d}.jsonl", record)
        self.shard_count += 1
        self.written.add(record["id"])

    def write_reject(self, record: dict) -> None:
        self._append(self.rejects_path, record)
        self.rejected.add(record["id"])

    def close(self) -> None:
        for fd in [*self.fds.values(), self.lock]:
            os.close(fd)
        self.fds.clear()


# ---------------------------------------------------------------- running


class _Run:
    """One run's counters and the handling of each finished request (all in the event loop's one thread)."""

    def __init__(self, job: SynthJob, t: Template, store: Store, teacher, bar: tqdm):
        self.job, self.t, self.store, self.teacher, self.bar = job, t, store, teacher, bar
        self.requested = self.written = self.rejected = self.failed = 0
        self.stopped: str | None = None

    def finish(self, request: Request, result: Completion | BaseException) -> None:
        if isinstance(result, Completion):
            try:
                fields = parse_answer(result.text, self.t, result.finish_reason, self.job.math_check)
            except Reject as exc:
                self._reject(request, str(exc), result.text)
            else:
                self.store.write_record(dict(
                    id=request.id, template=request.template, seed=request.seed, sample=request.sample,
                    prompt=request.messages, raw=result.text, fields=fields,
                    text=training_text(self.t, fields, request.seed, result.text), model=result.model,
                    usage=dict(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
                    retries=result.retries))
                self.written += 1
        elif isinstance(result, RequestRejected):
            self._reject(request, str(result), None)
        elif isinstance(result, RetryBudgetExhausted):
            self.failed += 1
            self.stopped = str(result)
        elif isinstance(result, RetriesExhausted):
            self.failed += 1
        else:
            raise result
        usage = self.teacher.usage()
        self.bar.set_postfix(done=self.written, rejected=self.rejected, retries=self.teacher.retries,
                             tokens=usage["prompt_tokens"] + usage["completion_tokens"], refresh=False)
        self.bar.update()

    def _reject(self, request: Request, reason: str, raw: str | None) -> None:
        self.store.write_reject(dict(id=request.id, template=request.template, seed=request.seed,
                                     sample=request.sample, reason=reason, raw=raw))
        self.rejected += 1


async def _one(teacher, request: Request) -> tuple[Request, Completion | BaseException]:
    try:
        return request, await teacher.complete(request)
    except Exception as exc:
        return request, exc


async def _drive(run: _Run, todo: Iterator[Request], window: int) -> None:
    """Keep up to ``window`` requests in flight (the teacher's semaphore bounds the real concurrency)."""
    pending: set[asyncio.Task] = set()
    try:
        for request in todo:
            if run.stopped or (run.job.max_requests and run.requested >= run.job.max_requests):
                break
            while len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    run.finish(*task.result())
            pending.add(asyncio.create_task(_one(run.teacher, request)))
            run.requested += 1
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                run.finish(*task.result())
    finally:
        for task in pending:
            task.cancel()
        await run.teacher.close()


def synthesize(job: SynthJob, progress: bool = True, teacher=None) -> dict:
    """Run ``job`` (resuming a previous run in ``job.out_dir``) and return the summary, also in summary.json; a
    ValueError when no answer was accepted. ``teacher`` replaces the one ``job.teacher`` describes (tests and
    benchmarks pass mock transports); it is closed at the end."""
    start, out = time.perf_counter(), output_dir(job)
    lookup({m: m for m in MATH_CHECKS}, job.math_check, "math_check")
    if job.samples_per_item < 1 or job.records_per_shard < 1 or job.teacher.concurrency < 1:
        raise ValueError("samples_per_item, records_per_shard and teacher.concurrency must be at least 1")
    t = load_template(job.template)
    teacher = teacher or lookup(TEACHERS, job.teacher.name, "teacher")(job.teacher)
    save_config(out, job)
    store = Store(out, job.records_per_shard)
    try:
        done = store.written | (set() if job.retry_rejects else store.rejected)
        planned = [r.id for r in plan_requests(job, t)]  # a first pass, for the counts and the progress bar
        num_skipped = sum(rid in done for rid in planned)
        num_todo = len(planned) - num_skipped
        todo = (r for r in plan_requests(job, t) if r.id not in done)
        with progress_bar(total=min(num_todo, job.max_requests or num_todo), desc=f"synth {job.name}", unit="req",
                  disable=not progress) as bar:
            run = _Run(job, t, store, teacher, bar)
            asyncio.run(_drive(run, todo, 2 * job.teacher.concurrency))
    finally:
        store.close()
    seconds = time.perf_counter() - start
    finished = store.written | store.rejected
    summary = dict(
        job=job.name, template=t.name, model=getattr(teacher, "model", ""), planned=len(planned),
        skipped_existing=num_skipped, requested=run.requested, written=run.written, rejected=run.rejected,
        failed=run.failed, retries=teacher.retries, retry_reasons=dict(teacher.retry_reasons),
        usage=teacher.usage(), seconds=round(seconds, 3),
        requests_per_second=round(run.requested / max(seconds, 1e-9), 2), stopped=run.stopped,
        complete=all(rid in finished for rid in planned), total_written=len(store.written),
        total_rejected=len(store.rejected), out_dir=str(out))
    if (job.dedup or job.decontaminate) and store.written:
        summary["clean"] = clean(job)
    write_json(out / "summary.json", summary)
    _check_accepted(summary, out / "rejects.jsonl")
    return summary


def _check_accepted(summary: dict, rejects: Path) -> None:
    """Every answered request rejected is an error naming the main reasons; more rejected than accepted a warning."""
    planned, written, rejected = summary["planned"], summary["total_written"], summary["total_rejected"]
    if not rejected or written >= rejected:
        return
    top = "; ".join(f"{kind} ({n:,}, e.g. {ex!r})" for kind, (n, ex) in list(rejection_reasons(rejects).items())[:3])
    if not written:
        raise ValueError(f"synth {summary['job']}: 0 of {planned:,} requests accepted, {rejected:,} rejected: {top}; "
                         f"all in {rejects} (fix the template or teacher, then rerun with retry_rejects=true)")
    print(f"synth {summary['job']}: warning: {rejected:,} rejected, {written:,} accepted: {top}", file=sys.stderr)


def rejection_reasons(rejects: Path) -> dict[str, tuple[int, str]]:
    """{reason kind: (ids, the first message)} of rejects.jsonl, most frequent first; a kind is the message up to
    its first colon, numbers as N but for HTTP ("http 400", "math check", "N words, outside [N, N]")."""
    lines = rejects.read_text(encoding="utf-8").splitlines() if rejects.exists() else []
    last = {r["id"]: str(r.get("reason", "")) for r in map(json.loads, lines)}  # an id asked again: its last
    kinds: dict[str, list] = {}
    for reason in last.values():
        kind = reason.split(":")[0].strip()[:60]
        kinds.setdefault(kind if kind.startswith("http") else re.sub(r"\d+", "N", kind), [0, reason[:160]])[0] += 1
    return {k: (n, example) for k, (n, example) in sorted(kinds.items(), key=lambda kv: -kv[1][0])}


def preview(job: SynthJob) -> str:
    """For ``--dry-run``: the resolved job, the number of requests it plans, and the first request's messages."""
    t = load_template(job.template)
    requests = plan_requests(job, t)
    first = next(requests, None)
    num_planned = (first is not None) + sum(1 for _ in requests)
    messages = "\n".join(f"[{m['role']}]\n{m['content']}" for m in (first.messages if first else []))
    return f"{dump_yaml(job)}# template {t.name}: {num_planned} requests planned; the first:\n{messages}"


def clean(job: SynthJob) -> dict:
    """The quality post-step: dedup (exact + MinHash) then 13-gram decontamination of the shards.

    Reads ``shards/``, writes ``dedup/`` and ``decontam/`` (rebuilt on every call: the shards grow between runs)
    and returns the counts and ``clean_dir``, the folder whose JSONL files hold the surviving records.
    """
    out = output_dir(job)
    inputs, report = str(out / "shards"), {}
    for folder in ("dedup", "decontam"):
        shutil.rmtree(out / folder, ignore_errors=True)
    if job.dedup:
        r = dedup(DedupConfig(inputs=[inputs], out_dir=str(out / "dedup"), num_workers=1))["clusters"]
        report["dedup"] = {k: r[k] for k in ("num_docs", "num_removed", "num_exact_removed", "num_near_removed")}
        inputs = str(out / "dedup" / "kept")
    if job.decontaminate:
        r = filter_corpus(FilterConfig(inputs=[inputs], out_dir=str(out / "decontam"), quality=False,
                                       eval_paths=job.eval_paths, eval_fields=job.eval_fields))
        report["decontaminate"] = {k: r[k] for k in ("num_docs", "num_removed", "num_eval_items_matched")}
        inputs = str(out / "decontam" / "kept")
    return dict(report, clean_dir=inputs)


def main(argv: list[str] | None = None) -> int:
    """``python -m slmforge.synth.jobs JOB.yaml [key=value ...]``; exit status 1 if ids are left to do."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m slmforge.synth.jobs", description=__doc__.split("\n")[0])
    p.add_argument("job", help="job YAML (see recipes/synth_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. teacher.concurrency=16 max_requests=10")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    summary = synthesize(load_job(args.job, args.overrides), progress=not args.no_progress)
    print(json.dumps(summary))
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
