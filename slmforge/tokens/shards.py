"""Token shards on disk and a resumable, rank-aware loader over them.

A shard directory holds ``tokens-00000.bin`` (raw ids, uint16 when the vocabulary fits, else uint32),
``docs-00000.npy`` (int64 start of each document, local to its shard; shards end at document ends) and
``meta.json``, written last: a directory without it is incomplete. Every document is stored as
``ids + [eos]``, so ``eos`` separates documents in the stream. ``meta.json`` records the tokenizer the shards
were made with (absolute path and SHA-256), so a run trained on them can find it (``recorded_tokenizer``).
A new tokenization is written to a temporary folder beside the shard folder and moved into place only when it
finished (``runs.staged_dir``), so a failed one leaves the shards that were there loadable.

Encoding runs in worker processes (fork), each with its own cached ``Tokenizer.encode_flat``: on 2 cores
and the Gutenberg books that is about 14 MB/s with 2 workers and 10 MB/s in-process, against 2.6 MB/s for
HF's multi-threaded ``encode_batch`` (``benchmarks/tokenize_throughput.py``).

Shapes: B = batch_size, T = seq_len; the loader yields ``x, y`` of shape (B, T), int64, where ``y[:, t]`` is the
token after ``x[:, t]``. Windows of T+1 tokens start every T tokens, so no token is a target twice in an epoch.

long: about 410 lines, because the writer (encoding in worker processes or Ray tasks) and the loader share the
shard format; split, the two halves of one format would live apart.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from slmforge.tokens.tokenizer import Tokenizer, _json_path
from slmforge.progress import progress_bar
from slmforge.runs import atomic_path, staged_dir, write_json

# ---------------------------------------------------------------- writing shards

_BATCH_CHARS = 1 << 20  # documents are sent to a worker in batches of about this many characters
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    # A forked worker inherits the parent's signal handlers (a server's graceful SIGTERM, say); the pool ends by
    # close + join (``_encoded``), but a worker that ever gets SIGTERM (Pool.terminate, a user's kill) must end.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_batch(texts: list[str], append_eos: bool, dtype: np.dtype,
                  tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids of the batch, with eos after each document; ids per document; UTF-8 bytes of the batch)."""
    tokenizer = tokenizer or _worker_tokenizer
    ids, lengths = tokenizer.encode_flat(texts, tokenizer.eos_id if append_eos else None)
    # Cast here: a worker then sends back half the bytes.
    return ids.astype(dtype), lengths, sum(len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts)


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch, num_chars = [], 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"tokenize_to_shards: document {i} is a {type(text).__name__}, expected str")
        batch.append(text)
        num_chars += len(text)
        if num_chars >= _BATCH_CHARS:
            yield batch
            batch, num_chars = [], 0
    if batch:
        yield batch


def _encoded(batches: Iterator[list[str]], tokenizer: Tokenizer, tokenizer_path: Path, num_workers: int,
             append_eos: bool, dtype: np.dtype, map_batches=None):
    """Yield ``_encode_batch`` results in input order, from ``num_workers`` processes (<= 1: this process), or
    from ``map_batches(fn, batches)`` (Ray tasks, ``curate/executor.py``; the tokenizer travels with ``fn``)."""
    if map_batches is not None:
        yield from map_batches(lambda batch: _encode_batch(batch, append_eos, dtype, tokenizer), batches)
        return
    if num_workers <= 1:
        yield from (_encode_batch(batch, append_eos, dtype, tokenizer) for batch in batches)
        return
    # HF tokenizers disables its thread pool (with a warning) in a child forked after the parent used it;
    # setting the variable across the fork makes each worker single-threaded, which is what we want anyway.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        # fork, not spawn: a spawned worker re-imports the caller's modules (torch among them), seconds each.
        pool = multiprocessing.get_context("fork").Pool(num_workers, _init_worker, (str(tokenizer_path),))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        # A bounded window of batches in flight keeps memory flat and the output in input order.
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch, append_eos, dtype)))
            if len(pending) > 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        # close + join, even on an error: the workers finish the few batches in flight and leave at the queue's
        # sentinel. Pool.terminate (what ``with pool`` does) ends them by SIGTERM instead, which a worker forked a
        # moment before still handles with the parent's handler, if the parent has one: then it blocks forever.
        pool.close()
        pool.join()


