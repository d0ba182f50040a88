"""Exact and near-duplicate removal: hashes of normalised text, and MinHash signatures with LSH banding.

MinHash (Broder 1997) estimates the Jaccard similarity of two documents' shingle sets by the fraction of equal
signature entries. LSH banding (Leskovec, Rajaraman & Ullman, Mining of Massive Datasets, ch. 3) makes a pair a
candidate when all r rows of one of b bands agree; candidates are checked by the exact Jaccard of their shingle
sets (optional), joined by union-find, and one survivor per cluster is kept. Why it matters for language
models: Lee et al. 2022, arXiv 2107.06499. The stage layout follows datatrove's minhash steps.

Stages, each run per shard so that a job array can run them. A step is handed its shard as ``shard_of`` cuts
it, so the k-th document of shard ``rank`` has the global index ``rank + k * world_size``:
  A  ``SignatureStep``   per shard: exact hashes, band hashes, lengths and ids (and with ``verify`` the sorted
                         shingle hashes) under ``out_dir/signatures/RANK-of-WORLD/``
  B  ``build_clusters``  once: merges the band buckets of all shards, verifies candidate pairs, runs
                         union-find, writes ``removed.jsonl`` (id, cluster, reason), ``removed.npy`` and
                         ``report.json`` (counts, cluster-size histogram, example clusters)
  C  ``RemoveStep``      per shard: passes the shard through without the removed documents; ``dedup`` writes
                         them to ``out_dir/kept/RANK-of-WORLD.jsonl``, copying their JSON lines from stage A's
                         ``lines.bin`` (``copy_kept``: no second JSON decode of the inputs) when it is there

Hashing, in uint64 arithmetic mod 2^64 (numpy wraps around):
  text -> ``text.lower()`` as UTF-8. A word is a maximal run of bytes that are ASCII letters or digits or
  non-ASCII (>= 0x80), so whitespace and ASCII punctuation separate words and are otherwise ignored.
  span hash  H(v, s, e) = fmix64(sum_{k=s}^{e-1} v[k] * B^(k-s)) (B odd, so B^-1 exists mod 2^64 and the
             compiled kernel rolls a window along in two multiplies: see ``minhash_kernels``)
  word = H(its bytes); exact hash = H(the document's words); a word shingle = H(n consecutive words), a char
  shingle = H(n bytes of the words joined by single spaces, plus a trailing space). A document shorter than
  n gives one shingle of all of it; one without words has no shingles and takes part in neither dedup.
  permutation i: h_i(x) = (a_i * x + b_i) mod 2^32 with a_i odd, on x = the high 32 bits of a shingle. Each
  h_i is a bijection and the x are independent random hashes, so P[min h_i(A) = min h_i(B)] = J(A, B).
  band k: fmix64(sum_j sig[k*r + j] * B^j).

LSH maths: a pair with similarity s becomes a candidate with probability P(s) = 1 - (1 - s^r)^b. (b, r) minimises
  w_fp * int_0^t P(s) ds + w_fn * int_t^1 (1 - P(s)) ds over b * r <= num_perm, as datasketch does. With
  ``verify`` a false candidate costs one exact check, so the default weights are 1:19, giving (16, 8) at
  t = 0.8: P(0.5) = 0.06, P(0.8) = 0.95, P(0.85) = 0.99. Equal weights give datasketch's (9, 13): P(0.85) = 0.69.

Memory per document (b = 16 bands), measured with tracemalloc on 1M documents: stage A 36 bytes (index, exact
hash, counts, length; bands and shingle sets stream to disk) plus a fixed ~60 MB per batch in flight; stage B
210 bytes at its peak (149 in the merged arrays: 8b bands, 8 exact, 4 length, 2 x 4 counts, 1 flag; the rest
while one band is sorted) plus about 40 per candidate pair and the ids of clusters' kept documents; stage C 1
byte. So 10M documents need about 2.1 GB in stage B. Disk per document: 164 bytes of arrays, the id with an
80-character head, with ``verify`` 4 bytes per distinct shingle (about 0.7x the text), and in ``dedup`` the
JSON line as ``write_jsonl`` writes it (about the input's size) plus 8 bytes, until stage C has copied them.

long: about 830 lines, because the three stages share the hashing (and stage A keeps the lines stage C copies),
and the loop references sit next to the compiled code they check (the kernels themselves are in
minhash_kernels.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np

from slmforge.config import TextSplit
from slmforge.curate.documents import (Document, ReadStats, checked, jsonl_line, read_documents, read_warning,
                                      shard_of, write_jsonl)
from slmforge.curate.executor import ExecutorName, executor
from slmforge.curate.minhash_kernels import pair_jaccard, shingle_kernel, signature_kernel
from slmforge.progress import progress_bar
from slmforge.registry import lookup
from slmforge.runs import atomic_path, save_config, staged_dir, write_json

SHINGLES = ("word", "char")
KEEPS = ("first", "longest")
STAGES = ("all", "signatures", "clusters", "write")


@dataclass
class DedupConfig:
    inputs: list[str] = field(default_factory=list)  # files, directories or globs (bad records are skipped)
    out_dir: str = "dedup"
    text_field: str = "text"  # JSONL/Parquet field holding the text
    text_split: TextSplit = "file"  # .txt/.md inputs
    exact: bool = True  # remove documents whose normalised text (lowercased words) is identical
    near: bool = True  # remove near-duplicates found by MinHash LSH
    shingle: Literal["word", "char"] = "word"  # n-grams of words or of characters (SHINGLES)
    ngram: int = 5
    num_perm: int = 128
    threshold: float = 0.8  # Jaccard similarity at which two documents count as duplicates
    num_bands: int = 0  # 0 with rows_per_band 0: chosen from threshold and the two weights below
    rows_per_band: int = 0
    false_positive_weight: float = 0.05
    false_negative_weight: float = 0.95
    verify: bool = True  # join a candidate pair only if its exact shingle Jaccard reaches threshold
    keep: Literal["first", "longest"] = "first"  # survivor of a cluster: first in input order, or longest (ties: first)
    max_doc_bytes: int = 10_000_000  # longer documents are skipped and counted
    num_workers: int = 0  # signature threads; 0 = one per CPU, 1 = the calling thread
    seed: int = 1
    num_examples: int = 5  # example clusters in the report
    executor: ExecutorName = "local"  # local: shard after shard here; ray: the shards as Ray tasks (curate/executor.py)
    ray_address: str = ""  # executor=ray: empty starts a local Ray cluster; auto or HOST:PORT joins a running one
    ray_num_cpus: int = 0  # CPUs of a new local Ray cluster; 0 = all


# ---------------------------------------------------------------- LSH parameters


def candidate_probability(s, num_bands: int, rows_per_band: int):
    """P(a pair with Jaccard ``s`` shares at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows_per_band) ** num_bands


