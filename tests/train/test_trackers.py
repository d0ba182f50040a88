"""train.loggers (train/trackers.py): the TensorBoard event files hold every scalar of metrics.jsonl at the same
steps with the same values, a crashed and resumed run too; wandb gets the same numbers and the resolved config,
offline unless configured; a missing package is a one-line error before anything is written."""

import json
import sys

import numpy as np
import pytest

from slmforge.train import trackers
from slmforge.train.loop import train
from tests.train.test_loop import Crash, _cfg, _mixture_cfg


def _flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[prefix + key] = value
    return out


def _jsonl_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tag -> [(step, value), ...], in the order written."""
    out: dict[str, list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in _flat(record).items():
            out.setdefault(tag, []).append((record["step"], value))
    return out


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_same(jsonl: dict, board: dict) -> None:
    assert sorted(board) == sorted(jsonl)
    for tag, points in jsonl.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in points], tag
        # TensorBoard stores float32: every value equals the JSONL's, rounded to float32.
        assert [v for _, v in board[tag]] == [float(np.float32(v)) for _, v in points], tag


def test_tensorboard_holds_every_jsonl_scalar_after_a_crash_and_resume(tmp_path, shards_dir):
    pytest.importorskip("tensorboard")
    cfg = _mixture_cfg(tmp_path, shards_dir, "tb", loggers="[jsonl,tensorboard]", eval_every=4)
    calls = {"n": 0}

    def crash_on_step_7(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # after the step-4 checkpoint and two more logged steps, which the resume replays
            raise Crash
        return model(batch[0], targets=batch[1])[1]

    with pytest.raises(Crash):
        train(cfg, loss_fn=crash_on_step_7, progress=False)
    train(cfg, resume=True, progress=False)
    jsonl, board = _jsonl_scalars(cfg.run_dir), _tensorboard_scalars(cfg.run_dir / "tensorboard")
    assert [s for s, _ in jsonl["loss"]] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_second", "val_loss", "val_bits_per_byte",
            "mixture_tokens/stable/main", "mixture_tokens/anneal/hq"} <= set(board)
    _assert_same(jsonl, board)  # the replayed steps 5 and 6 once each, with the resumed run's values


def test_default_writes_only_jsonl(tmp_path, shards_dir):
    cfg = _cfg(tmp_path, shards_dir, "plain", max_steps=2)
    assert cfg.train.loggers == ["jsonl"]
    train(cfg, progress=False)
    assert sorted(p.name for p in cfg.run_dir.iterdir() if p.is_dir()) == ["checkpoints"]


def test_wandb_gets_the_same_numbers_and_the_config_offline(tmp_path, shards_dir, monkeypatch):
    """A stand-in wandb module records what the tracker sends (the real one is checked below when installed)."""
    runs = []

    class FakeRun:
        def __init__(self, **kw):
            self.init, self.logged, self.finished = kw, [], False
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    sys.modules["wandb"].init = lambda **kw: FakeRun(**kw)
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: object())
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    cfg = _cfg(tmp_path, shards_dir, "wb", max_steps=3, loggers="[jsonl,wandb]")
    train(cfg, progress=False)
    (run,) = runs
    assert run.init["mode"] == "offline" and run.init["dir"] == str(cfg.run_dir) and run.init["name"] == "wb"
    assert run.init["config"]["train"]["max_steps"] == 3 and run.init["config"]["model"]["d_model"] == 32
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert run.logged == [(r["step"], _flat(r)) for r in records] and run.finished
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert trackers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode() is None  # wandb reads it itself


def test_real_wandb_offline_run(tmp_path, shards_dir, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, shards_dir, "wbreal", max_steps=2, loggers="[wandb]")
    train(cfg, progress=False)
    (offline,) = (cfg.run_dir / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb")) and (cfg.run_dir / "metrics.jsonl").is_file()


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_missing_package_is_one_line_before_anything_is_written(tmp_path, shards_dir, monkeypatch, logger):
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    cfg = _cfg(tmp_path, shards_dir, "missing", loggers=f"[jsonl,{logger}]")
    with pytest.raises(ValueError, match=rf"^train.loggers: {logger} is not installed; pip install slmforge\[track\]"):
        train(cfg, progress=False)
    assert not cfg.run_dir.exists()


def test_unknown_logger_is_refused_when_the_config_loads(tmp_path):
    from tests.conftest import tiny_run_config

    with pytest.raises(ValueError, match=r"train.loggers\[1\]='tensorbord': choose one of jsonl, tensorboard, wandb"):
        tiny_run_config(tmp_path, loggers="[jsonl,tensorbord]")
