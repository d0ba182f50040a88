"""What a person reads and shares: files as readable as the umask allows, progress in a log, a quiet end on a
closed pipe, ``--help`` with each key's default and description, and the planner's labels."""

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slmforge import runs
from slmforge.cli import build_parser, main
from slmforge.config.loading import field_comments
from slmforge.plan import PlanConfig, format_plan, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.vocab_size=320", "model.d_model=32", "model.num_layers=1", "model.attn.num_heads=4",
        "model.attn.num_kv_heads=2", "model.max_seq_len=64", "data.num_train_docs=200", "data.num_val_docs=8",
        "data.num_test_docs=8", "data.seq_len=32", "data.num_workers=1", "train.batch_size=4",
        "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2", "train.ckpt_every=2",
        "train.eval_batches=1", "sample_tokens=4"]


@pytest.fixture
def umask(request, monkeypatch):
    """Run the test under the umask ``request.param`` (0o022 unless parametrized), restoring the old one."""
    mask = getattr(request, "param", 0o022)
    old = os.umask(mask)
    monkeypatch.setattr(runs, "UMASK", mask)  # what runs read at import, as a process started under it would
    yield mask
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_everything_a_run_writes_is_readable_by_the_group_and_progress_is_plain_lines(tmp_path, umask, capsys):
    run = tmp_path / "runs" / "shared"
    assert main(["run", f"out_dir={run.parent}", "name=shared", *TINY]) == 0
    (tmp_path / "text.txt").write_text("Question: Tom has 3 boxes with 12 pencils in each box. " * 4)
    assert main(["eval", "ppl", str(run), str(tmp_path / "text.txt")]) == 0
    assert main(["export", str(run), f"out={tmp_path / 'hf'}"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.search(r"^train: 4/4 \(100%\), .* loss=", err, re.M)
    assert re.search(r"^perplexity: (\d+)/\1 \(100%\)", err, re.M)  # `eval ppl` shows its progress

    modes = {**_modes(run), **{f"hf/{k}": v for k, v in _modes(tmp_path / "hf").items()}}
    for must in ("config.yaml", "report.json", "report.md", "metrics.jsonl", "loss.png", "tokenizer.json",
                 "checkpoints/latest", "checkpoints/step_000004/model.safetensors", "eval/perplexity.json",
                 "hf/config.json", "hf/model.safetensors"):
        assert must in modes
    assert any(name.startswith("shards/train/") and name.endswith(".bin") for name in modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (tmp_path / "runs" / "shared" / name).is_dir() or
                         (tmp_path / name).is_dir() else 0o644)}
    assert not wrong, f"not 0644 files / 0755 folders under umask 022: {wrong}"


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o077, 0o600), (0o002, 0o664)], indirect=["umask"])
def test_atomic_writes_get_the_mode_the_umask_allows(tmp_path, umask, mode):
    runs.write_json(tmp_path / "report.json", {"loss": 1.0})
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "slmforge", "plan", "--presets"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written, as after `| head -1`
    err = proc.stderr.read()
    assert proc.wait() == 141
    assert err == b""


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_lists_each_key_with_its_default_and_description(capsys):
    assert re.search(r"^  temperature=0\.7 +0 = greedy$", _help(["generate"], capsys), re.M)
    plan_help = _help(["plan"], capsys)
    for key in PlanConfig.__dataclass_fields__:
        assert re.search(rf"^  {key}=", plan_help, re.M), key
    assert re.search(r"^  gpu_hours=0 +total GPU-hours, summed over all GPUs$", plan_help, re.M)
    run_help = _help(["run"], capsys)
    assert re.search(r"^  train\.dtype=auto +\(auto \| bf16 \| fp32\) auto: bf16 on GPU", run_help, re.M)
    assert re.search(r"^train\.\*", run_help, re.M) and "--dry-run prints the resolved config" in run_help


def test_every_subcommand_help_has_a_key_list():
    def leaves(parser, name=""):
        subs = [a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)]
        if not subs:
            yield name, parser
        for sub in subs:
            for child_name, child in sub.choices.items():
                yield from leaves(child, f"{name} {child_name}".strip())

    found = dict(leaves(build_parser()))
    assert {"generate", "plan", "eval ppl", "tokenize"} <= set(found)
    missing = [name for name, p in found.items() if not re.search(r"^keys .*\n  \S+=", p.format_help(), re.M)]
    assert not missing


@dataclass
class Planted:
    """A config as the CLI's ``--help`` reads it."""

    # a comment line of its own describes nothing
    plain: int = 1
    rate: float = 0.5  # the rate; "quoted # text" stays
    paths: list[str] = field(
        default_factory=list)  # given on the last line of the field
    name: str = "x"  # a name: with a colon

    def method(self) -> int:
        local: int = 3  # not a field
        return local


def test_field_comments_are_the_trailing_comment_of_each_field():
    assert field_comments(Planted) == {"plain": "", "rate": 'the rate; "quoted # text" stays',
                                       "paths": "given on the last line of the field", "name": "a name: with a colon"}


def test_plan_labels_the_fitted_loss_and_names_the_gpu_memory():
    text = format_plan(plan(PlanConfig(gpu_hours=10, gpu="a100-40gb")))
    assert "Chinchilla-fit loss*" in text and "not comparable to the loss of your data" in text
    assert "a100-40gb: 40 GiB" in text and "of 40 GiB on a100-40gb" in text
    assert plan(PlanConfig(gpu_hours=10, gpu="a100"))["memory_gib"]["gpu_memory"] == 80
