"""CPU MFU: training reports model FLOPs/s over this machine's measured float32 GEMM ceiling (train/speed.py), the
ceiling is measured once and cached, and measuring it never changes training's numbers."""

import json

import pytest
import torch

from slmforge.model.ops import machine
from slmforge.plan import flops_per_token
from slmforge.train import speed
from slmforge.train.loop import train
from tests.train.test_loop import _cfg


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(folder))
    return folder


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gemm_ceiling_is_measured_once_and_leaves_the_global_rng_alone(cache, monkeypatch):
    monkeypatch.setattr(machine, "other_load", lambda: 0.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ceiling = machine.gemm_ceiling(size=128)
    assert torch.equal(torch.get_rng_state(), before)  # a private generator: training's draws are untouched
    assert 1e8 < ceiling < 1e14  # FLOP/s: between 0.1 GFLOP/s and 100 TFLOP/s on any CPU
    assert len(list(cache.glob("gemm_ceiling_best_128-*.json"))) == 1

    def measure_again(size):
        raise AssertionError("measured again with the same machine key")

    monkeypatch.setattr(machine, "gemm_flops", measure_again)
    assert machine.gemm_ceiling(size=128) == ceiling


def test_a_ceiling_measured_on_a_busy_machine_is_measured_again_once_quiet(cache, monkeypatch):
    """Other processes running while the ceiling is timed make it too low (and MFU over 100% later): that value
    is used but marked provisional, and the first quiet call replaces it with the higher measurement."""
    load, flops, calls = [3.0], [40e9], []

    def fake_flops(size):
        calls.append(size)
        return flops[0]

    monkeypatch.setattr(machine, "other_load", lambda: load[0])
    monkeypatch.setattr(machine, "gemm_flops", fake_flops)
    assert machine.gemm_ceiling(size=64) == 40e9
    assert machine.gemm_ceiling(size=64) == 40e9 and len(calls) == 1  # still busy: the provisional value
    load[0], flops[0] = 0.0, 110e9
    assert machine.gemm_ceiling(size=64) == 110e9 and len(calls) == 2  # quiet: measured again, the higher kept
    flops[0] = 90e9
    assert machine.gemm_ceiling(size=64) == 110e9 and len(calls) == 2  # settled: never measured again
    saved = json.loads(next(cache.glob("gemm_ceiling_best_64-*.json")).read_text())
    assert saved["value"] == {"flops": 110e9, "busy": False}


def test_gemm_flops_takes_the_best_kernel(monkeypatch):
    """The ceiling is the faster of torch.mm and oneDNN: whichever is timed faster sets it."""
    times = iter([2.0, 1.0])  # torch.mm timed at 2 s, oneDNN at 1 s
    monkeypatch.setattr(machine, "time_call", lambda fn, min_seconds: next(times))
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        pytest.skip("torch without oneDNN's linear")
    assert machine.gemm_flops(size=64) == 2 * 64**3 / 1.0


def test_cpu_training_reports_mfu_against_the_gemm_ceiling(tmp_path, shards_dir, cache, monkeypatch, capsys):
    monkeypatch.setattr(machine, "gemm_ceiling", lambda: 2.5e9)
    cfg = _cfg(tmp_path, shards_dir, "mfu", max_steps=3, eval_every=3, ckpt_every=3, device="cpu")
    train(cfg, progress=False)
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)["train"]
    records = _records(cfg.run_dir)
    assert len(records) == 3
    for r in records:
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_second"] / 2.5e9, rel=1e-9)
    assert "float32 GEMM ceiling, 2 GFLOP/s" in capsys.readouterr().out


def test_measuring_the_ceiling_does_not_change_training(tmp_path, shards_dir, cache, monkeypatch):
    """The first run measures (an empty cache), the second reads the cache: the same losses, bit for bit. The
    measurement draws from the global RNG here on purpose, to show that it runs before the seed is set."""
    original = machine.gemm_flops

    def noisy_measurement(size=1024):
        torch.randn(1000)
        return original(size=128)

    monkeypatch.setattr(machine, "gemm_flops", noisy_measurement)
    losses = []
    for name in ("measured", "cached"):
        cfg = _cfg(tmp_path, shards_dir, name, max_steps=3, eval_every=3, ckpt_every=3, device="cpu")
        train(cfg, progress=False)
        losses.append([r["loss"] for r in _records(cfg.run_dir)])
    assert len(list(cache.glob("gemm_ceiling_best_*.json"))) == 1
    assert losses[0] == losses[1]


def test_a_device_without_a_known_peak_has_no_mfu():
    assert speed.peak_flops(torch.device("meta")) is None
