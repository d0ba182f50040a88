"""No silent emptiness (issue 15): a stage that reads nothing, misses its text field, skips most of its input,
scores an empty file or accepts no synthetic answer fails with one line of counts and exit code 2, and a failed
run leaves what an earlier run wrote exactly as it was. All through the CLI, in-process."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import yaml

from slmforge.cli import main
from slmforge.tokens.shards import load_shards, tokenize_to_shards
from slmforge.tokens.tokenizer import train_tokenizer
from tests.synth.synth_fault_server import FaultServer

WORDS = "river stone garden window market winter summer yellow silver orange doctor teacher farmer writer".split()


def _text(i: int) -> str:
    rng = random.Random(i)  # distinct documents: no two are near-duplicates
    return " ".join(rng.choice(WORDS) + str(rng.randrange(9)) for _ in range(30 + i % 7))


def _jsonl(path: Path, records: list, bad_lines: int = 0) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write("{broken json\n" * bad_lines)
    return path


def _docs(n: int, field: str = "text") -> list[dict]:
    return [{"id": f"d{i}", field: _text(i), "source": "test"} for i in range(n)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _error(err: str) -> str:
    """The CLI's error: the last line of stderr, which must start as the CLI's one-line errors do."""
    line = err.strip().splitlines()[-1]
    assert line.startswith("slmforge ") and ": error: " in line and "Traceback" not in err, err
    return line


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], list(folder.iterdir())


# ---------------------------------------------------------------- dedup and filter


@pytest.mark.parametrize("command", ["dedup", "filter"])
def test_wrong_text_field_is_an_error_with_the_fields_the_records_have(command, tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", _docs(12))
    extra = ["decontaminate=false"] if command == "filter" else ["num_workers=1"]
    rc, out, err = _run(capsys, [command, f"inputs={src}", "text_field=body", f"out_dir={tmp_path / 'out'}", *extra])
    line = _error(err)
    assert rc == 2
    assert f"0 documents read from {src}, 12 records: 12 lack the text field 'body'" in line
    assert "they have 'id', 'text', 'source'" in line and "text_field" in line
    assert not (tmp_path / "out").exists()  # nothing left behind
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("command", ["dedup", "filter"])
def test_all_malformed_and_mostly_malformed_input_are_errors(command, tmp_path, capsys):
    extra = ["decontaminate=false", "quality=false"] if command == "filter" else ["num_workers=1"]
    broken = _jsonl(tmp_path / "broken.jsonl", [], bad_lines=4)
    rc, _, err = _run(capsys, [command, f"inputs={broken}", f"out_dir={tmp_path / 'a'}", *extra])
    assert rc == 2 and f"0 documents read from {broken}, 4 records: 4 malformed; the first bad one: " \
                       f"{broken} line 1: invalid JSON" in _error(err)
    mostly = _jsonl(tmp_path / "mostly.jsonl", _docs(3), bad_lines=5)
    rc, _, err = _run(capsys, [command, f"inputs={mostly}", f"out_dir={tmp_path / 'b'}", *extra])
    assert rc == 2 and f"skipped 5 of 8 records of {mostly}, more than half: 5 malformed" in _error(err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("command", ["dedup", "filter"])
def test_a_few_skipped_records_are_a_warning_with_counts(command, tmp_path, capsys):
    extra = ["decontaminate=false", "quality=false"] if command == "filter" else ["num_workers=1"]
    src = _jsonl(tmp_path / "in.jsonl", _docs(9), bad_lines=1)
    rc, _, err = _run(capsys, [command, f"inputs={src}", f"out_dir={tmp_path / 'out'}", *extra])
    assert rc == 0
    assert [line for line in err.splitlines() if "warning" in line] == [
        f"{command}: warning: skipped 1 of 10 records of {src}: 1 malformed; the first bad one: {src} line 10: "
        f"invalid JSON (Expecting property name enclosed in double quotes at column 2); expected one JSON object "
        f"per line"]
    kept = [json.loads(line)["id"] for p in (tmp_path / "out" / "kept").iterdir() for line in p.open()]
    assert sorted(kept) == sorted(f"d{i}" for i in range(9))


@pytest.mark.parametrize("command", ["dedup", "filter"])
def test_a_failed_rerun_leaves_the_earlier_output_as_it_was(command, tmp_path, capsys):
    extra = ["decontaminate=false", "quality=false"] if command == "filter" else ["num_workers=1"]
    out = tmp_path / "out"
    src = _jsonl(tmp_path / "in.jsonl", _docs(10))
    assert _run(capsys, [command, f"inputs={src}", f"out_dir={out}", *extra])[0] == 0
    before = _snapshot(out)
    assert "kept/00000-of-00001.jsonl" in before and "report.json" in before and "config.yaml" in before
    rc, _, err = _run(capsys, [command, f"inputs={src}", f"out_dir={out}", "text_field=body", *extra])
    assert rc == 2 and "lack the text field 'body'" in _error(err)
    assert _snapshot(out) == before
    _no_temporaries(tmp_path)
    # A successful rerun replaces the outputs, and leaves no temporary folder either.
    src2 = _jsonl(tmp_path / "in2.jsonl", _docs(4))
    assert _run(capsys, [command, f"inputs={src2}", f"out_dir={out}", *extra])[0] == 0
    assert json.loads((out / "report.json").read_text())["num_docs"] == 4
    assert yaml.safe_load((out / "config.yaml").read_text())["inputs"] == [str(src2)]
    _no_temporaries(tmp_path)


def test_truncated_gzip_is_one_line_naming_the_file(tmp_path, capsys):
    whole = gzip.compress("".join(json.dumps(d) + "\n" for d in _docs(200)).encode())
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    for argv in (["dedup", f"inputs={path}", f"out_dir={tmp_path / 'out'}", "num_workers=1"],
                 ["filter", f"inputs={path}", f"out_dir={tmp_path / 'out'}", "decontaminate=false"]):
        rc, _, err = _run(capsys, argv)
        assert rc == 2 and f"{path}: truncated gzip file" in _error(err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- tokenize


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([_text(i) for i in range(50)], vocab_size=300, path=path)
    return path


def test_tokenize_of_empty_input_is_an_error_and_old_shards_stay_loadable(tokenizer, tmp_path, capsys):
    shards = tmp_path / "shards" / "train"
    src = _jsonl(tmp_path / "in.jsonl", _docs(20))
    assert _run(capsys, ["tokenize", str(src), f"tokenizer={tokenizer}", f"out={shards}", "num_workers=1"])[0] == 0
    before, tokens = _snapshot(shards), load_shards(shards).meta["num_tokens"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, _, err = _run(capsys, ["tokenize", str(empty), f"tokenizer={tokenizer}", f"out={shards}"])
    assert rc == 2 and _error(err).endswith(f"tokenize: {empty}: no records at all (empty input); nothing to do")
    # A re-tokenize that fails midway (a malformed record after good ones) used to delete meta.json.
    bad = _jsonl(tmp_path / "bad.jsonl", _docs(20), bad_lines=1)
    rc, _, err = _run(capsys, ["tokenize", str(bad), f"tokenizer={tokenizer}", f"out={shards}", "num_workers=1"])
    assert rc == 2 and f"{bad} line 21: invalid JSON" in _error(err)
    assert _snapshot(shards) == before and load_shards(shards).meta["num_tokens"] == tokens
    _no_temporaries(shards.parent)
    # Empty documents only: also nothing to tokenize, and a new folder is not even created.
    blank = _jsonl(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    rc, _, err = _run(capsys, ["tokenize", str(blank), f"tokenizer={tokenizer}", f"out={tmp_path / 'new'}"])
    assert rc == 2 and "0 documents read from" in _error(err) and "2 with empty text" in _error(err)
    assert not (tmp_path / "new").exists()


def test_tokenize_rewrites_shards_in_place_without_stale_files(tokenizer, tmp_path, capsys):
    shards = tmp_path / "shards"
    tokenize_to_shards((_text(i) for i in range(60)), tokenizer, shards, num_workers=1, shard_tokens=200)
    assert len(list(shards.glob("tokens-*.bin"))) > 1
    big = _jsonl(tmp_path / "big.jsonl", _docs(60))
    assert _run(capsys, ["tokenize", str(big), f"tokenizer={tokenizer}", f"out={shards}", "num_workers=1"])[0] == 0
    assert sorted(p.name for p in shards.iterdir()) == ["docs-00000.npy", "meta.json", "tokens-00000.bin"]
    assert load_shards(shards).meta["num_docs"] == 60
    _no_temporaries(tmp_path)


# ---------------------------------------------------------------- eval ppl


def test_eval_ppl_of_an_empty_file_is_an_error(tmp_path, capsys):
    from tests.conftest import make_run

    run = make_run(tmp_path, "ppl")
    for name, text, what in (("empty.txt", "", "empty"), ("blank.txt", "\n  \n", "only whitespace")):
        (tmp_path / name).write_text(text)
        rc, out, err = _run(capsys, ["eval", "ppl", str(run), str(tmp_path / name)])
        assert rc == 2 and _error(err) == (f"slmforge eval: error: {tmp_path / name}: {what}; give a file with "
                                           f"text to score")
        assert "perplexity 1.00" not in out
    assert not (run / "eval").exists()
    (tmp_path / "text.txt").write_text(_text(1))
    rc, out, _ = _run(capsys, ["eval", "ppl", str(run), str(tmp_path / "text.txt")])
    assert rc == 0 and float(out.split("loss ")[1].split(",")[0]) > 1.0  # an untrained model: a real loss


# ---------------------------------------------------------------- synth


def test_synth_job_with_every_request_rejected_names_the_reasons(tmp_path, capsys):
    out = tmp_path / "out"
    job = dict(name="short-context", template="math", out_dir=str(out), topics=["a", "b", "c"],
               audiences=["grade 3"], styles=["two steps", "three steps"], dedup=True,
               teacher=dict(model="mock", concurrency=4, timeout=2.0, backoff_base=0.01, backoff_max=0.05))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with FaultServer(plan=lambda rid, attempt: "400") as server:  # a teacher that refuses every prompt
        rc, stdout, err = _run(capsys, ["synth", "--job", str(tmp_path / "job.yaml"),
                                        f"teacher.base_url={server.base_url}"])
    line = _error(err)
    assert rc == 2 and "no files match" not in err + stdout
    assert line.startswith("slmforge synth: error: synth short-context: 0 of 6 requests accepted, 6 rejected: "
                           "http 400 (6, e.g. 'http 400: ")
    assert "injected 400" in line and str(out / "rejects.jsonl") in line
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["written"], summary["rejected"]) == (0, 6) and "clean" not in summary
    assert not (out / "dedup").exists()


def test_synth_mostly_rejected_is_a_warning_with_the_reasons(tmp_path, capsys):
    from tests.synth.synth_fault_server import id_class

    job = dict(name="mostly", template="math", out_dir=str(tmp_path / "out"), topics=[f"t{i}" for i in range(10)],
               audiences=["grade 3"], styles=["two steps", "three steps"],
               teacher=dict(model="mock", concurrency=4, timeout=2.0, backoff_base=0.01, backoff_max=0.05))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with FaultServer(plan=lambda rid, attempt: "ok" if id_class(rid) < 3 else "malformed") as server:
        rc, _, err = _run(capsys, ["synth", "--job", str(tmp_path / "job.yaml"),
                                   f"teacher.base_url={server.base_url}"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert rc == 0 and 0 < summary["written"] < summary["rejected"]
    warning = [line for line in err.splitlines() if "warning" in line]
    assert warning == [f"synth mostly: warning: {summary['rejected']} rejected, {summary['written']} accepted: "
                       f"chatty preamble ({summary['rejected']}, e.g. \"chatty preamble: 'Sure! Here is a fun "
                       f"problem for you, I h'\")"]


def test_tokenize_workers_end_on_sigterm_whatever_the_parent_catches(tmp_path, monkeypatch):
    """Pool.terminate ends the forked workers with SIGTERM: a handler the parent installed (a server's graceful
    shutdown) must not reach them, or a worker blocked on the task queue never ends."""
    import signal

    from slmforge.tokens import shards

    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        monkeypatch.setattr(shards.Tokenizer, "load", staticmethod(lambda path: None))
        shards._init_worker("unused")
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
