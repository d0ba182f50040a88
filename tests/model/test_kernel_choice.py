"""model/ops/choice.py: every float32 CPU kernel against F.linear, the measurement's cache and its key, forced
choices, and the fallback to torch on any doubt."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from slmforge.cli import main
from slmforge.info import format_kernels, kernels as kernel_report
from slmforge.model.layers import linear
from slmforge.model.ops import choice, cpu, machine

ONEDNN = pytest.mark.skipif(not cpu.ONEDNN_LINEAR, reason="torch built without oneDNN")


def _grads(fn, x, w):
    out = fn(x, w)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    grads = [x.grad.clone(), w.grad.clone()]
    x.grad = w.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("kernel", ["torch", pytest.param("onednn", marks=ONEDNN)])
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24), (1, 24)], ids=str)
def test_train_kernels_equal_f_linear_forward_and_grads(kernels, kernel, shape):
    kernels(f"train={kernel}")
    x = torch.randn(*shape).transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()  # strided too
    w = torch.randn(40, 24, requires_grad=True)
    out, grads = _grads(linear, x, w)
    ref, ref_grads = _grads(F.linear, x, w)
    assert choice.train_kernel() == kernel
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path,kernel", [("decode", "torch"), ("decode", "gemv"),
                                         pytest.param("decode", "onednn", marks=ONEDNN), ("prefill", "torch"),
                                         pytest.param("prefill", "onednn", marks=ONEDNN)])
def test_inference_kernels_equal_f_linear(kernels, path, kernel):
    kernels(f"{path}={kernel}")
    w = torch.randn(300, 24)
    rows_list = [1, 2, 3, 8, 16] if path == "decode" else [17, 40, 300]
    for rows in rows_list:
        x = torch.randn(rows, 24)
        with torch.inference_mode():
            torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(linear(x[None], w), F.linear(x, w)[None], rtol=1e-5, atol=1e-5)  # 3-d
        made = choice.choose(path, choice.row_class(rows), 24, 300)
        expected = kernel if kernel in choice.candidates(path, made.rows) else "torch"  # gemv: up to MAX_ROWS
        assert (made.kernel, made.reason.startswith("forced")) == (expected, expected == kernel), made


def test_real_measurement_picks_a_candidate_and_leaves_the_rng_alone(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv(machine.CACHE_ENV, str(tmp_path))
    kernels(None)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    made = [choice.choose("decode", 1, 16, 24), choice.choose("decode", 16, 16, 24), choice.choose("prefill", 32, 16, 24)]
    assert torch.equal(torch.rand(3), expected)  # measuring drew nothing from the global RNG
    for c, path, rows in zip(made, ["decode", "decode", "prefill"], [1, 16, 32]):
        assert set(c.times) | set(c.errors) == set(choice.candidates(path, rows)) and c.kernel in c.times
        assert all(t > 0 for t in c.times.values()) and c.reason.startswith("measured")
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir())  # <name>-<hash of the key>.json
    assert names == ["kernels_decode_16x24", "kernels_prefill_32x16x24"]


def _fake_measure(monkeypatch, times):
    """Replace prefill's measurement by one that records its calls and returns ``times``."""
    calls = []

    def measure(rows, i, o, names):
        calls.append((rows, i, o))
        return {"times": dict(times), "errors": {}}

    monkeypatch.setattr(choice, "_measure_prefill", measure)
    return calls