class _ShardWriter:
    """Appends documents to ``tokens-NNNNN.bin``; starts a new shard after the one that reaches shard_tokens."""

    def __init__(self, out_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.dtype, self.shard_tokens = out_dir, dtype, shard_tokens
        self.files: list[dict[str, Any]] = []
        self._stack: ExitStack | None = None

    def write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)  # a no-op for the ids of tokenize_to_shards
        while len(lengths):
            if self._stack is None:
                self._open()
            ends = np.cumsum(lengths)
            # Take documents up to and including the one that fills this shard.
            num_docs = min(int(np.searchsorted(ends, self.shard_tokens - self._num_tokens)) + 1, len(lengths))
            num_tokens = int(ends[num_docs - 1])
            self._file.write(ids[:num_tokens].tobytes())
            self._doc_starts.append(self._num_tokens + ends[:num_docs] - lengths[:num_docs])
            self._num_tokens += num_tokens
            ids, lengths = ids[num_tokens:], lengths[num_docs:]
            if self._num_tokens >= self.shard_tokens:
                self.close()

    def _open(self) -> None:
        name = f"tokens-{len(self.files):05d}.bin"
        self._stack = ExitStack()
        self._file = self._stack.enter_context(open(self._stack.enter_context(atomic_path(self.out_dir / name)), "wb"))
        self._doc_starts: list[np.ndarray] = []
        self._num_tokens = 0
        self.files.append({"tokens": name, "docs": name.replace("tokens", "docs").replace(".bin", ".npy")})

    def close(self) -> None:
        """Finish the open shard: its tokens file is renamed into place, then its document starts are written."""
        if self._stack is None:
            return
        self._stack.close()
        self._stack = None
        doc_starts = np.concatenate(self._doc_starts).astype(np.int64)
        with atomic_path(self.out_dir / self.files[-1]["docs"]) as tmp, open(tmp, "wb") as f:
            np.save(f, doc_starts)
        self.files[-1].update(num_tokens=self._num_tokens, num_docs=len(doc_starts))

    def abort(self) -> None:
        if self._stack is not None:
            # Let atomic_path see an error so that it deletes the temporary file instead of renaming it.
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._stack = None


def tokenize_to_shards(texts: Iterable[str], tokenizer_path: str | Path, out_dir: str | Path,
                       num_workers: int = 2, shard_tokens: int = 1 << 27, append_eos: bool = True,
                       progress: bool | None = None, allow_empty: bool = False, map_batches=None) -> dict[str, Any]:
    """Encode documents in order into token shards under ``out_dir`` and return the meta (plus timing).

    ``num_workers`` processes encode batches of documents (<= 1: in this process), or ``map_batches`` (Ray
    tasks: ``_encoded``); the output depends on neither. ``progress=None`` shows a progress bar only when stderr
    is a terminal. A failed run (an error, an interrupt, no documents) leaves the shards in ``out_dir`` as they
    were (see the module docstring). No documents at all is a ValueError unless ``allow_empty`` (a held-out split
    that may be empty).
    """
    tokenizer_path, out_dir = _json_path(tokenizer_path), Path(out_dir)
    tokenizer = Tokenizer.load(tokenizer_path)
    with staged_dir(out_dir, last=("meta.json",)) as tmp:
        meta = _write_shards(texts, tokenizer, tokenizer_path, tmp, out_dir, num_workers, shard_tokens, append_eos,
                             progress, map_batches)
        if not meta["num_docs"] and not allow_empty:
            raise ValueError(f"no documents to tokenize into {out_dir} (the input holds no text); "
                             f"{'its shards are left as they were' if out_dir.exists() else 'nothing was written'}")
    listed = {name for f in meta["files"] for name in (f["tokens"], f["docs"])}
    for stale in {*out_dir.glob("tokens-*.bin"), *out_dir.glob("docs-*.npy")} - {out_dir / n for n in listed}:
        stale.unlink()
    return meta


