"""The model-driven coder: the LM's next-token distribution, quantised to integers, drives the range coder.

Delétang et al. 2023, Language Modeling Is Compression (arXiv 2309.10668): a model that assigns ``p`` to the next
token codes it in ``-log2 p`` bits with an arithmetic coder, so the compressed size is the model's summed log loss.

**Both sides compute the same floats.** The decompressor sees a token only after decoding it, so the compressor
runs exactly the computation the decompressor can run: ``drive`` feeds one token at a time through ``LM.forward``
with the KV cache, for a batch of independent chunks (one per row), on the same schedule on both sides: a row whose
chunk ends leaves the batch after the same step, and when the cache holds ``context`` slots both sides start a new
one from each row's last ``keep`` tokens (one prefill). Nothing is computed with a full forward on one side and
incrementally on the other. ``reference_mode`` fixes what could differ between two processes on one machine: one
thread (a sum's order follows the threads) and ``F.linear`` for every matmul (``SLMFORGE_KERNELS=torch``: the fast
CPU kernels are chosen by timing, which two processes may see differently).

**Quantisation.** ``freq_i = 1 + floor(p_i * (2^31 - V))`` from the float32 softmax, in float64: every token keeps
a non-zero frequency, and the total is the exact integer sum of the table, with no float renormalisation. The
floor and the +1 cost under 2^-19 bits a token at V = 8192.

**Across machines.** Another CPU (its vector width: AVX2 or AVX-512 kernels in MKL and ATen), another thread
library, torch or MKL version may round differently, so a file is guaranteed to decompress only where the floats
match: in practice the same machine type and software. ``probe_fingerprint`` hashes the quantised tables of a
fixed probe text; the file records it and decompression refuses to start where it differs (one line, nothing
written), and the CRC32 of the original catches anything the probe does not. Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from slmforge.checkpoint import WEIGHTS, find_checkpoint, find_tokenizer
from slmforge.compress.coder import Decoder, Encoder
from slmforge.model.ops import choice

TOTAL_BITS = 31  # tables sum to about 2^31: below coder.MAX_TOTAL = 2^32 even when float32 p sums past 1
PROBE_TEXT = ("It was the best of times, it was the worst of times; 1234567890 \u00e9t\u00e9 <|eos|>\n"
              "The quick brown fox jumps over the lazy dog.")
PROBE_TOKENS, PROBE_CONTEXT, PROBE_KEEP = 24, 16, 8  # enough to pass a window slide and a row leaving

Pick = Callable[[int, list[int], np.ndarray, np.ndarray], list[int]]


@contextlib.contextmanager
def reference_mode():
    """One thread and ``F.linear`` for every float32 matmul while coding; the settings before are restored."""
    threads, kernels = torch.get_num_threads(), os.environ.get(choice.KERNELS_ENV)
    os.environ[choice.KERNELS_ENV] = "torch"
    choice.reset()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if kernels is None:
            os.environ.pop(choice.KERNELS_ENV, None)
        else:
            os.environ[choice.KERNELS_ENV] = kernels
        choice.reset()


def model_identity(run: str | Path, cfg) -> tuple[bytes, str]:
    """(sha256 of the checkpoint's weights file then tokenizer.json, a note naming them for messages)."""
    run_dir, ckpt = find_checkpoint(run)
    digest = hashlib.sha256()
    for path in (ckpt / WEIGHTS, find_tokenizer(run_dir, cfg)):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.digest(), f"{run_dir.root.name}/{ckpt.name} torch {torch.__version__}"


def quantise(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """logits (B, V) -> (frequencies, their cumulative sums), both (B, V) int64; row b's total is cum[b, -1]."""
    p = torch.softmax(logits.float(), dim=-1).numpy()  # (B, V) float32
    freq = (p.astype(np.float64) * float((1 << TOTAL_BITS) - p.shape[1])).astype(np.int64) + 1
    return freq, np.cumsum(freq, axis=1)


@torch.inference_mode()
def drive(model, lengths: list[int], context: int, keep: int, eos_id: int, pick: Pick,
          progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """The one schedule both sides run: a batch of rows, row r coding ``lengths[r]`` tokens after an EOS.

    Each step quantises the batch's next-token distributions and calls ``pick(t, rows, freq, cum)``, which codes
    (or decodes) token t of each live row and returns them; rows whose chunk is done then leave the batch, and the
    tokens are fed back. A cache that holds ``context`` slots is replaced by a new one prefilled with each row's
    last ``keep`` tokens. Returns each row's tokens.
    """
    rows = list(range(len(lengths)))  # batch position -> row
    history = [[eos_id] for _ in lengths]
    caches = model.init_cache(len(rows), context)
    logits = model(torch.full((len(rows), 1), eos_id), cache=caches)[0][:, -1]
    t = 0
    while rows:
        freq, cum = quantise(logits)
        for r, token in zip(rows, pick(t, rows, freq, cum)):
            history[r].append(token)
        if progress is not None:
            progress(len(rows))
        t += 1
        alive = [i for i, r in enumerate(rows) if lengths[r] > t]
        if len(alive) < len(rows):
            index = torch.tensor(alive, dtype=torch.long)
            for cache in caches:
                cache.keep(index)
            rows = [rows[i] for i in alive]
        if not rows:
            break
        if caches[0].pos >= context:
            caches = model.init_cache(len(rows), context)
            window = torch.tensor([history[r][-keep:] for r in rows])  # (B, keep)
            logits = model(window, cache=caches, last_only=True)[0][:, -1]
        else:
            logits = model(torch.tensor([[history[r][-1]] for r in rows]), cache=caches)[0][:, -1]
    return [h[1:] for h in history]


def encode_rows(model, chunks: list[list[int]], context: int, keep: int, eos_id: int,
                progress: Callable[[int], None] | None = None) -> list[bytes]:
    """Token chunks (one per row, none empty) -> one coded stream per chunk."""
    encoders = [Encoder() for _ in chunks]

    def pick(t: int, rows: list[int], freq: np.ndarray, cum: np.ndarray) -> list[int]:
        tokens = np.array([chunks[r][t] for r in rows])
        at = np.arange(len(rows))
        sizes, ends, totals = freq[at, tokens].tolist(), cum[at, tokens].tolist(), cum[:, -1].tolist()
        for r, size, end, total in zip(rows, sizes, ends, totals):
            encoders[r].encode(end - size, size, total)
        return tokens.tolist()

    drive(model, [len(c) for c in chunks], context, keep, eos_id, pick, progress)
    return [e.finish() for e in encoders]


def decode_rows(model, streams: list[bytes], lengths: list[int], context: int, keep: int, eos_id: int,
                progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """The inverse of ``encode_rows``: coded streams and their numbers of tokens -> the token chunks."""
    decoders = [Decoder(s) for s in streams]

    def pick(t: int, rows: list[int], freq: np.ndarray, cum: np.ndarray) -> list[int]:
        out = []
        for i, r in enumerate(rows):
            dec, row = decoders[r], cum[i]
            token = int(np.searchsorted(row, dec.target(int(row[-1])), side="right"))
            size = int(freq[i, token])
            dec.consume(int(row[token]) - size, size)
            out.append(token)
        return out

    return drive(model, lengths, context, keep, eos_id, pick, progress)


def code_length_bits(model, chunks: list[list[int]], context: int, keep: int, eos_id: int) -> float:
    """The summed ``-log2(freq / total)`` of the chunks under the same schedule: what an ideal coder would spend."""
    bits = [0.0]

    def pick(t: int, rows: list[int], freq: np.ndarray, cum: np.ndarray) -> list[int]:
        tokens = np.array([chunks[r][t] for r in rows])
        at = np.arange(len(rows))
        bits[0] += float(-np.log2(freq[at, tokens] / cum[:, -1]).sum())
        return tokens.tolist()

    drive(model, [len(c) for c in chunks], context, keep, eos_id, pick)
    return bits[0]


def probe_fingerprint(model, tokenizer) -> bytes:
    """8 bytes of sha256 over the quantised tables of a fixed probe text, coded under ``reference_mode`` by the
    same schedule as a file: two rows (the second ends early), a window slide. Equal on two machines that
    compute the same floats; different, almost surely, where they do not."""
    tokens = tokenizer.encode_text(PROBE_TEXT)[:PROBE_TOKENS]
    digest = hashlib.sha256()

    def pick(t: int, rows: list[int], freq: np.ndarray, cum: np.ndarray) -> list[int]:
        digest.update(np.ascontiguousarray(cum, dtype="<i8").tobytes())
        return [tokens[t] for _ in rows]

    with reference_mode():
        drive(model, [len(tokens), len(tokens) // 2], PROBE_CONTEXT, PROBE_KEEP, tokenizer.eos_id, pick)
    return digest.digest()[:8]
