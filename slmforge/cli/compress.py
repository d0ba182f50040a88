"""``slmforge compress RUN IN OUT`` and ``slmforge decompress RUN IN OUT``: lossless coding with a trained model.

OUT appears whole or not at all (written under a temporary name, then renamed); a damaged or foreign file, another
model or a machine that computes other probabilities is one line and exit status 2, and nothing is written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from slmforge.cli.common import config_args, load_args
from slmforge.config import check_min


@dataclass
class CompressConfig:
    """``slmforge compress RUN book.txt book.slmz chunk_tokens=1024``."""

    chunk_tokens: int = 0  # tokens per chunk, each coded on its own (context restarts); 0 = enough for 2 batches
    batch_rows: int = 32  # chunks coded together as the rows of one batch
    workers: int = 2  # processes of one thread each; the output does not depend on it
    context: int = 0  # tokens the model sees (a sliding window); 0 = the run's data.seq_len

    def validate(self, prefix: str = "") -> None:
        check_min(self, prefix, 1, "batch_rows workers")
        check_min(self, prefix, 0, "chunk_tokens context")


@dataclass
class DecompressConfig:
    """``slmforge decompress RUN book.slmz book.txt``."""

    workers: int = 2  # processes of one thread each; the output does not depend on it

    def validate(self, prefix: str = "") -> None:
        check_min(self, prefix, 1, "workers")


def cmd_compress(args) -> None:
    from slmforge.compress.codec import compress

    cfg = load_args(args)
    data = Path(args.input).read_bytes()
    blob, stats = compress(args.run, data, cfg.chunk_tokens, cfg.batch_rows, cfg.workers, cfg.context)
    _write(args.output, blob)
    print(f"{args.input}: {stats.original_bytes:,} -> {stats.compressed_bytes:,} bytes, {stats.bits_per_byte:.3f} "
          f"bits/byte, {stats.num_tokens:,} tokens, {stats.seconds:.1f} s ({stats.kb_per_second:.2f} KB/s)",
          file=sys.stderr)


def cmd_decompress(args) -> None:
    from slmforge.compress.codec import decompress

    cfg = load_args(args)
    data, stats = decompress(args.run, Path(args.input).read_bytes(), args.input, cfg.workers)
    _write(args.output, data)
    print(f"{args.input}: {stats.compressed_bytes:,} -> {stats.original_bytes:,} bytes, {stats.seconds:.1f} s "
          f"({stats.kb_per_second:.2f} KB/s)", file=sys.stderr)


def _write(path: str, data: bytes) -> None:
    from slmforge.runs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def register(sub) -> None:
    for name, fn, cls, what in (
            ("compress", cmd_compress, CompressConfig, "compress a file losslessly with a trained model (an "
                                                       "arithmetic coder driven by its next-token probabilities)"),
            ("decompress", cmd_decompress, DecompressConfig, "decompress a file made by `slmforge compress` (the "
                                                             "same run folder, the same kind of machine)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("run", help="run folder or checkpoint folder")
        p.add_argument("input", help="the file to read")
        p.add_argument("output", help="the file to write (replaced whole, only on success)")
        config_args(p, cls, recipe=None)
        p.set_defaults(fn=fn)
