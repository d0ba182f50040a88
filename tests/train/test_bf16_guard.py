"""The bf16 guard (train/speed.py): on a CPU without native bf16, train.dtype=bf16 warns once on stderr with the
measured slowdown and the advice, and dtype=auto is float32 on a CPU. CPU flags are mocked."""

import pytest
import torch

from slmforge.model.ops import machine
from slmforge.train import speed
from slmforge.train.loop import train
from tests.train.test_loop import _cfg

CPU = torch.device("cpu")
ZEN3 = frozenset({"avx", "avx2", "fma"})
ZEN4 = frozenset({"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"})
SAPPHIRE_RAPIDS = frozenset({"avx", "avx2", "fma", "avx512f", "amx_tile", "amx_bf16"})


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """A private measurement cache, and the once-per-process warning not yet given."""
    monkeypatch.setenv("SLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    speed.warn_slow_bf16.cache_clear()
    yield
    speed.warn_slow_bf16.cache_clear()


def _flags(monkeypatch, flags):
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)


def _warnings(text):
    return [line for line in text.splitlines() if "without native bf16" in line]


def test_bf16_without_native_bf16_warns_once_with_the_measured_slowdown(monkeypatch, capfd):
    _flags(monkeypatch, ZEN3)
    monkeypatch.setattr(speed, "_measure_bf16_slowdown", lambda: 31.25)
    assert speed.autocast_dtype("bf16", CPU) is torch.bfloat16  # a warning, not a refusal
    assert speed.autocast_dtype("bf16", CPU) is torch.bfloat16
    out, err = capfd.readouterr()
    assert not _warnings(out)
    (line,) = _warnings(err)
    assert line.startswith("[slmforge] warning: train.dtype=bf16")
    assert "31.2x the float32 time" in line and "train.dtype=fp32" in line


@pytest.mark.parametrize("flags", [ZEN4, SAPPHIRE_RAPIDS, frozenset({"asimd", "bf16"})],
                         ids=["avx512_bf16", "amx", "arm"])
def test_native_bf16_does_not_warn(monkeypatch, capfd, flags):
    _flags(monkeypatch, flags)
    monkeypatch.setattr(speed, "_measure_bf16_slowdown", lambda: pytest.fail("measured without a reason to warn"))
    assert speed.autocast_dtype("bf16", CPU) is torch.bfloat16
    assert not _warnings(capfd.readouterr().err)


@pytest.mark.parametrize("flags", [ZEN3, ZEN4], ids=["no-bf16", "bf16"])
def test_auto_is_fp32_on_a_cpu_and_bf16_on_a_gpu(monkeypatch, capfd, flags):
    _flags(monkeypatch, flags)
    assert speed.autocast_dtype("auto", CPU) is None
    assert speed.autocast_dtype("fp32", CPU) is None
    assert speed.autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert speed.autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16  # a GPU is never warned about
    assert not _warnings(capfd.readouterr().err)


def test_the_slowdown_is_measured_once_and_leaves_the_rng_alone(monkeypatch):
    _flags(monkeypatch, ZEN3)
    threads = torch.get_num_threads()
    before = torch.get_rng_state()
    slowdown = speed.bf16_slowdown()
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    assert 0.01 < slowdown < 1000
    monkeypatch.setattr(speed, "_measure_bf16_slowdown", lambda: pytest.fail("measured again"))
    assert speed.bf16_slowdown() == slowdown


def test_training_in_bf16_warns_once(tmp_path, shards_dir, monkeypatch, capfd):
    _flags(monkeypatch, ZEN3)
    monkeypatch.setattr(speed, "_measure_bf16_slowdown", lambda: 12.0)
    cfg = _cfg(tmp_path, shards_dir, "bf16", max_steps=3, eval_every=3, ckpt_every=3, device="cpu", dtype="bf16")
    train(cfg, progress=False)
    assert len(_warnings(capfd.readouterr().err)) == 1
