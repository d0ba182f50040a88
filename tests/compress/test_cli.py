"""``slmforge compress`` / ``decompress`` as users run them: compressor and decompressor in separate processes;
errors are one line, exit status 2, and leave no output file behind."""

import random
import re
import subprocess
import sys

import pytest

from slmforge.cli import main
from tests.compress.conftest import sample_text

SPECIAL = {
    "empty": b"",
    "one_byte": b"x",
    "repeated_byte": b"\xff" * 4000,
    "repeated_letter": b"a" * 1000,
    "random": random.Random(3).randbytes(3000),
    "invalid_utf8": b"\xc3(" + sample_text().encode() + b"\xa0\xa1 caf\xe9 " + sample_text()[:80].encode() + b"\xf0",
}


def slmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slmforge", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", SPECIAL)
def test_round_trip_in_separate_processes(run, tmp_path, name):
    original, packed, back = tmp_path / name, tmp_path / f"{name}.slmz", tmp_path / f"{name}.out"
    original.write_bytes(SPECIAL[name])
    done = slmforge("compress", str(run), str(original), str(packed), "chunk_tokens=200", "batch_rows=2")
    assert done.returncode == 0, done.stderr
    assert f"{len(SPECIAL[name]):,} -> {packed.stat().st_size:,} bytes" in done.stderr
    done = slmforge("decompress", str(run), str(packed), str(back))
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == SPECIAL[name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, packed.name, back.name])  # no temporaries


def test_repeated_and_raw_inputs_compress(run, tmp_path):
    """Raw bytes cost themselves and the header; a repeated raw byte (LZMA2) far less."""
    from slmforge.compress.codec import compress

    assert len(compress(run, SPECIAL["random"], show_progress=False)[0]) < len(SPECIAL["random"]) + 150  # the header: ids, checksums, a note
    assert len(compress(run, SPECIAL["repeated_byte"], show_progress=False)[0]) < 150


@pytest.fixture(scope="module")
def packed(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "text.slmz"
    (path.parent / "text.txt").write_text(sample_text())
    assert main(["compress", str(run), str(path.parent / "text.txt"), str(path), "batch_rows=2"]) == 0
    return path


def damaged(packed, tmp_path, kind: str):
    data = packed.read_bytes()
    out = tmp_path / f"{kind}.slmz"
    if kind == "truncated":
        out.write_bytes(data[: len(data) - 7])
    elif kind == "corrupted":
        out.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    else:
        out.write_bytes(b"plain text, not compressed\n")
    return out


@pytest.mark.parametrize("kind, message", [
    ("truncated", r"truncated \(the compressed data is \d+ bytes, the header says \d+\)"),
    ("corrupted", r"corrupted \(the checksum of the compressed data differs\)"),
    ("foreign", r"not a file made by `slmforge compress`"),
])
def test_damaged_files_are_one_line_errors_and_write_nothing(run, packed, tmp_path, capsys, kind, message):
    path = damaged(packed, tmp_path, kind)
    out = tmp_path / "out.txt"
    assert main(["decompress", str(run), str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"slmforge decompress: error: {path}: ")
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no output, no temporary


def test_another_model_is_one_line_and_writes_nothing(other_run, packed, tmp_path, capsys):
    out = tmp_path / "out.txt"
    assert main(["decompress", str(other_run), str(packed), str(out)]) == 2
    err = capsys.readouterr().err
    assert "compressed with another model (coder/step_000000" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_bad_keys_and_missing_files(run, tmp_path, capsys):
    assert main(["compress", str(run), str(tmp_path / "missing.txt"), str(tmp_path / "o")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main(["compress", str(run), str(tmp_path / "missing.txt"), str(tmp_path / "o"), "batch_rows=0"]) == 2
    assert "batch_rows=0: expected a value >= 1" in capsys.readouterr().err
    assert main(["decompress", str(tmp_path / "no_run"), str(tmp_path / "o"), str(tmp_path / "p")]) == 2
    assert not any(tmp_path.iterdir())