def test_cache_is_reused_and_invalidated_when_the_machine_key_changes(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv(machine.CACHE_ENV, str(tmp_path))
    kernels(None)
    calls = _fake_measure(monkeypatch, {"torch": 2.0, "onednn": 1.0})
    assert choice.choose("prefill", 64, 8, 8).kernel == "onednn"
    choice.choose("prefill", 64, 8, 8)
    assert len(calls) == 1  # kept in memory
    choice.reset()
    choice.choose("prefill", 64, 8, 8)
    assert len(calls) == 1  # read back from the cache file
    choice.choose("prefill", 128, 8, 8)
    assert len(calls) == 2  # another shape class: measured
    key = machine.machine_key()
    monkeypatch.setattr(machine, "machine_key", lambda: {**key, "threads": key["threads"] + 1})
    choice.reset()
    choice.choose("prefill", 64, 8, 8)
    assert len(calls) == 3  # another machine key: measured again


@pytest.mark.parametrize("env,path,expected", [("torch", "prefill", "torch"), ("prefill=torch", "prefill", "torch"),
                                               ("decode=gemv, train=torch", "decode", "gemv"),
                                               pytest.param("onednn", "train", "onednn", marks=ONEDNN),
                                               ("onednn,train=auto,train=torch", "train", "torch")])
def test_forced_choice_is_obeyed_without_measuring(kernels, monkeypatch, env, path, expected):
    kernels(env)
    monkeypatch.setattr(choice, "_race", lambda *a, **k: pytest.fail("measured a forced choice"))
    monkeypatch.setattr(machine, "cached", lambda *a, **k: pytest.fail("measured a forced choice"))
    made = choice.choose(path, 1 if path != "prefill" else 64, 8, 8)
    assert made.kernel == expected and made.reason == "forced by SLMFORGE_KERNELS" and not made.times


def test_auto_measures(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv(machine.CACHE_ENV, str(tmp_path))
    kernels("auto,decode=gemv")
    calls = _fake_measure(monkeypatch, {"torch": 1.0, "onednn": 2.0})
    assert choice.choose("prefill", 64, 8, 8).reason == "measured: torch fastest" and len(calls) == 1


@pytest.mark.parametrize("env", ["fast", "decode=fast", "train=gemv", "gpu=torch", "gemv"])
def test_invalid_kernels_env_is_one_line_error_naming_it(kernels, env, capsys):
    kernels(env)
    with pytest.raises(ValueError, match="SLMFORGE_KERNELS=.*use torch, onednn or auto"):
        choice.choose("train", choice.TRAIN_ROWS, 0, 0)
    assert main(["info", "--kernels", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "SLMFORGE_KERNELS" in err and "\n" not in err and "Traceback" not in err


def test_failing_or_wrong_candidate_falls_back_to_torch(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv(machine.CACHE_ENV, str(tmp_path))
    kernels(None)

    def broken(x, w):
        raise RuntimeError("no such kernel here\nsecond line")

    monkeypatch.setitem(choice.INFERENCE["prefill"], "onednn", broken)
    made = choice.choose("prefill", 32, 16, 24)
    assert made.kernel == "torch" and made.errors == {"onednn": "RuntimeError: no such kernel here"}
    monkeypatch.setitem(choice.INFERENCE["prefill"], "onednn", lambda x, w: F.linear(x, w) + 1e-2)
    made = choice.choose("prefill", 64, 16, 24)
    assert made.kernel == "torch" and made.errors == {"onednn": "ArithmeticError: differs from F.linear"}


def test_failing_measurement_falls_back_to_torch(kernels, monkeypatch):
    kernels(None)

    def cached(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(machine, "cached", cached)
    made = choice.choose("prefill", 64, 8, 8)
    assert made.kernel == "torch" and made.reason == "fallback: measuring failed (OSError: disk on fire)"


def test_decide_needs_a_clear_gain():
    assert choice.decide("prefill", 64, (8, 8), {"torch": 1.0, "onednn": 0.97}, {}).kernel == "torch"
    assert choice.decide("prefill", 64, (8, 8), {"torch": 1.0, "onednn": 0.9}, {}).kernel == "onednn"
    assert choice.decide("decode", 1, (8, 8), {"torch": 1.0, "gemv": 0.5, "onednn": 0.6}, {}).kernel == "gemv"
    assert choice.decide("decode", 1, (8, 8), {"gemv": 0.5}, {}).reason == "fallback: torch's own timing failed"


def test_row_classes():
    assert [choice.row_class(n) for n in (0, 1, 2, 3, 5, 8, 9, 16, 17, 33, 100, 256, 5000)] == \
        [1, 1, 2, 4, 8, 8, 16, 16, 32, 64, 128, 256, 256]


def test_info_kernels_lists_every_path(kernels, tiny_model_cfg):
    kernels("torch")
    report = kernel_report(tiny_model_cfg, decode_rows=(1, 8), prefill_rows=(64,))
    text = format_kernels(report)
    # train once; decode (1, 8 rows) and prefill for each of the tiny model's 5 weight shapes (97->32 the head)
    assert [c["path"] for c in report["choices"]] == ["train"] + ["decode"] * 10 + ["prefill"] * 5
    assert "Machine: " in text and "ISA flags: " in text and "SLMFORGE_KERNELS: torch" in text
    assert "  decode      8  32->97" in text and "forced by SLMFORGE_KERNELS" in text and "kernels_*.json" in text


def test_cli_info_kernels_without_config(tmp_path):
    env = {"SLMFORGE_KERNELS": "torch", "SLMFORGE_CACHE_DIR": str(tmp_path), "PATH": ""}
    out = subprocess.run([sys.executable, "-m", "slmforge", "info", "--kernels"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "  train     512  -" in out.stdout and "256->8192" in out.stdout  # the 10m preset's head


def test_cli_info_needs_a_config_without_kernels(capsys):
    assert main(["info"]) == 2
    assert "give a preset" in capsys.readouterr().err
