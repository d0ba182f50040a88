"""The README's manual path (synth -> tokenizer -> tokenize -> train -> generate -> chat), run as written.

The commands are read from README.md between ``<!-- manual-path -->`` and ``<!-- /manual-path -->`` and run in
subprocesses (``python -m slmforge``) in a temporary folder. Only two things change: a ``recipes/...`` argument
becomes the repository's file, and each subcommand gets the ``key=value`` items of ``SHRINK`` appended (the last
value of a key wins), so that the whole path takes seconds. Then the run folder it leaves serves the other entry
points that take a model; the errors of this path are checked on small shards of their own.
"""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slmforge.checkpoint import load_for_inference
from slmforge.cli import main
from slmforge.tokens.shards import file_sha256, load_meta, recorded_tokenizer, tokenize_to_shards
from slmforge.tokens.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- manual-path -->", "<!-- /manual-path -->"
SHRINK = {
    "synth": ["data.num_train_docs=200", "data.num_val_docs=60", "data.num_test_docs=20"],
    "train": ["model.d_model=32", "model.num_layers=1", "model.max_seq_len=64", "data.seq_len=32",
              "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2",
              "train.ckpt_every=2", "train.eval_batches=2"],
    "generate": ["max_new_tokens=12", "seed=0"],
    "chat": ["max_new_tokens=4"],
}


def readme_commands() -> list[list[str]]:
    """The argument lists of the manual-path block, comments dropped."""
    text = (REPO / "README.md").read_text()
    assert START in text and END in text, f"README.md has no {START} ... {END} block"
    block = text.split(START, 1)[1].split(END, 1)[0]
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.startswith("slmforge ")]
    return [argv for argv in lines if argv]


def shrunk(argv: list[str]) -> list[str]:
    """``slmforge SUB ARGS`` -> ``python -m slmforge SUB ARGS`` with the repository's recipes and SHRINK's sizes."""
    args = [str(REPO / a) if a.startswith("recipes/") else a for a in argv[1:]]
    return [sys.executable, "-m", "slmforge", *args, *SHRINK.get(argv[1], [])]


