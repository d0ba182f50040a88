"""Tokenization throughput on the Gutenberg books: MB of UTF-8 text per second, as a markdown table.

    python benchmarks/tokenize_throughput.py [--tokenizer PATH] [--books DIR] [--vocab-size 8192] [--quick]

Without --tokenizer, a byte-level BPE is first trained on the first 10 books. Rows: HF ``encode_batch``
in this process (Rust threads, TOKENIZERS_PARALLELISM default), our cached ``Tokenizer.encode_flat``
in this process, ``tokenize_to_shards`` with 1 and 2 worker processes (1: in this process), the same with 2
workers reading the books from a JSON Lines file (``read_documents``, as the tokenize stage reads its input), and
tiktoken's gpt2 encoding (``encode_ordinary_batch``) when tiktoken happens to be installed. ``--quick``: only the
two 2-worker rows, once each (issue 17 asks for at least 11 MB/s with 2 workers).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

from slmforge.curate.documents import Document, read_documents, write_jsonl
from slmforge.tokens.shards import tokenize_to_shards
from slmforge.tokens.tokenizer import Tokenizer, train_tokenizer

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg" / "books"


def timed(fn, repeat: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the run with the least wall time, the one least disturbed by other work.

    CPU seconds count this process and its finished children (the pool workers) in user and system mode.
    """
    runs = []
    for _ in range(repeat):
        cpu, start = os.times(), time.perf_counter()
        fn()
        wall, end = time.perf_counter() - start, os.times()
        runs.append((wall, sum(end[:4]) - sum(cpu[:4])))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="tokenizer.json or its directory; default: train one")
    parser.add_argument("--books", default=str(BOOKS), help="directory of .txt files")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest is reported")
    parser.add_argument("--quick", action="store_true", help="only the 2-worker rows, one run each")
    args = parser.parse_args()
    if args.quick:
        args.repeat = 1

    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(args.books).glob("*.txt"))]
    num_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"{len(texts)} documents, {num_mb:.1f} MB, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = args.tokenizer
        if tokenizer_path is None:
            tokenizer_path = Path(tmp) / "tokenizer.json"
            seconds, _ = timed(lambda: train_tokenizer(texts[:10], args.vocab_size, tokenizer_path), 1)
            print(f"trained vocab {args.vocab_size} on 10 books in {seconds:.1f} s")
        # The worker rows first: forked workers are then created before this process starts HF's threads.
        rows = {f"tokenize_to_shards, num_workers={n}": partial(
            tokenize_to_shards, texts, tokenizer_path, Path(tmp) / f"shards{n}", n, progress=False) for n in (1, 2)}
        jsonl = Path(tmp) / "books.jsonl"
        write_jsonl(jsonl, (Document(f"book{i}", t) for i, t in enumerate(texts)))
        rows["tokenize_to_shards from books.jsonl, num_workers=2"] = lambda: tokenize_to_shards(
            (d.text for d in read_documents(jsonl)), tokenizer_path, Path(tmp) / "shards_jsonl", 2, progress=False)
        if args.quick:
            del rows["tokenize_to_shards, num_workers=1"]
            seconds = {name: timed(fn, args.repeat) for name, fn in rows.items()}
            return _table(seconds, num_mb)
        hf = Tokenizer.load(tokenizer_path).hf
        rows["HF encode_batch, in process"] = lambda: hf.encode_batch(texts, add_special_tokens=False)
        # A fresh Tokenizer per run, so that its piece cache starts cold as it does in a worker.
        rows["Tokenizer.encode_flat, in process"] = lambda: Tokenizer.load(tokenizer_path).encode_flat(texts)
        try:
            import tiktoken

            # Downloads the gpt2 ranks on first use; offline without a cached copy this fails.
            encoding = tiktoken.get_encoding("gpt2")
        except Exception as exc:
            print(f"no tiktoken reference row: {type(exc).__name__}: {exc}")
        else:
            rows["tiktoken gpt2 encode_ordinary_batch"] = partial(encoding.encode_ordinary_batch, texts)
        seconds = {name: timed(fn, args.repeat) for name, fn in rows.items()}
    _table(seconds, num_mb)


def _table(seconds: dict[str, tuple[float, float]], num_mb: float) -> None:
    print("\n| method | seconds | MB/s | CPU seconds | MB per CPU second |\n|---|---:|---:|---:|---:|")
    for name, (wall, cpu) in seconds.items():
        print(f"| {name} | {wall:.2f} | {num_mb / wall:.1f} | {cpu:.2f} | {num_mb / cpu:.1f} |")


if __name__ == "__main__":
    main()
