"""Training killed with SIGKILL at every point of a checkpoint write, then `train --resume`: the loss curve and the
final weights are bit-identical to a straight run. Plus the damage resume must survive: a deleted state file (the
older checkpoint is taken, metrics cut back), a refused restart, no half-made run folder on a user error."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from slmforge.checkpoint import FAULT_POINTS
from slmforge.cli import main
from slmforge.model.ops import choice

REPO = Path(__file__).resolve().parents[2]
TIMING = ("tokens_per_second", "mfu")  # wall-clock fields, the only ones allowed to differ
# Killed while writing the step-6 checkpoint: before its rename step 4 is the newest valid one, after it step 6.
RESUMED_FROM = {"weights": 4, "state_tensors": 4, "state": 4, "manifest": 4, "rename": 6, "latest": 6, "rotate": 6}


@pytest.fixture(autouse=True)
def _threads_and_kernels(monkeypatch):
    """One thread, and one matmul kernel for every process: the killed runs measure their kernels at the same
    moment, and two kernels sum in another order (about 1e-7), which is not what this test is about."""
    n = torch.get_num_threads()  # train.num_threads=1 below sets it for this process too
    monkeypatch.setenv(choice.KERNELS_ENV, "torch")  # the subprocesses inherit it
    choice.reset()
    yield
    choice.reset()
    torch.set_num_threads(n)


def _args(shards_dir, out, name, *extra):
    return ["train", f"out_dir={out}", f"name={name}", f"data.shards_dir={shards_dir / 'shards'}",
            f"data.tokenizer={shards_dir / 'tokenizer.json'}", "model.vocab_size=320", "model.d_model=32",
            "model.num_layers=1", "model.attn.num_heads=4", "model.attn.num_kv_heads=2", "model.max_seq_len=64",
            "data.seq_len=32", "train.batch_size=4", "train.max_steps=12", "train.warmup_steps=2",
            "train.eval_every=4", "train.ckpt_every=2", "train.eval_batches=2", "train.lr_peak=1e-2",
            "train.device=cpu", "train.num_threads=1", *extra]


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _final_weights(run: Path) -> dict:
    return safetensors.torch.load_file(str(run / "checkpoints" / "step_000012" / "model.safetensors"))


def _assert_same_run(run: Path, straight: Path) -> None:
    assert _records(run) == _records(straight)  # loss, lr, grad norm, validation: bit for bit, each step once
    a, b = _final_weights(run), _final_weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_at_every_point_of_a_checkpoint_write_resumes_bit_identically(tmp_path, shards_dir, capsys):
    assert set(RESUMED_FROM) == set(FAULT_POINTS)
    # Killed runs are real processes, started together (each single-threaded).
    procs = {point: subprocess.Popen(
        [sys.executable, "-m", "slmforge", *_args(shards_dir, tmp_path, point)], cwd=REPO,
        env={**os.environ, "SLMFORGE_FAULT": f"ckpt:{point}@6"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for point in FAULT_POINTS}
    assert main(_args(shards_dir, tmp_path, "straight")) == 0
    straight = tmp_path / "straight"
    assert len(_records(straight)) == 12
    for point, proc in procs.items():
        out = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == -signal.SIGKILL, f"{point}: not killed (rc {proc.returncode}): {out[-2000:]}"
        run = tmp_path / point
        assert [r["step"] for r in _records(run)] == list(range(1, 7))  # step 6 was logged before its checkpoint
        capsys.readouterr()
        assert main(_args(shards_dir, tmp_path, point, "--resume")) == 0
        assert f"resume: from step_{RESUMED_FROM[point]:06d}" in capsys.readouterr().out, point
        _assert_same_run(run, straight)
        # Rotation finished its work; no temporary or half-deleted folder is left.
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000010", "step_000012"]


def test_a_deleted_state_file_resumes_from_the_older_checkpoint_with_metrics_cut_back(tmp_path, shards_dir,
                                                                                     capsys):
    assert main(_args(shards_dir, tmp_path, "straight")) == 0
    run = tmp_path / "run"
    assert main(_args(shards_dir, tmp_path, "run", "train.max_steps=8")) == 0
    (run / "checkpoints" / "step_000008" / "state.json").unlink()
    (run / "checkpoints" / "latest").write_text("step_000008\n")
    capsys.readouterr()
    # Overrides after --resume are accepted: train further, to step 12.
    assert main(_args(shards_dir, tmp_path, "run", "--resume", "train.max_steps=12")) == 0
    out = capsys.readouterr().out
    assert "resume: skipping step_000008: " in out and "state.json: missing (listed in manifest.json)" in out
    assert "resume: from step_000006" in out
    _assert_same_run(run, tmp_path / "straight")  # steps 7-8 replayed once, not restarted from step 0


def test_resume_with_no_valid_checkpoint_is_refused_and_changes_nothing(tmp_path, shards_dir, capsys):
    run = tmp_path / "run"
    assert main(_args(shards_dir, tmp_path, "run", "train.max_steps=4", "train.ckpt_every=4")) == 0
    state = run / "checkpoints" / "step_000004" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(_args(shards_dir, tmp_path, "run", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no checkpoint to resume from verifies" in err
    assert "state.safetensors: 100 bytes but manifest.json records" in err
    assert (run / "metrics.jsonl").read_text() == before


def test_train_on_a_trained_run_needs_resume_or_force(tmp_path, shards_dir, capsys):
    run = tmp_path / "run"
    assert main(_args(shards_dir, tmp_path, "run", "train.max_steps=4")) == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(_args(shards_dir, tmp_path, "run", "train.max_steps=4")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{run}: already trained" in err and "--resume" in err and "--force" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing truncated
    assert main(_args(shards_dir, tmp_path, "run", "train.max_steps=4", "--resume", "--force")) == 2
    assert main(_args(shards_dir, tmp_path, "run", "train.max_steps=2", "--force")) == 0  # starts over
    assert [r["step"] for r in _records(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]


@pytest.mark.parametrize("bad", ["model.vocab_size=100", "missing_shards"])
def test_a_user_error_before_training_leaves_no_run_folder(tmp_path, shards_dir, capsys, bad):
    args = _args(shards_dir, tmp_path, "run")
    if bad == "missing_shards":
        args = [a.replace(str(shards_dir / "shards"), str(tmp_path / "nowhere")) for a in args]
    else:
        args.append(bad)
    assert main(args) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    assert not (tmp_path / "run").exists()


def test_metrics_log_drops_a_record_cut_short_by_a_kill_and_names_a_damaged_line(tmp_path):
    from slmforge.runs import MetricsLog

    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        metrics.log({"step": step, "loss": 1.0 / step})
    with metrics.path.open("a") as f:
        f.write('{"step": 4, "lo')  # the process was killed mid-write
    assert [r["step"] for r in metrics.read()] == [1, 2, 3]
    metrics.truncate_after(2)
    assert metrics.path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    metrics.path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"^{metrics.path}:2: not a JSON metrics record"):
        metrics.read()