def _integral(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return ((y[..., 1:] + y[..., :-1]) * np.diff(x) / 2).sum(axis=-1)


@functools.cache
def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
               false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(num_bands, rows_per_band) minimising the weighted false-positive and false-negative areas of the S-curve.

    The trapezoid rule on 1001 points picks the same pair as datasketch's ``quad`` integration.
    """
    below, above = np.linspace(0.0, threshold, 1001), np.linspace(threshold, 1.0, 1001)
    best_error, best = np.inf, (1, 1)
    for b in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // b + 1)[:, None]
        error = (false_positive_weight * _integral(candidate_probability(below, b, rows), below)
                 + false_negative_weight * _integral(1.0 - candidate_probability(above, b, rows), above))
        i = int(np.argmin(error))
        if error[i] < best_error:
            best_error, best = error[i], (b, i + 1)
    return best


def bands_of(cfg: DedupConfig) -> tuple[int, int]:
    if cfg.num_bands and cfg.rows_per_band:
        return cfg.num_bands, cfg.rows_per_band
    return lsh_params(cfg.threshold, cfg.num_perm, cfg.false_positive_weight, cfg.false_negative_weight)


def check_config(cfg: DedupConfig) -> None:
    lookup({s: s for s in SHINGLES}, cfg.shingle, "shingle")
    lookup({k: k for k in KEEPS}, cfg.keep, "keep")
    if cfg.ngram < 1 or cfg.num_perm < 1 or not 0.0 < cfg.threshold <= 1.0:
        raise ValueError(f"dedup: need ngram >= 1, num_perm >= 1 and 0 < threshold <= 1; got ngram={cfg.ngram}, "
                         f"num_perm={cfg.num_perm}, threshold={cfg.threshold}")
    if bool(cfg.num_bands) != bool(cfg.rows_per_band) or cfg.num_bands * cfg.rows_per_band > cfg.num_perm:
        raise ValueError(f"dedup: num_bands and rows_per_band are set together (or both 0) with "
                         f"num_bands * rows_per_band <= num_perm={cfg.num_perm}; got {cfg.num_bands} x "
                         f"{cfg.rows_per_band}")
    if not cfg.exact and not cfg.near:
        raise ValueError("dedup: exact and near are both false; nothing to do")


# ---------------------------------------------------------------- hashing (compiled kernels and numpy)

_M64 = (1 << 64) - 1
_BASE = 0x9E3779B97F4A7C15  # odd, so invertible mod 2^64
_WORD_BYTE = np.zeros(256, dtype=bool)
for _lo, _hi in ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("a"), ord("z")), (0x80, 0xFF)):
    _WORD_BYTE[_lo:_hi + 1] = True
_LOWER = np.frombuffer(bytes(range(256)).lower(), np.uint8)  # ASCII case folding, other bytes unchanged
WORD_RE = re.compile(rb"[0-9A-Za-z\x80-\xff]+")  # the same words, for the references


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place: every input bit flips each output bit with probability ~1/2."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


@dataclass
class Shingles:
    """The shingles of a batch of n documents: document d owns ``hashes[offsets[d]:offsets[d+1]]``."""
    hashes: np.ndarray  # (num_shingles,) uint64
    offsets: np.ndarray  # (n + 1,) int64
    exact: np.ndarray  # (n,) uint64 hash of the document's words
    num_words: np.ndarray  # (n,) int64
    num_bytes: np.ndarray  # (n,) int64 UTF-8 bytes of the lowercased text


def shingle_hashes(texts: list[str], ngram: int = 5, shingle: str = "word") -> Shingles:
    """Hash every shingle of every text in one compiled pass (``minhash_kernels.shingle_kernel``)."""
    # The kernel folds ASCII case itself, so only texts with other characters need str.lower().
    data = [t.encode("utf-8") if t.isascii() else t.lower().encode("utf-8") for t in texts]
    buf = np.frombuffer(b" ".join(data) + b" ", np.uint8)  # a space after every document
    doc_bytes = np.zeros(len(data) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, data), np.int64, len(data)) + 1, out=doc_bytes[1:])
    hashes, offsets, exact, num_words = shingle_kernel(buf, doc_bytes, _WORD_BYTE, _LOWER, ngram, shingle == "char")
    return Shingles(hashes, offsets, exact, num_words, np.diff(doc_bytes) - 1)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b), uint32 each, of the permutations h_i(x) = (a_i x + b_i) mod 2^32; every a_i is odd."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64) | np.uint64(1)
    return a.astype(np.uint32), rng.integers(0, 1 << 32, num_perm, dtype=np.uint64).astype(np.uint32)


def minhash(x: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signatures (n, num_perm) uint32 of n documents whose 32-bit shingles are ``x[offsets[d]:offsets[d+1]]``;
    a document without shingles gets all 0xFFFFFFFF."""
    return signature_kernel(np.ascontiguousarray(x, np.uint32), np.asarray(offsets, np.int64), a, b)


def band_hashes(signatures: np.ndarray, num_bands: int, rows_per_band: int) -> np.ndarray:
    """(n, num_bands) uint64: band k hashes signature rows k*r .. k*r + r - 1."""
    rows = signatures[:, : num_bands * rows_per_band].reshape(len(signatures), num_bands, rows_per_band)
    powers = np.cumprod(np.r_[np.uint64(1), np.full(rows_per_band - 1, _BASE, np.uint64)], dtype=np.uint64)
    return _fmix64((rows.astype(np.uint64) * powers).sum(axis=2, dtype=np.uint64))


class MinHasher:
    """Vectorised MinHash of a batch of texts; ``minhash_ref`` is the one-document loop it must equal."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, shingle: str = "word", seed: int = 1):
        self.ngram, self.shingle = ngram, shingle
        self.a, self.b = permutations(num_perm, seed)

    def sign(self, texts: list[str]) -> tuple[np.ndarray, Shingles, np.ndarray]:
        """(signatures (n, num_perm) uint32, the shingles, and their high 32 bits, which the permutations use)."""
        sh = shingle_hashes(texts, self.ngram, self.shingle)
        x = (sh.hashes >> np.uint64(32)).astype(np.uint32)
        return minhash(x, sh.offsets, self.a, self.b), sh, x


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    # np.unique in numpy >= 2.3 hashes instead of sorting, and that is 10x slower on 64-bit keys.
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def shingle_sets(sh: Shingles) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct 32-bit shingles per document: (values uint32, per-document offsets int64)."""
    doc = np.repeat(np.arange(len(sh.offsets) - 1, dtype=np.uint64), np.diff(sh.offsets))
    keys = _sorted_unique((doc << np.uint64(32)) | (sh.hashes >> np.uint64(32)))
    offsets = np.searchsorted(keys >> np.uint64(32), np.arange(len(sh.offsets), dtype=np.uint64))
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), offsets.astype(np.int64)