@pytest.fixture(scope="module")
def manual_path(tmp_path_factory):
    """Run the README block in a fresh folder; returns (folder, {subcommand: its stdout})."""
    folder = tmp_path_factory.mktemp("manual")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outputs = {}
    for argv in readme_commands():
        stdin = "hello\n/exit\n" if argv[1] == "chat" else ""
        done = subprocess.run(shrunk(argv), cwd=folder, env=env, input=stdin, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, done.stderr
        outputs[argv[1]] = done.stdout
    return folder, outputs


def test_the_readme_manual_path_runs_as_written(manual_path):
    folder, outputs = manual_path
    assert {"tokenizer", "tokenize", "train", "generate"} <= set(outputs)
    assert outputs["generate"].strip()  # generated text, not just a newline
    assert "model>" in outputs["chat"]
    # train prints a summary a person reads, not a Python repr
    train_out = outputs["train"]
    assert "RunResult(" not in train_out
    assert "trained 4 steps" in train_out and "final loss: train" in train_out and "runs/manual" in train_out
    # The shards record their tokenizer (absolute path and hash); the run folder holds a copy of it.
    meta = load_meta(folder / "shards" / "train")
    assert Path(meta["tokenizer"]).is_absolute() and meta["tokenizer_sha256"] == file_sha256(folder / "tok.json")
    assert (folder / "runs" / "manual" / "tokenizer.json").read_bytes() == (folder / "tok.json").read_bytes()


def test_other_entry_points_take_the_run_folder(manual_path, tmp_path, monkeypatch, capsys):
    folder, _ = manual_path
    run = str(folder / "runs" / "manual")
    assert main(["info", run]) == 0
    assert main(["eval", "ppl", run, str(folder / "corpus" / "test.jsonl"), f"out={tmp_path / 'ppl.json'}"]) == 0
    total = json.loads((tmp_path / "ppl.json").read_text())["total"]
    assert total["tokens"] > 0 and total["loss"] > 0 and total["perplexity"] == pytest.approx(math.exp(total["loss"]))
    assert main(["export", run, f"out={tmp_path / 'hf'}"]) == 0
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    # From another working directory too: nothing is looked up relative to where train ran.
    monkeypatch.chdir(tmp_path)
    model, tokenizer, cfg = load_for_inference(run)
    assert cfg.name == "manual" and tokenizer.vocab_size <= cfg.model.vocab_size


def test_a_run_without_its_copy_finds_the_tokenizer_its_shards_record(manual_path, tmp_path, monkeypatch):
    folder, _ = manual_path
    monkeypatch.chdir(folder)  # config.yaml says data.shards_dir=shards, relative to where train ran
    old = tmp_path / "old"
    shutil.copytree(folder / "runs" / "manual", old)
    (old / "tokenizer.json").unlink()
    assert load_for_inference(old)[1].vocab_size > 0
    (folder / "tok.json").rename(folder / "tok.moved.json")
    try:
        with pytest.raises(ValueError, match=f"{old}: no tokenizer .*copy the tokenizer.json this run was trained "
                                             f"with to {old / 'tokenizer.json'}"):
            load_for_inference(old)
    finally:
        (folder / "tok.moved.json").rename(folder / "tok.json")


# ---------------------------------------------------------------- errors of the path, on shards of their own


@pytest.fixture
def given_shards(tmp_path):
    """tmp_path/tok.json and tmp_path/shards/train (no validation split)."""
    texts = [f"Question: Tom has {i} apples and eats {i % 3}. How many are left?" for i in range(300)]
    train_tokenizer(texts, 300, tmp_path / "tok.json")
    tokenize_to_shards(texts, tmp_path / "tok.json", tmp_path / "shards" / "train", num_workers=1)
    return tmp_path


def _train(folder: Path, *extra: str) -> list[str]:
    return ["train", f"out_dir={folder / 'runs'}", "name=r", "model.vocab_size=320", "model.d_model=32",
            "model.num_layers=1", "model.max_seq_len=64", "data.seq_len=16", "train.batch_size=2",
            "train.max_steps=2", "train.eval_batches=1", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_missing_validation_split_names_the_command_that_makes_it(given_shards, capsys):
    shards = given_shards / "shards"
    assert main(_train(given_shards, f"data.shards_dir={shards}")) == 2
    err = _one_line_error(capsys)
    assert f"{shards / 'validation'}: no validation split" in err
    assert f"slmforge tokenize FILES tokenizer={given_shards / 'tok.json'} out={shards / 'validation'}" in err
    assert "did not finish" not in err


def test_missing_shards_folder_says_no_such_folder(given_shards, capsys):
    assert main(_train(given_shards, f"data.shards_dir={given_shards / 'nowhere'}")) == 2
    assert f"{given_shards / 'nowhere' / 'train'}: no such folder" in _one_line_error(capsys)


def test_a_changed_tokenizer_is_refused(given_shards, capsys):
    shards = given_shards / "shards"
    assert recorded_tokenizer(shards / "train") == (given_shards / "tok.json").resolve()
    train_tokenizer(["something else entirely"] * 50, 280, given_shards / "tok.json")
    assert main(_train(given_shards, f"data.shards_dir={shards}")) == 2
    err = _one_line_error(capsys)
    assert "tok.json changed after" in err and "data.tokenizer=PATH" in err


@pytest.mark.parametrize("missing", ["folder", "checkpoint", "config"])
def test_load_for_inference_names_the_run_folder_and_what_is_missing(manual_path, tmp_path, missing, capsys):
    folder, _ = manual_path
    run = tmp_path / "run"
    if missing != "folder":
        shutil.copytree(folder / "runs" / "manual", run)
        if missing == "checkpoint":  # checkpoints/latest is only a hint: the step_* folders are what is looked for
            shutil.rmtree(run / "checkpoints")
        else:
            (run / "config.yaml").unlink()
    assert main(["generate", str(run), "prompt=Question:"]) == 2
    err = _one_line_error(capsys)
    assert {"folder": f"{run}: no such run folder", "checkpoint": f"{run}: no checkpoint found",
            "config": f"{run}: no config.yaml"}[missing] in err
    assert "slmforge train" in err or "train.ckpt_every" in err