def _write_shards(texts: Iterable[str], tokenizer: Tokenizer, tokenizer_path: Path, tmp: Path, out_dir: Path,
                  num_workers: int, shard_tokens: int, append_eos: bool, progress: bool | None,
                  map_batches=None) -> dict[str, Any]:
    """``tokenize_to_shards`` into the temporary folder ``tmp``: the shards, then meta.json; the meta plus timing."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writer, num_bytes, num_docs, start = _ShardWriter(tmp, dtype, shard_tokens), 0, 0, time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress
    bar = progress_bar(unit="B", unit_scale=True, desc=f"tokenize {out_dir}", disable=not show)
    encoded = _encoded(_batches(texts), tokenizer, tokenizer_path, num_workers, append_eos, dtype, map_batches)
    try:
        for ids, lengths, batch_bytes in encoded:
            writer.write(ids, lengths)
            num_bytes += batch_bytes
            num_docs += len(lengths)
            bar.update(batch_bytes)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        encoded.close()  # stops the worker pool now, also on error
        bar.close()
    seconds = time.perf_counter() - start
    meta = dict(dtype=dtype.name, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id if append_eos else None,
                num_tokens=sum(f["num_tokens"] for f in writer.files), num_docs=num_docs, num_bytes=num_bytes,
                tokenizer=str(tokenizer_path.resolve()), tokenizer_sha256=file_sha256(tokenizer_path),
                files=writer.files)
    write_json(tmp / "meta.json", meta)
    return dict(meta, seconds=seconds, mb_per_second=num_bytes / 1e6 / max(seconds, 1e-9))


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- reading shards


class TokenStream:
    """All shards as one read-only sequence of ids, backed by one memmap per shard."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])  # (num_shards+1,) global start of each shard
        self.dtype = arrays[0].dtype if arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """``stream[positions]`` for non-negative integer positions of any shape; reads only the pages it touches."""
        if len(self.arrays) == 1:
            return self.arrays[0][positions]
        out = np.empty(positions.shape, self.dtype)
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.arrays[s][positions[mask] - self.offsets[s]]
        return out

    def __getitem__(self, index):
        if not isinstance(index, slice):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"token {index} is out of range for {len(self)} tokens")
            return self.gather(np.array([position]))[0]
        start, stop, step = index.indices(len(self))
        if step != 1:
            return self.gather(np.arange(start, stop, step))
        # A contiguous range: slice each shard (views, no index array), then join the pieces.
        parts = [a[max(start - o, 0) : max(stop - o, 0)] for a, o in zip(self.arrays, self.offsets)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.arrays) if self.arrays else np.zeros(0, self.dtype)
        return out if dtype is None else out.astype(dtype)


@dataclass
class ShardSet:
    tokens: TokenStream
    doc_starts: np.ndarray  # (num_docs,) int64 global start of each document
    meta: dict[str, Any]


