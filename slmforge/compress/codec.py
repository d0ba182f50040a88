"""``compress`` and ``decompress``: bytes in, bytes out, with a run folder's model (``slmforge compress``).

The input is cut into segments (``segments.py``): text the model codes, raw bytes apart. The text segments' tokens,
back to back, are cut into chunks of ``chunk_tokens``; each chunk is coded on its own, its context restarting at
EOS, and within a chunk the model sees up to ``context`` tokens (a sliding window, ``lm.drive``). Chunks are coded
``batch_rows`` at a time as the rows of one batch (consecutive chunks, as evenly as they go), and the batches are
spread over ``workers`` processes of one thread each. The schedule depends on the file and the settings, never on
``workers``, and is recorded in the file, so the output bytes are the same for any number of workers and the
decompressor runs the same schedule with its own. A decoding step reads every weight from memory whatever the
number of rows, so rows are nearly free up to a few dozen: ``chunk_tokens=0`` (the default) makes chunks short
enough for two full batches (two busy processes), between 256 and 2048 tokens. Longer chunks give a better ratio
(more context), more rows a faster coder (``benchmarks/compress.py`` measures both).

Decompression checks, in this order and before writing anything: the file's format and checksums
(``container.unpack``), the model's identity, the probe fingerprint (this machine computes the same probabilities),
and at the end the CRC32 and length of the original.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import queue
import time
import zlib
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from slmforge.checkpoint import load_for_inference
from slmforge.compress import container, lm, segments
from slmforge.progress import progress_bar

AUTO_CHUNK_MIN, AUTO_CHUNK_MAX = 256, 2048  # chunk_tokens=0: the chunk length's bounds
MIN_TOKENS_PER_PROCESS = 8192  # below this a worker process costs more to start than it saves
_WORKER: dict = {}  # in a worker process: the model, its EOS id and the progress queue


@dataclasses.dataclass
class Stats:
    original_bytes: int
    compressed_bytes: int
    num_tokens: int
    seconds: float

    @property
    def bits_per_byte(self) -> float:
        return 8 * self.compressed_bytes / max(self.original_bytes, 1)

    @property
    def kb_per_second(self) -> float:
        return self.original_bytes / 1000 / max(self.seconds, 1e-9)


def compress(run: str | Path, data: bytes, chunk_tokens: int = 0, batch_rows: int = 32, workers: int = 2,
             context: int = 0, show_progress: bool = True) -> tuple[bytes, Stats]:
    """``data`` coded with the model of ``run`` (a run or checkpoint folder) -> (the compressed file, its stats)."""
    start = time.perf_counter()
    model, tokenizer, cfg = load_for_inference(run)
    context = _context(context, model, cfg)
    identity, note = lm.model_identity(run, cfg)
    segs, texts, raw = segments.split(data, tokenizer)
    tokens = [t for ids in texts for t in ids]
    chunk_tokens = _chunk_tokens(chunk_tokens, len(tokens), batch_rows)
    chunks = [tokens[i : i + chunk_tokens] for i in range(0, len(tokens), chunk_tokens)]
    num_batches = -(-len(chunks) // batch_rows)
    jobs = [("encode", part, context, context // 2) for part in _split(chunks, num_batches)]
    streams = [s for out in _run(run, model, tokenizer.eos_id, jobs, workers, len(tokens), "compress", show_progress)
               for s in out]
    raw_method, raw_blob = segments.pack_raw(raw)
    header = container.Header(identity, lm.probe_fingerprint(model, tokenizer), len(data), zlib.crc32(data), note,
                              chunk_tokens, context, context // 2, num_batches, len(tokens), raw_method, segs, [])
    blob = container.pack(header, raw_blob, streams)
    return blob, Stats(len(data), len(blob), len(tokens), time.perf_counter() - start)


def decompress(run: str | Path, blob: bytes, name: str = "input", workers: int = 2,
               show_progress: bool = True) -> tuple[bytes, Stats]:
    """The inverse of ``compress``; ``name`` (the file) is for messages. Any mismatch is a ValueError."""
    start = time.perf_counter()
    header, raw_blob, streams = container.unpack(blob, name)
    raw = segments.unpack_raw(header.raw_method, raw_blob, sum(s.nbytes for s in header.segments if not s.text), name)
    model, tokenizer, cfg = load_for_inference(run)
    identity, note = lm.model_identity(run, cfg)
    if identity != header.model:
        raise ValueError(f"{name}: compressed with another model ({header.note}, id {header.model.hex()[:12]}); "
                         f"{run} holds {note} (id {identity.hex()[:12]}): decompress with the run folder that "
                         f"compressed it")
    if lm.probe_fingerprint(model, tokenizer) != header.probe:
        raise ValueError(f"{name}: this machine computes other probabilities than the one that compressed it (its "
                         f"probe fingerprint differs; made with {header.note}): decompress it on the same kind of "
                         f"CPU with the same torch")
    lengths = [min(header.chunk_tokens, header.num_tokens - i) for i in range(0, header.num_tokens,
                                                                             header.chunk_tokens)]
    parts = zip(_split(streams, header.num_batches), _split(lengths, header.num_batches))
    jobs = [("decode", s, n, header.context, header.keep) for s, n in parts]
    tokens = [t for out in _run(run, model, tokenizer.eos_id, jobs, workers, header.num_tokens, "decompress",
                                show_progress) for chunk in out for t in chunk]
    texts, pos = [], 0
    for seg in header.segments:
        if seg.text:
            texts.append(tokenizer.decode(tokens[pos : pos + seg.num_tokens], skip_special=False))
            pos += seg.num_tokens
    data = segments.join(header.segments, texts, raw, name)
    if len(data) != header.original_len or zlib.crc32(data) != header.original_crc:
        raise ValueError(f"{name}: the decompressed data differs from the original (its CRC32 or length): this "
                         f"machine computed other probabilities than the one that compressed it ({header.note})")
    return data, Stats(len(data), len(blob), header.num_tokens, time.perf_counter() - start)


def _context(context: int, model, cfg) -> int:
    """The model's window: ``context``, or the run's training length (data.seq_len) capped at max_seq_len."""
    limit = model.cfg.max_seq_len
    context = context or min(cfg.data.seq_len, limit)
    if not 2 <= context <= limit:
        raise ValueError(f"context={context}: expected 2 to the model's max_seq_len {limit} tokens (0 = the run's "
                         f"data.seq_len)")
    return context


def _chunk_tokens(chunk_tokens: int, num_tokens: int, batch_rows: int) -> int:
    """``chunk_tokens``, or for 0 enough chunks for two full batches (two processes busy), within the bounds."""
    if chunk_tokens:
        return chunk_tokens
    return min(AUTO_CHUNK_MAX, max(AUTO_CHUNK_MIN, -(-num_tokens // (2 * batch_rows))))


def _split(items: list, num_parts: int) -> list[list]:
    """``items`` cut into ``num_parts`` consecutive parts whose sizes differ by at most one."""
    n = len(items)
    return [items[i * n // num_parts : (i + 1) * n // num_parts] for i in range(num_parts)]


def _run(run, model, eos_id: int, jobs: list[tuple], workers: int, num_tokens: int, desc: str,
         show_progress: bool) -> list:
    """Each job's result, in order: in this process for one worker or one job, else in ``workers`` processes."""
    bar = progress_bar(total=num_tokens, desc=desc, unit="tok", unit_scale=True, disable=not show_progress)
    try:
        workers = min(workers, len(jobs), num_tokens // MIN_TOKENS_PER_PROCESS)
        if workers <= 1:
            with lm.reference_mode():
                return [_job(model, eos_id, job, bar.update) for job in jobs]
        return _run_pool(run, jobs, workers, bar)
    finally:
        bar.close()


def _run_pool(run, jobs: list[tuple], workers: int, bar) -> list:
    ctx = multiprocessing.get_context("spawn")  # no fork of a process whose torch already started its threads
    progress = ctx.Queue()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(str(run), progress))
    try:
        futures = [pool.submit(_worker_job, job) for job in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
            failed = [f.exception() for f in done if f.exception() is not None]
            if failed:
                # No public way to stop jobs already running: end their processes, or exit would wait for them.
                for process in list(getattr(pool, "_processes", {}).values()):
                    process.terminate()
                raise failed[0]
            _drain(progress, bar)
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        _drain(progress, bar)


def _drain(progress, bar) -> None:
    try:
        while True:
            bar.update(progress.get_nowait())
    except (queue.Empty, OSError, ValueError):
        pass


def _init_worker(run: str, progress) -> None:
    model, tokenizer, _ = load_for_inference(run)
    _WORKER.update(model=model, eos_id=tokenizer.eos_id, progress=progress)


def _worker_job(job: tuple):
    counted, last = [0], [time.perf_counter()]

    def report(n: int) -> None:
        counted[0] += n
        if time.perf_counter() - last[0] > 0.2:
            _WORKER["progress"].put(counted[0])
            counted[0], last[0] = 0, time.perf_counter()

    with lm.reference_mode():
        out = _job(_WORKER["model"], _WORKER["eos_id"], job, report)
    _WORKER["progress"].put(counted[0])
    return out


def _job(model, eos_id: int, job: tuple, report):
    if job[0] == "encode":
        _, chunks, context, keep = job
        return lm.encode_rows(model, chunks, context, keep, eos_id, report)
    _, streams, lengths, context, keep = job
    return lm.decode_rows(model, streams, lengths, context, keep, eos_id, report)