def jaccard_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted arrays of distinct values."""
    if len(a) > len(b):
        a, b = b, a
    if not len(a):
        return 1.0 if not len(b) else 0.0
    pos = np.minimum(np.searchsorted(b, a), len(b) - 1)
    inter = int(np.count_nonzero(b[pos] == a))
    return inter / (len(a) + len(b) - inter)


# ---------------------------------------------------------------- references (plain loops)


def _fmix64_ref(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


def _span_hash_ref(values) -> int:
    h, power = 0, 1
    for v in values:
        h = (h + int(v) * power) & _M64
        power = (power * _BASE) & _M64
    return _fmix64_ref(h)


def shingles_ref(text: str, ngram: int = 5, shingle: str = "word") -> list[int]:
    """64-bit shingle hashes of one text, in order, with simple loops."""
    words = WORD_RE.findall(text.lower().encode("utf-8"))
    units = [_span_hash_ref(w) for w in words] if shingle == "word" else (b" ".join(words) + b" " if words else b"")
    if not units:
        return []
    return [_span_hash_ref(units[i:i + ngram]) for i in range(max(1, len(units) - ngram + 1))]


def minhash_ref(text: str, num_perm: int = 128, ngram: int = 5, shingle: str = "word", seed: int = 1) -> list[int]:
    """The MinHash signature of one text, one permutation and one shingle at a time."""
    xs = [h >> 32 for h in shingles_ref(text, ngram, shingle)]
    a, b = permutations(num_perm, seed)
    return [min(((int(ai) * x + int(bi)) & 0xFFFFFFFF for x in xs), default=0xFFFFFFFF) for ai, bi in zip(a, b)]


# ---------------------------------------------------------------- stage A: signatures


def skip_reason(text: str, max_doc_bytes: int) -> str | None:
    """Why a curation stage skips this text ("empty", "too_large", "invalid_utf8"), or None to process it."""
    if not text or text.isspace():
        return "empty"
    if len(text) > max_doc_bytes:
        return "too_large"
    if not text.isascii():
        try:
            if len(text.encode("utf-8")) > max_doc_bytes:
                return "too_large"
        except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\ud800" escape
            return "invalid_utf8"
    return None


_worker: tuple | None = None  # (MinHasher, num_bands, rows_per_band, verify), shared by the worker threads


def _init_worker(cfg: DedupConfig) -> None:
    global _worker
    _worker = (MinHasher(cfg.num_perm, cfg.ngram, cfg.shingle, cfg.seed), *bands_of(cfg), cfg.verify)
    _worker[0].sign(["load the compiled kernels"])  # ~0.3 s from numba's disk cache, once per process


def _sign_batch(batch: tuple[list[str], list[str]]) -> dict:
    """Hash one batch of (ids, texts) in a worker; the ids.jsonl lines are formatted here too, off the reader."""
    (ids, texts), (hasher, num_bands, rows_per_band, verify) = batch, _worker
    sig, sh, x = hasher.sign(texts)
    quote = json.encoder.encode_basestring  # json.dumps of a string, without dumps' per-call set-up
    out = dict(ids="".join(f"[{quote(i)}, {quote(t[:80])}]\n" for i, t in zip(ids, texts)),
               exact=sh.exact, num_words=sh.num_words.astype(np.int32), length=sh.num_bytes.astype(np.uint32),
               num_shingles=np.diff(sh.offsets).astype(np.int32), bands=band_hashes(sig, num_bands, rows_per_band))
    if verify:
        out["set_values"], out["set_sizes"] = x, np.diff(sh.offsets)
    return out


def _parallel_map(fn: Callable, batches: Iterable, num_workers: int, init: Callable, init_args: tuple) -> Iterator:
    """Yield ``fn(batch)`` in input order from ``num_workers`` threads (<= 1: the calling thread).

    Threads, not processes: the compiled kernels release the GIL, so threads hash in parallel, and a batch's
    texts need not be pickled to another process (with forked workers 2 processes ran at 91 MB/s, 2 threads
    at 169 on ``benchmarks/dedup.py``). ``init`` runs once, here, and loads the kernels.
    """
    init(*init_args)
    if num_workers <= 1:
        yield from map(fn, batches)
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending: deque = deque()  # a bounded window in flight keeps memory flat and the order
        for batch in batches:
            pending.append(pool.submit(fn, batch))
            if len(pending) > 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def shard_dir(out_dir: str | Path, stage: str, rank: int, world_size: int) -> Path:
    return Path(out_dir) / stage / f"{rank:05d}-of-{world_size:05d}"


def _signature_key(cfg: DedupConfig) -> dict:
    """The settings stage A depends on; a finished shard made with the same ones is reused."""
    keys = ("inputs", "text_field", "text_split", "shingle", "ngram", "num_perm", "seed", "verify", "max_doc_bytes")
    return dict({k: getattr(cfg, k) for k in keys}, bands=list(bands_of(cfg)))


class SignatureStep:
    """Stage A: hash this shard's documents into ``out_dir/signatures/RANK-of-WORLD/``; yields nothing.

    Files: index.npy (int64 global index), exact.npy (uint64), num_words.npy and num_shingles.npy (int32),
    length.npy (uint32 UTF-8 bytes, lowercased), bands.bin ((n, b) uint64, raw), ids.jsonl ([id, first 80
    characters] per line); with verify, sets.bin (uint32 shingles in document order, raw: sorting them
    is left to the few documents in candidate pairs) and set_offsets.npy; with ``keep_lines``, lines.bin (each
    hashed document's JSON line as ``write_jsonl`` writes it: for documents read with ``keep_raw``, the input line
    itself) and line_offsets.npy (int64, n + 1), from which stage C copies the kept documents (``copy_kept``);
    done.json, written last. The .bin files are written as batches finish, so memory holds 36 bytes per document.
    """

    def __init__(self, cfg: DedupConfig, batch_chars: int = 1 << 20, progress: bool | None = None,
                 keep_lines: bool = False):
        self.cfg, self.batch_chars, self.keep_lines = cfg, batch_chars, keep_lines
        self.progress = sys.stderr.isatty() if progress is None else progress

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        cfg, out, start = self.cfg, shard_dir(self.cfg.out_dir, "signatures", rank, world_size), time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("done.json", "line_offsets.npy", "lines.bin"):  # lines of an earlier run must not be copied
            (out / stale).unlink(missing_ok=True)
        self.num_seen, self.skipped, self.pending, self.line_sizes = 0, Counter(), deque(), []
        arrays: dict[str, list[np.ndarray]] = {}
        bar = progress_bar(unit="B", unit_scale=True, desc=f"dedup signatures {rank}", disable=not self.progress)
        with ExitStack() as stack:
            ids_file = stack.enter_context(open(stack.enter_context(atomic_path(out / "ids.jsonl")), "w",
                                                encoding="utf-8"))
            bands_file = stack.enter_context(open(stack.enter_context(atomic_path(out / "bands.bin")), "wb"))
            sets_file = stack.enter_context(open(stack.enter_context(atomic_path(out / "sets.bin")), "wb")) \
                if cfg.verify else None
            self.lines_file = stack.enter_context(open(stack.enter_context(atomic_path(out / "lines.bin")), "wb")) \
                if self.keep_lines else None
            batches = self._batches(docs, rank, world_size)
            for result in _parallel_map(_sign_batch, batches, cfg.num_workers or os.cpu_count() or 1,
                                        _init_worker, (cfg,)):
                result["index"] = self.pending.popleft()
                ids_file.write(result.pop("ids"))
                bands_file.write(result.pop("bands").tobytes())
                if sets_file:
                    sets_file.write(result.pop("set_values").tobytes())
                for key, value in result.items():
                    arrays.setdefault(key, []).append(value)
                bar.update(int(result["length"].sum()))
        bar.close()
        for key, dtype in (("index", np.int64), ("exact", np.uint64), ("num_words", np.int32),
                           ("num_shingles", np.int32), ("length", np.uint32), ("set_sizes", np.int64)):
            if key == "set_sizes" and not cfg.verify:
                continue
            value = np.concatenate(arrays[key]) if key in arrays else np.zeros(0, dtype)
            if key == "set_sizes":
                key, value = "set_offsets", np.r_[0, np.cumsum(value)].astype(np.int64)
            with atomic_path(out / f"{key}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, value)
        if self.keep_lines:
            with atomic_path(out / "line_offsets.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, np.r_[0, np.cumsum(np.concatenate([np.zeros(0, np.int64), *self.line_sizes]))])
        write_json(out / "done.json", dict(
            key=_signature_key(cfg), num_seen=self.num_seen, num_docs=sum(map(len, arrays.get("index", []))),
            num_bytes=int(sum(int(a.sum()) for a in arrays.get("length", []))), skipped=dict(self.skipped),
            seconds=time.perf_counter() - start))
        return iter(())

    def _batches(self, docs: Iterable[Document], rank: int, world_size: int) -> Iterator[tuple[list, list]]:
        """(ids, texts) in batches of about ``batch_chars`` characters; bad documents are skipped and counted.
        With ``keep_lines`` each batch's JSON lines are appended to lines.bin here, in input order."""
        ids, texts, index, lines, num_chars = [], [], [], [], 0
        for k, doc in enumerate(docs):
            self.num_seen = k + 1
            reason = skip_reason(doc.text, self.cfg.max_doc_bytes)
            if reason:
                self.skipped[reason] += 1
                continue
            ids.append(doc.id)
            texts.append(doc.text)
            index.append(rank + k * world_size)
            if self.lines_file:
                lines.append(jsonl_line(doc, self.cfg.text_field))
            num_chars += len(doc.text)
            if num_chars >= self.batch_chars:
                self._flush(index, lines)
                yield ids, texts
                ids, texts, index, lines, num_chars = [], [], [], [], 0
        if texts:
            self._flush(index, lines)
            yield ids, texts

    def _flush(self, index: list[int], lines: list[bytes]) -> None:
        self.pending.append(np.array(index, np.int64))
        if self.lines_file:
            lines.append(b"")  # so that the join ends with a line break
            self.lines_file.write(b"\n".join(lines))
            lines.pop()
            self.line_sizes.append(np.fromiter(map(len, lines), np.int64, len(lines)) + 1)