def load_meta(shard_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a complete shard folder; a one-line error naming the fix otherwise."""
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise ValueError(f"{shard_dir}: no such folder; tokenize documents into it: "
                         f"slmforge tokenize FILES tokenizer=tok.json out={shard_dir}")
    if not (shard_dir / "meta.json").is_file():
        raise ValueError(f"{shard_dir}: no meta.json, so its tokenization did not finish; run "
                         f"slmforge tokenize FILES tokenizer=tok.json out={shard_dir} again")
    return json.loads((shard_dir / "meta.json").read_text())


def recorded_tokenizer(shard_dir: str | Path) -> Path:
    """The tokenizer.json the shards in ``shard_dir`` were made with, as its meta.json records it; a one-line
    error when it is not recorded, gone or changed since (shards made before the hash was recorded: not checked)."""
    meta = load_meta(shard_dir)
    path, fix = Path(meta.get("tokenizer") or "-"), "give data.tokenizer=PATH, the tokenizer.json they were made with"
    if not path.is_file():
        raise ValueError(f"{shard_dir}: the tokenizer these shards were made with ({meta.get('tokenizer')}) "
                         f"is not there; {fix}")
    if meta.get("tokenizer_sha256", file_sha256(path)) != file_sha256(path):
        raise ValueError(f"{path} changed after {shard_dir} was made with it; tokenize again, or {fix}")
    return path


def load_shards(shard_dir: str | Path) -> ShardSet:
    shard_dir = Path(shard_dir)
    meta_path = shard_dir / "meta.json"
    meta = load_meta(shard_dir)
    arrays, starts = [], []
    for f in meta["files"]:
        path = shard_dir / f["tokens"]
        size = path.stat().st_size if path.is_file() else -1
        if size != f["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
            raise ValueError(f"{path}: expected {f['num_tokens']} {meta['dtype']} tokens as listed in {meta_path}, "
                             f"found {'no file' if size < 0 else f'{size} bytes'}")
        offset = sum(len(a) for a in arrays)
        # np.memmap cannot map an empty file
        arrays.append(np.memmap(path, dtype=meta["dtype"], mode="r") if size else np.zeros(0, meta["dtype"]))
        starts.append(np.load(shard_dir / f["docs"]) + offset)
    doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    return ShardSet(TokenStream(arrays), doc_starts, meta)


class TokenLoader:
    """Infinite, seeded, resumable batches of (x, y) from a shard directory.

    mode "window": the stream cut into windows of T+1 tokens every T tokens, in a random order per epoch.
    mode "documents": documents in a random order per epoch, concatenated, then cut the same way, so a
    document may continue into the next row. Epoch e shuffles with seed + e; ``shuffle=False`` keeps
    stream order (validation). Global batch b goes to rank b % world_size, and every rank gets the same
    number of batches per epoch (the remainder is dropped), so ranks stay in step.
    """

    def __init__(self, shard_dir: str | Path, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, mode: str = "window", shuffle: bool = True):
        if mode not in ("window", "documents"):
            raise ValueError(f"TokenLoader mode={mode!r}: choose 'window' or 'documents'")
        if not 0 <= rank < world_size:
            raise ValueError(f"TokenLoader rank={rank}: must be in [0, world_size={world_size})")
        self.shards = load_shards(shard_dir)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.mode, self.shuffle = rank, world_size, mode, shuffle
        self.epoch = 0
        self.position = 0  # batches of this rank already yielded in the current epoch
        self._plan: tuple | None = None
        self.num_windows = max(len(self.shards.tokens) - 1, 0) // seq_len
        if len(self) == 0:
            split = Path(shard_dir).name
            keys = {"validation": "data.val_fraction, data.val_paths", "test": "data.test_fraction, data.test_paths"}
            raise ValueError(
                f"{shard_dir}: the {split} split has {len(self.shards.tokens):,} tokens from "
                f"{self.shards.meta.get('num_docs', 0):,} documents, too few for one batch of {batch_size} x "
                f"{seq_len + 1} tokens on each of {world_size} ranks; give it more text "
                f"({keys.get(split, 'data.paths')}; data.text_split=chunk cuts plain text into many documents) "
                f"or lower train.batch_size or data.seq_len")

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.num_windows // (self.batch_size * self.world_size)

    def _epoch_plan(self, epoch: int):
        """(epoch, window or document order, document ends in the shuffled stream, shard minus stream start per
        document); cached because it is the same for the whole epoch."""
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng(self.seed + epoch)
            if self.mode == "window":
                order = rng.permutation(self.num_windows) if self.shuffle else np.arange(self.num_windows)
                self._plan = (epoch, order, None, None)
            else:
                starts = self.shards.doc_starts
                lengths = np.diff(starts, append=len(self.shards.tokens))
                order = rng.permutation(len(starts)) if self.shuffle else np.arange(len(starts))
                doc_ends = np.cumsum(lengths[order])
                self._plan = (epoch, order, doc_ends, starts[order] - (doc_ends - lengths[order]))
        return self._plan

    def _batch(self, epoch: int, index: int):
        _, order, doc_ends, doc_offsets = self._epoch_plan(epoch)
        first = (index * self.world_size + self.rank) * self.batch_size
        rows = np.arange(first, first + self.batch_size)
        if self.mode == "window":
            rows = order[rows]
        # (B, T+1) positions in the epoch's stream
        positions = rows[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        if self.mode == "documents":
            # Map positions of the shuffled concatenation back to the shards.
            k = np.searchsorted(doc_ends, positions, side="right")
            positions = positions + doc_offsets[k]
        tokens = self.shards.tokens.gather(positions)
        x = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1], dtype=np.int64))
        y = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:], dtype=np.int64))
        return x, y

    def __iter__(self):
        while True:
            yield from self.iter_epoch_once()

    def iter_epoch_once(self):
        """The rest of the current epoch, or all of the next one if it is finished; then stop.

        So each call on a finished ``shuffle=False`` loader is one full validation pass.
        """
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < len(self):
            batch = self._batch(self.epoch, self.position)
            # Advance before yielding so that state_dict() taken after a batch points past it.
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, seq_len=self.seq_len,
                    batch_size=self.batch_size, world_size=self.world_size, mode=self.mode, shuffle=self.shuffle)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "seq_len", "batch_size", "world_size", "mode", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
