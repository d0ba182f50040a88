"""One smoke test per subcommand, through ``cli.main`` as a user would call it."""

import json

import pytest

from slmforge.cli import main
from tests.conftest import tiny_run_config


def _overrides(cfg):
    import dataclasses

    flat = []

    def walk(prefix, obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(f"{prefix}{f.name}.", v)
            elif not isinstance(v, list):
                flat.append(f"{prefix}{f.name}={v}")

    walk("", cfg)
    return flat


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = tiny_run_config(tmp_path_factory.mktemp("cli"), name="demo", max_steps=20, eval_every=10, ckpt_every=10)
    assert main(["run", *_overrides(cfg)]) == 0
    return cfg.run_dir


def test_run_writes_report_and_skips_finished_stages(run_dir, capsys):
    report = json.loads((run_dir / "report.json").read_text())
    assert report["train"]["steps"] == 20
    assert report["eval"]["validation"]["loss"] < 5.77  # below ln(320): it learned something
    assert report["eval"]["validation"]["bits_per_byte"] > 0
    md = (run_dir / "report.md").read_text()
    assert "![loss](loss.png)" in md and "## Samples" in md
    cfg = json.loads(json.dumps(report))  # report is plain JSON
    assert cfg["samples"][0]["prompt"]
    # A second run reuses every stage.
    from slmforge.config import load_config
    from slmforge.pipeline import run

    capsys.readouterr()
    run(load_config(run_dir / "config.yaml"))
    out = capsys.readouterr().out
    assert "data: reusing" in out and "tokenizer: reusing" in out and "train: already finished" in out


def test_generate_and_chat(run_dir, capsys, monkeypatch):
    def generate(*args):
        assert main(["generate", str(run_dir), "prompt=Question: Tom", "max_new_tokens=12", "temperature=1.0",
                     *args]) == 0
        return capsys.readouterr().out

    # Sampled, not greedy: the same seed gives the same text, another seed another text.
    first, again, other = generate("seed=1"), generate("seed=1"), generate("seed=2")
    assert first.strip() and first == again and other != first
    answers = iter(["hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", str(run_dir), "max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("slmforge chat") and out.count("model> ") == 1  # one turn answered, then /exit


def test_generate_old_flags_are_aliases_of_the_keys(run_dir, capsys):
    greedy = ["prompt=Question: Tom", "max_new_tokens=6", "temperature=0"]
    assert main(["generate", str(run_dir), *greedy]) == 0
    full = capsys.readouterr().out
    # The old flags are hidden aliases of the same keys, with a note on stderr.
    assert main(["generate", str(run_dir), "--prompt", "Question: Tom", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == full and "--prompt is deprecated; write prompt=" in err


def test_stop_strings_are_cut(run_dir):
    from slmforge.serve.generate import generate
    from slmforge.checkpoint import load_for_inference

    model, tok, _ = load_for_inference(run_dir)
    full = generate(model, tok, "Question:", 20, temperature=0)
    assert len(full) > 2
    stop = full[1:3]
    cut = generate(model, tok, "Question:", 20, temperature=0, stop=[stop])
    assert stop not in cut and full.startswith(cut)


def test_dry_run_prints_counts(capsys):
    assert main(["train", "--dry-run", "preset=tiny", "train.max_steps=10"]) == 0
    out = capsys.readouterr().out
    assert "803,968 total" in out and "tokens: 40,960" in out


def test_plan(capsys):
    assert main(["plan", "gpu_hours=10", "gpu=a100"]) == 0
    assert "Compute-optimal" in capsys.readouterr().out
    assert main(["plan", "--presets"]) == 0
    assert "939,591,680" in capsys.readouterr().out


def test_synth_tokenizer_tokenize(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "corpus"), "data.num_train_docs=200",
                 "data.num_val_docs=20", "data.num_test_docs=20"]) == 0
    train_file = tmp_path / "corpus" / "train.jsonl"
    assert sum(1 for _ in train_file.open()) == 200
    assert main(["tokenizer", str(train_file), "vocab_size=300", f"out={tmp_path / 'tok.json'}"]) == 0
    assert main(["tokenize", str(tmp_path / "corpus" / "*.jsonl"), f"tokenizer={tmp_path / 'tok.json'}",
                 f"out={tmp_path / 'shards'}", "num_workers=1"]) == 0
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    assert meta["num_docs"] == 240


@pytest.mark.parametrize(
    "content,message",
    [(b'{"text": "ok"}\n{"text": broken\n', "line 2"), (b"\xff\xfe bad bytes", "UTF-8")],
    ids=["broken-jsonl", "non-utf8"],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, content, message):
    bad = tmp_path / ("bad.jsonl" if b"{" in content else "bad.txt")
    bad.write_bytes(content)
    out = tmp_path / "tok.json"
    assert main(["tokenizer", str(bad), "vocab_size=300", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "bad." in err and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_glob_matching_nothing(tmp_path, capsys):
    assert main(["tokenize", str(tmp_path / "*.jsonl"), "tokenizer=x.json", f"out={tmp_path / 's'}"]) == 2
    assert "*.jsonl" in capsys.readouterr().err


def test_unknown_override_key(capsys):
    assert main(["train", "--dry-run", "train.max_stpes=3"]) == 2
    assert "did you mean max_steps" in capsys.readouterr().err


def test_info_prints_parameters_and_state_bytes(capsys):
    from slmforge.config import preset
    from slmforge.plan import count_params

    assert main(["info", "tiny", "model.layers=attn,ssm", "model.block_repeat=2"]) == 0
    out = capsys.readouterr().out
    cfg = preset("tiny")
    cfg.layers, cfg.block_repeat = "attn,ssm", 2
    assert f"{count_params(cfg).total:,} total" in out and "from 2 unique blocks" in out
    assert "16,384 tokens" in out and "ssm" in out
    assert main(["info", "no-such-preset"]) == 2