# ---------------------------------------------------------------- stage B: clusters


def _load_shards(cfg: DedupConfig, world_size: int) -> list[dict]:
    shards = []
    for rank in range(world_size):
        directory = shard_dir(cfg.out_dir, "signatures", rank, world_size)
        if not (directory / "done.json").exists():
            raise ValueError(f"{directory}: no finished signatures; run `slmforge dedup --stage signatures "
                             f"--shard-index {rank} --num-shards {world_size}` first")
        info = json.loads((directory / "done.json").read_text())
        if info["key"] != _signature_key(cfg):
            raise ValueError(f"{directory}: signatures were made with other settings ({info['key']}); "
                             f"expected {_signature_key(cfg)}; rerun stage signatures")
        arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r")
                  for k in ("index", "exact", "num_words", "num_shingles", "length")}
        arrays["bands"] = _raw(directory / "bands.bin", np.uint64).reshape(-1, bands_of(cfg)[0])
        read = directory / "read.json"
        shards.append(dict(info, dir=directory, read=json.loads(read.read_text()) if read.exists() else None,
                           **arrays))
    return shards


def _bucket_edges(keys: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(E, 2) star edges (first, other) within each group of equal keys; ``index`` ascending, so first is lowest."""
    if not len(keys):
        return np.zeros((0, 2), np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    new = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
    first = np.maximum.accumulate(np.where(new, np.arange(len(keys)), 0))
    return np.stack([index[order[first[~new]]], index[order[~new]]], axis=1)


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    """Union-find over ``n`` nodes, vectorised (hook roots onto smaller roots, then pointer jumping).

    Returns each node's root, which is the smallest index of its component: hooks only ever point down.
    """
    parent = np.arange(n)
    u, v = edges[:, 0], edges[:, 1]
    while len(u):
        pu, pv = parent[u], parent[v]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        joined = parent[u] != parent[v]
        u, v = u[joined], v[joined]
    return parent


def _raw(path: Path, dtype) -> np.ndarray:
    """A raw .bin array, memory-mapped (np.memmap refuses an empty file)."""
    return np.memmap(path, dtype, "r") if path.stat().st_size else np.zeros(0, dtype)


class _ShingleSets:
    """Every shard's 32-bit shingles, read through memory maps, by global index."""

    def __init__(self, shards: list[dict]):
        self.parts = [(s["index"], _raw(s["dir"] / "sets.bin", np.uint32), np.load(s["dir"] / "set_offsets.npy"))
                      for s in shards]

    def get(self, i: int) -> np.ndarray:
        index, values, offsets = self.parts[i % len(self.parts)]
        row = int(np.searchsorted(index, i))
        return values[offsets[row]:offsets[row + 1]]

    def jaccard(self, pairs: np.ndarray) -> np.ndarray:
        """Exact Jaccard of each (u, v) pair, one compiled call per pair of shards (``jaccard_sorted`` per pair
        is the reference)."""
        out, shards = np.zeros(len(pairs)), len(self.parts)
        for su in range(shards):
            for sv in range(shards):
                k = np.flatnonzero((pairs[:, 0] % shards == su) & (pairs[:, 1] % shards == sv))
                (iu, vu, ou), (iv, vv, ov) = self.parts[su], self.parts[sv]
                out[k] = pair_jaccard(np.asarray(vu), ou, np.searchsorted(iu, pairs[k, 0]),
                                      np.asarray(vv), ov, np.searchsorted(iv, pairs[k, 1]))
        return out


def _read_ids(directory: Path, rows: np.ndarray) -> Iterator[list]:
    """[id, head] of the given ascending rows of ``ids.jsonl``."""
    rows = rows.tolist()
    if not rows:
        return
    k = 0
    with open(directory / "ids.jsonl", encoding="utf-8") as f:
        for row, line in enumerate(f):
            if row == rows[k]:
                yield json.loads(line)
                k += 1
                if k == len(rows):
                    return


def _candidate_edges(cfg: DedupConfig, merged: dict, sets: _ShingleSets | None) -> tuple[np.ndarray, int]:
    """(edges to join, number of LSH candidate pairs): exact groups, then LSH buckets verified by Jaccard."""
    n, edges = len(merged["exact"]), [np.zeros((0, 2), np.int64)]
    has_words = merged["num_words"] > 0
    if cfg.exact:
        edges.append(_bucket_edges(merged["exact"][has_words], np.flatnonzero(has_words)))
    if not cfg.near:
        return np.concatenate(edges), 0
    # Identical documents share every band, so only the first of each exact group is bucketed.
    members = merged["num_shingles"] > 0
    members[edges[-1][:, 1]] = False
    index = np.flatnonzero(members)
    pairs = np.concatenate([_bucket_edges(merged["bands"][index, k], index) for k in range(merged["bands"].shape[1])])
    codes = _sorted_unique(pairs[:, 0] * n + pairs[:, 1])
    pairs = np.stack([codes // n, codes % n], axis=1)
    if sets is not None:
        edges.append(pairs[sets.jaccard(pairs) >= cfg.threshold])
    else:
        edges.append(pairs)
    return np.concatenate(edges), len(pairs)


def _survivors(root: np.ndarray, length: np.ndarray, keep: str) -> np.ndarray:
    """The kept document of each node's cluster: the root (lowest index) or the longest (ties: lowest)."""
    if keep == "first":
        return root
    size = np.bincount(root, minlength=len(root))
    m = np.flatnonzero(size[root] > 1)
    order = m[np.lexsort((m, -length[m].astype(np.int64), root[m]))]
    best = order[np.r_[True, root[order][1:] != root[order][:-1]]]
    survivor_of_root = np.arange(len(root))
    survivor_of_root[root[best]] = best
    return survivor_of_root[root]


def _merge(cfg: DedupConfig, shards: list[dict], n: int) -> dict[str, np.ndarray]:
    """All shards' per-document arrays, placed at their global indices."""
    merged = dict(processed=np.zeros(n, bool), exact=np.zeros(n, np.uint64), length=np.zeros(n, np.uint32),
                  num_words=np.zeros(n, np.int32), num_shingles=np.zeros(n, np.int32),
                  bands=np.zeros((n if cfg.near else 0, bands_of(cfg)[0]), np.uint64))
    for s in shards:
        for start in range(0, len(s["index"]), 1 << 20):  # in slices, so no shard is copied whole
            i = np.asarray(s["index"][start:start + (1 << 20)])
            merged["processed"][i] = True
            for key in ("exact", "length", "num_words", "num_shingles") + (("bands",) if cfg.near else ()):
                merged[key][i] = s[key][start:start + len(i)]
    return merged


def build_clusters(cfg: DedupConfig, world_size: int = 1) -> dict:
    """Stage B: merge all shards' hashes, cluster, and write removed.jsonl, removed.npy and report.json."""
    start, out = time.perf_counter(), Path(cfg.out_dir)
    shards = _load_shards(cfg, world_size)
    n = sum(s["num_seen"] for s in shards)  # shard_of partitions the global indices 0 .. n-1
    merged = _merge(cfg, shards, n)
    sets = _ShingleSets(shards) if cfg.verify and cfg.near else None
    edges, num_candidates = _candidate_edges(cfg, merged, sets)
    del merged["bands"]
    root = _components(n, edges)
    survivor = _survivors(root, merged["length"], cfg.keep)
    removed = np.flatnonzero(survivor != np.arange(n))
    kept_of = survivor[removed]
    is_exact = merged["exact"][removed] == merged["exact"][kept_of]
    similarity = np.where(is_exact, 1.0, np.nan)
    if sets is not None:
        similarity[~is_exact] = sets.jaccard(np.stack([removed[~is_exact], kept_of[~is_exact]], axis=1))
    size = np.bincount(root, minlength=n)
    roots = np.flatnonzero(size > 1)
    top = roots[np.lexsort((roots, -size[roots]))][: cfg.num_examples]  # the largest clusters
    example_members = np.flatnonzero(np.isin(root, top))
    names = _names(shards, np.r_[kept_of, example_members], world_size)

    def record(k: int, doc_id: str) -> dict:
        sim = None if np.isnan(similarity[k]) else round(float(similarity[k]), 4)
        return {"id": doc_id, "cluster": names[int(kept_of[k])][0], "reason": "exact" if is_exact[k] else "near",
                "jaccard": sim}

    with atomic_path(out / "removed.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rank, s in enumerate(shards):
            sel = np.flatnonzero(removed % world_size == rank)
            for k, (doc_id, _) in zip(sel.tolist(), _read_ids(s["dir"], np.searchsorted(s["index"], removed[sel]))):
                f.write(json.dumps(record(k, doc_id), ensure_ascii=False) + "\n")
    with atomic_path(out / "removed.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, removed)
    examples = []
    for r in top.tolist():
        members = [i for i in example_members[root[example_members] == r].tolist() if i != survivor[r]][:10]
        examples.append(dict(size=int(size[r]), kept=dict(zip(("id", "head"), names[int(survivor[r])])), removed=[
            dict(record(k, names[i][0]), head=names[i][1])
            for i, k in zip(members, np.searchsorted(removed, members).tolist())]))
    num_processed = int(merged["processed"].sum())
    report = dict(
        num_docs=n, num_processed=num_processed, num_kept=num_processed - len(removed), num_removed=len(removed),
        num_exact_removed=int(is_exact.sum()), num_near_removed=int((~is_exact).sum()),
        num_without_words=int((merged["processed"] & (merged["num_words"] == 0)).sum()),
        skipped=dict(sum((Counter(s["skipped"]) for s in shards), Counter())), read=shards[0]["read"],
        num_candidate_pairs=num_candidates, verified=sets is not None, lsh=_lsh_summary(cfg),
        cluster_sizes={str(k): v for k, v in sorted(Counter(size[roots].tolist()).items())}, examples=examples,
        num_bytes=sum(s["num_bytes"] for s in shards), signature_seconds=round(sum(s["seconds"] for s in shards), 3),
        cluster_seconds=round(time.perf_counter() - start, 3), num_shards=world_size, config=asdict(cfg))
    write_json(out / "report.json", report)
    return report


def _lsh_summary(cfg: DedupConfig) -> dict:
    num_bands, rows_per_band = bands_of(cfg)
    return dict(num_bands=num_bands, rows_per_band=rows_per_band, threshold=cfg.threshold, candidate_probability={
        str(s): round(float(candidate_probability(s, num_bands, rows_per_band)), 4)
        for s in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)})


def _names(shards: list[dict], wanted: np.ndarray, world_size: int) -> dict[int, list]:
    """{global index: [id, head]} for the ``wanted`` indices, read from the shards' ids.jsonl."""
    wanted, names = _sorted_unique(wanted), {}
    for rank, s in enumerate(shards):
        mine = wanted[wanted % world_size == rank]
        names.update(zip(mine.tolist(), _read_ids(s["dir"], np.searchsorted(s["index"], mine))))
    return names


# ---------------------------------------------------------------- stage C: write, and the whole run


class RemoveStep:
    """Stage C: yield the shard's documents except the removed ones and those stage A skipped."""

    def __init__(self, cfg: DedupConfig):
        self.cfg, out = cfg, Path(cfg.out_dir)
        if not (out / "removed.npy").exists() or not (out / "report.json").exists():
            raise ValueError(f"{out}: no removed.npy or report.json; run stage clusters first")
        self.removed = np.zeros(json.loads((out / "report.json").read_text())["num_docs"], bool)
        self.removed[np.load(out / "removed.npy")] = True

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for k, doc in enumerate(docs):
            i = rank + k * world_size
            if i >= len(self.removed):
                raise ValueError(f"{self.cfg.out_dir}: the inputs now hold more documents than when the "
                                 f"signatures were computed; rerun every stage")
            if not self.removed[i] and skip_reason(doc.text, self.cfg.max_doc_bytes) is None:
                yield doc


def copy_kept(directory: Path, removed: np.ndarray, path: Path) -> int:
    """Stage C from the lines stage A kept (``SignatureStep(keep_lines=True)`` in ``directory``): write the lines of
    the shard's documents that ``removed`` (a mask by global index) leaves, in order, to ``path``; the count.
    The same bytes as ``write_jsonl`` over ``RemoveStep``, without reading the inputs again. ``dedup`` deletes the
    lines once copied (a later stage C reads the inputs again)."""
    index, offsets = np.load(directory / "index.npy"), np.load(directory / "line_offsets.npy")
    keep = ~removed[index]
    lines = _raw(directory / "lines.bin", np.uint8)
    runs = np.flatnonzero(np.diff(np.r_[0, keep.astype(np.int8), 0])).reshape(-1, 2)  # [first, end) of kept rows
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for first, end in runs.tolist():
            f.write(lines[offsets[first]:offsets[end]])
    return int(keep.sum())


def _read(cfg: DedupConfig, stats: ReadStats | None = None, keep_raw: bool = False) -> Iterator[Document]:
    """The inputs; ``keep_raw`` keeps each JSON line so that a kept document is copied, not encoded again."""
    return read_documents(cfg.inputs, cfg.text_field, cfg.text_split, stats, on_error="skip", keep_raw=keep_raw)


def dedup(cfg: DedupConfig, stage: str = "all", shard_index: int | None = None, num_shards: int | None = None) -> dict:
    """Deduplicate ``cfg.inputs`` into ``cfg.out_dir``; returns {stage: summary} for the stages run.

    ``shard_index=None`` runs every shard: in turn, or with ``cfg.executor="ray"`` as Ray tasks (stage A and C per
    shard, B as one task; ``curate/executor.py``), with the same outputs. ``num_shards=None``: 1, or under Ray one
    shard per CPU of the cluster. As a job array: stage "signatures" for each shard index, then "clusters" once,
    then "write" for each shard index. Finished signature shards are reused.
    The whole run (stage "all", every shard) is written to a temporary folder beside ``out_dir`` and moved into
    place on success, so a failure (no documents read, most records malformed, an interrupt) leaves ``out_dir``
    as it was; the stages of a job array write in place.
    """
    check_config(cfg)
    lookup({s: s for s in STAGES}, stage, "stage")
    if not cfg.inputs:
        raise ValueError("dedup: inputs is empty; set inputs=PATH[,PATH...] (files, directories or globs)")
    if shard_index is not None and not 0 <= shard_index < (num_shards or 1):
        raise ValueError(f"dedup: shard_index must be in [0, {num_shards or 1}), got {shard_index}")
    with executor(cfg, "dedup", shard_index) as ex:
        num_shards = num_shards or ex.num_cpus
        if stage != "all" or shard_index is not None:
            save_config(cfg.out_dir, cfg)
            return _stages(cfg, stage, range(num_shards) if shard_index is None else [shard_index], num_shards,
                           Path(cfg.out_dir), ex.map)
        with staged_dir(cfg.out_dir, last=("report.json",)) as tmp:
            staged = dataclasses.replace(cfg, out_dir=str(tmp))
            save_config(tmp, cfg)
            _reuse_signatures(cfg, tmp, num_shards)
            result = _stages(staged, stage, range(num_shards), num_shards, Path(cfg.out_dir), ex.map)
            result["clusters"]["config"] = asdict(cfg)  # the folder it ends up in, not the temporary one
            write_json(tmp / "report.json", result["clusters"])
    for summary in result["write"]:
        summary["path"] = str(Path(cfg.out_dir) / Path(summary["path"]).relative_to(tmp))
    return result


def _reuse_signatures(cfg: DedupConfig, tmp: Path, num_shards: int) -> None:
    """Link the finished signature shards of an earlier run in ``cfg.out_dir`` into ``tmp``; those made with the
    same settings are then reused, and the old folder is never touched."""
    for rank in range(num_shards):
        old = shard_dir(cfg.out_dir, "signatures", rank, num_shards)
        if (old / "done.json").exists() and json.loads((old / "done.json").read_text())["key"] == _signature_key(cfg):
            shutil.copytree(old, shard_dir(tmp, "signatures", rank, num_shards), copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def _stages(cfg: DedupConfig, stage: str, ranks, num_shards: int, shown: Path, map_shards: Callable = map) -> dict:
    """The stages ``stage`` names, for the shards ``ranks``, writing under ``cfg.out_dir`` (``shown`` in messages).
    ``map_shards(fn, items)`` runs the per-shard work (the builtin ``map``, or Ray tasks); this process prints."""
    out, result = Path(cfg.out_dir), {}
    if stage in ("all", "signatures"):
        result["signatures"] = []
        for rank, (info, warning) in zip(ranks, map_shards(functools.partial(_sign_shard, cfg, num_shards), ranks)):
            if warning:
                print(warning, file=sys.stderr)
            result["signatures"].append(info)
            print(f"dedup signatures {rank}-of-{num_shards}: {info['num_docs']:,} documents, "
                  f"{info['num_bytes'] / 1e6:.1f} MB in {info['seconds']:.1f} s")
    if stage in ("all", "clusters"):
        [report] = map_shards(functools.partial(build_clusters, cfg), [num_shards])  # one task
        result["clusters"] = report
        print(f"dedup clusters: {report['num_removed']:,} of {report['num_processed']:,} documents removed "
              f"({report['num_exact_removed']:,} exact, {report['num_near_removed']:,} near) "
              f"-> {shown / 'report.json'}")
    if stage in ("all", "write"):
        result["write"], step = [], RemoveStep(cfg)
        for rank, summary in zip(ranks, map_shards(functools.partial(_write_shard, cfg, step, num_shards), ranks)):
            result["write"].append(summary)
            print(f"dedup write {rank}-of-{num_shards}: {summary['num_kept']:,} documents -> "
                  f"{shown / Path(summary['path']).relative_to(out)}")
    return result


def _sign_shard(cfg: DedupConfig, num_shards: int, rank: int) -> tuple[dict, str | None]:
    """Stage A for one shard, unless a finished one with the same settings is there: (its done.json, a warning)."""
    directory, warning = shard_dir(cfg.out_dir, "signatures", rank, num_shards), None
    done = directory / "done.json"
    if not (done.exists() and json.loads(done.read_text())["key"] == _signature_key(cfg)):
        stats = ReadStats()
        docs = checked(_read(cfg, stats, keep_raw=True), stats, "dedup", cfg.inputs, cfg.text_field)
        SignatureStep(cfg, keep_lines=True).run(shard_of(docs, rank, num_shards), rank, num_shards)
        write_json(directory / "read.json", asdict(stats))
        warning = read_warning(stats, "dedup", cfg.inputs, cfg.text_field)
    return json.loads(done.read_text()), warning


def _write_shard(cfg: DedupConfig, step: RemoveStep, num_shards: int, rank: int) -> dict:
    """Stage C for one shard: its kept documents, copied from stage A's lines or read again; the summary."""
    path = Path(cfg.out_dir) / "kept" / f"{rank:05d}-of-{num_shards:05d}.jsonl"
    directory = shard_dir(cfg.out_dir, "signatures", rank, num_shards)
    if (directory / "line_offsets.npy").exists():
        num_kept = copy_kept(directory, step.removed, path)
        for name in ("line_offsets.npy", "lines.bin"):  # a copy of the input: not kept once used
            (directory / name).unlink()
    else:  # signatures made without their lines (an earlier version, or SignatureStep used alone)
        docs = step.run(shard_of(_read(cfg, keep_raw=True), rank, num_shards), rank, num_shards)
        num_kept = write_jsonl(path, docs, cfg.text_field)
    return dict(path=str(path), num_kept=num_kept)
