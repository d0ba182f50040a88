"""The model coder (``slmforge compress``) against gzip -9, bzip2 -9, xz -9e and zstd -19: bits per byte and KB/s.

    python benchmarks/compress.py RUN [FILES ...] [--quick] [--chunks 256,512,1024,2048] [--out DIR]

FILES default to the five held-out Gutenberg books (split "valid" in ../shared/data/gutenberg/manifest.tsv). The
model coder runs as users run it, ``python -m slmforge compress`` then ``decompress`` in separate processes (its
KB/s is the original's size over each process's whole wall time, start-up and model loading included), and every
round trip is checked byte for byte. The baselines run in this process (Python's gzip, bz2, lzma; zstd from the
``zstandard`` package, else the ``zstd`` binary, else left out with a note). Then the special files of issue 24
(random bytes, empty, one byte, one repeated byte, invalid UTF-8, and 10 MB of books with binary blocks between
them; ``--quick`` leaves the 10 MB file out), and the chunk length's trade of ratio against speed on the first
file. Writes ``results.json`` and ``table.md`` to ``--out`` (default runs/bench_compress).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUTENBERG = ROOT.parent / "shared" / "data" / "gutenberg"
TS_ZIP = "ts_zip (RWKV-169M on a GPU) reports 1.08 bits per byte on enwik9 (Wikipedia XML; not the same text)"


def heldout_books() -> list[Path]:
    with open(GUTENBERG / "manifest.tsv", newline="") as f:
        return [GUTENBERG / "books" / row["file"] for row in csv.DictReader(f, delimiter="\t") if row["split"] == "valid"]


def baselines() -> dict:
    """name -> (compress, decompress) functions of bytes, or a note string when it cannot run here."""
    out = {"gzip -9": (lambda b: gzip.compress(b, 9, mtime=0), gzip.decompress),
           "bzip2 -9": (lambda b: bz2.compress(b, 9), bz2.decompress),
           "xz -9e": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}
    try:
        import zstandard

        out["zstd -19"] = (zstandard.ZstdCompressor(level=19).compress,
                           lambda b: zstandard.ZstdDecompressor().decompress(b, max_output_size=1 << 31))
    except ImportError:
        if shutil.which("zstd"):
            out["zstd -19"] = (lambda b: _pipe(["zstd", "-19", "-q", "-c"], b), lambda b: _pipe(["zstd", "-d", "-q", "-c"], b))
        else:
            out["zstd -19"] = "left out: neither the zstandard package nor the zstd binary is installed"
    return out


def _pipe(cmd: list[str], data: bytes) -> bytes:
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


def run_baseline(fns, data: bytes) -> dict:
    start = time.perf_counter()
    packed = fns[0](data)
    mid = time.perf_counter()
    assert fns[1](packed) == data
    end = time.perf_counter()
    return _row(len(data), len(packed), mid - start, end - mid)


def run_model(run: str, path: Path, tmp: Path, settings: list[str], workers: int) -> dict:
    packed, back = tmp / (path.name + ".slmz"), tmp / (path.name + ".out")
    seconds = []
    for argv in (["compress", run, str(path), str(packed), *settings], ["decompress", run, str(packed), str(back)]):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "slmforge", *argv, f"workers={workers}"], capture_output=True,
                              text=True)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv[:1])} {path.name} failed:\n{done.stderr}")
    same = back.read_bytes() == path.read_bytes()
    row = _row(path.stat().st_size, packed.stat().st_size, *seconds)
    row["round_trip"] = "exact" if same else "DIFFERS"
    packed.unlink()
    back.unlink()
    if not same:
        raise SystemExit(f"{path}: the round trip differs")
    return row


def _row(original: int, packed: int, compress_s: float, decompress_s: float) -> dict:
    return {"bytes": original, "compressed": packed, "bits_per_byte": 8 * packed / max(original, 1),
            "compress_kb_s": original / 1000 / compress_s, "decompress_kb_s": original / 1000 / decompress_s}


def special_files(tmp: Path, books: list[Path], quick: bool) -> list[Path]:
    rng = random.Random(24)
    text = books[0].read_bytes()[:20000] if books else b"plain English text. " * 1000
    files = {"random.bin": rng.randbytes(100_000), "empty.bin": b"", "one_byte.bin": b"A",
             "repeated_byte.bin": b"\xff" * 100_000,
             "invalid_utf8.txt": b"\xc3(" + text[:8000] + b"\xa0\xa1 caf\xe9 \xed\xa0\x80" + text[8000:] + b"\xf0\x9f"}
    if not quick:
        parts, size = [], 0
        while size < 10_000_000:
            for book in books or [None]:
                part = (book.read_bytes() if book else text) + rng.randbytes(4096)
                parts.append(part)
                size += len(part)
        files["ten_mb.bin"] = b"".join(parts)[:10_000_000]
    out = []
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out.append(tmp / name)
    return out


def table(results: dict, names: list[str]) -> str:
    lines = ["| file | bytes | model bpb | model KB/s (c / d) | " + " | ".join(f"{n} bpb" for n in names) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for file, rows in results.items():
        m = rows["model"]
        base = " | ".join(_size(rows[n]) if n in rows else "-" for n in names)
        lines.append(f"| {file} | {m['bytes']:,} | {_size(m)} | {m['compress_kb_s']:.2f} / "
                     f"{m['decompress_kb_s']:.2f} | {base} |")
    return "\n".join(lines)


def _size(row: dict) -> str:
    """Bits per byte, or for a file under 1 KB (where headers are all there is) the compressed bytes."""
    return f"{row['bits_per_byte']:.3f}" if row["bytes"] >= 1000 else f"{row['compressed']} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder of the model")
    parser.add_argument("files", nargs="*", help="files to compress (default: the five held-out Gutenberg books)")
    parser.add_argument("--quick", action="store_true", help="leave out the 10 MB file")
    parser.add_argument("--chunks", default="256,512,1024,2048", help="chunk_tokens values for the trade-off rows")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_compress"))
    args = parser.parse_args()
    books = [Path(f) for f in args.files] or heldout_books()
    fns = baselines()
    names = list(fns)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"run": args.run, "cpus": os.cpu_count(), "workers": args.workers, "files": {}, "special": {},
              "chunks": {}, "notes": [f"{n}: {v}" for n, v in fns.items() if isinstance(v, str)] + [TS_ZIP]}
    trained = Path(args.run) / "train_result.json"
    if trained.is_file():
        result = json.loads(trained.read_text())
        report["training_minutes"] = result.get("seconds", 0) / 60
        report["notes"].append(f"model: {result.get('num_params', 0):,} parameters, trained "
                               f"{report['training_minutes']:.0f} minutes ({result.get('steps')} steps)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for group, paths in (("files", books), ("special", special_files(tmp, books, args.quick))):
            for path in paths:
                data = path.read_bytes()
                rows = {"model": run_model(args.run, path, tmp, [], args.workers)}
                rows.update({n: run_baseline(f, data) for n, f in fns.items() if not isinstance(f, str)})
                report[group][path.name] = rows
                print(f"{path.name}: " + ", ".join(f"{n} {r['bits_per_byte']:.3f} bpb" for n, r in rows.items()),
                      flush=True)
        for chunk in [int(c) for c in args.chunks.split(",") if c]:
            row = run_model(args.run, books[0], tmp, [f"chunk_tokens={chunk}"], args.workers)
            report["chunks"][chunk] = row
            print(f"{books[0].name} chunk_tokens={chunk}: {row['bits_per_byte']:.3f} bpb, "
                  f"{row['compress_kb_s']:.2f} / {row['decompress_kb_s']:.2f} KB/s", flush=True)
    chunk_lines = ["| chunk_tokens | bpb | KB/s compress | KB/s decompress |", "|---:|---:|---:|---:|"]
    chunk_lines += [f"| {c} | {r['bits_per_byte']:.3f} | {r['compress_kb_s']:.2f} | {r['decompress_kb_s']:.2f} |"
                    for c, r in report["chunks"].items()]
    text = "\n\n".join([table(report["files"], names), table(report["special"], names),
                        f"Chunk length on {books[0].name} (workers={args.workers}):\n\n" + "\n".join(chunk_lines),
                        "\n".join(f"- {n}" for n in report["notes"])])
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
