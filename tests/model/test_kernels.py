"""The optional GPU kernels' glue (model/ops/kernels.py): on CPU our chunked scans always run; the layout
conversion is checked against fakes with mamba-ssm's and fla's signatures built on our references; with a GPU
and the packages, the real kernels are checked against the references."""

import pytest
import torch

from slmforge.model.ops import gla_chunked, gla_ref, ssd_chunked, ssd_ref
from slmforge.model.ops import kernels

B_, T_, H_, P_, N_, K_, V_ = 2, 37, 3, 8, 5, 6, 7  # all different, so a swapped axis cannot pass unnoticed
calls: list[str] = []  # what the fake kernels were asked to do


def ssd_inputs(device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B_, T_, H_, P_, generator=g, dtype=dtype)
    dt = torch.rand(B_, T_, H_, generator=g, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(H_, generator=g, dtype=dtype) - 0.1
    Bm, Cm = torch.randn(B_, T_, N_, generator=g, dtype=dtype), torch.randn(B_, T_, N_, generator=g, dtype=dtype)
    state = torch.randn(B_, H_, P_, N_, generator=g, dtype=dtype)
    return [u.to(device) for u in (x, dt, A, Bm, Cm, state)]


def gla_inputs(device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B_, H_, T_, K_, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B_, H_, T_, V_, generator=g, dtype=dtype)
    decay = torch.nn.functional.logsigmoid(torch.randn(B_, H_, T_, K_, generator=g, dtype=dtype)) / 4
    state = torch.randn(B_, H_, K_, V_, generator=g, dtype=dtype)
    return [u.to(device) for u in (q, k, v, decay, state)]


def fake_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                   seq_idx=None, dt_softplus=False, return_final_states=False):
    """mamba-ssm's signature and layouts: x (b, T, H, P), dt (b, T, H), B and C (b, T, groups, N)."""
    assert B.shape[2] == C.shape[2] == 1 and x.shape[:3] == dt.shape and A.shape == dt.shape[2:]
    assert D is None and z is None and dt_bias is None and not dt_softplus and return_final_states
    calls.append("ssd")
    return ssd_ref(x, dt, A, B[:, :, 0], C[:, :, 0], initial_states)


def fake_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """fla's signature and layouts: q, k, g (b, T, H, K), v (b, T, H, V), state (b, H, K, V)."""
    assert q.shape == k.shape == g.shape and output_final_state and scale == q.shape[-1] ** -0.5
    calls.append("gla")
    o, state = gla_ref(*(u.transpose(1, 2) for u in (q, k, v, g)), scale=scale, initial_state=initial_state)
    return o.transpose(1, 2), state


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(kernels, "ssd_kernel", lambda: fake_mamba_chunk_scan_combined)
    monkeypatch.setattr(kernels, "gla_kernel", lambda: fake_chunk_gla)
    monkeypatch.setattr(kernels, "_usable", lambda x, enabled: enabled)  # as if on CUDA


def test_layout_conversion_matches_our_chunked_scans(fakes):
    x, dt, A, Bm, Cm, s0 = ssd_inputs()
    for got, want in zip(kernels.ssd_scan(x, dt, A, Bm, Cm, 16, s0), ssd_chunked(x, dt, A, Bm, Cm, 16, s0)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    q, k, v, g, s0 = gla_inputs()
    for got, want in zip(kernels.gla_scan(q, k, v, g, 16, s0), gla_chunked(q, k, v, g, 16, initial_state=s0)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_cpu_and_disabled_never_call_a_kernel(monkeypatch):
    def refuse():
        raise AssertionError("a GPU kernel was looked up")

    monkeypatch.setattr(kernels, "ssd_kernel", refuse)
    monkeypatch.setattr(kernels, "gla_kernel", refuse)
    x, dt, A, Bm, Cm, s0 = ssd_inputs()
    assert torch.equal(kernels.ssd_scan(x, dt, A, Bm, Cm, 16, s0)[0], ssd_chunked(x, dt, A, Bm, Cm, 16, s0)[0])
    q, k, v, g, s0 = gla_inputs()
    want = gla_chunked(q, k, v, g, 16, initial_state=s0)[0]
    assert torch.equal(kernels.gla_scan(q, k, v, g, 16, s0, fast=True)[0], want)
    monkeypatch.setattr(kernels, "_usable", lambda x, enabled: enabled)  # as if on CUDA, but switched off
    assert torch.equal(kernels.gla_scan(q, k, v, g, 16, s0, fast=False)[0], want)


def test_mixers_route_their_scans_through_the_kernels(fakes):
    from slmforge.config import ModelConfig
    from slmforge.model.lm import LM

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, num_layers=2, layers="ssm,linear", vocab_size=64)
    fast = LM(cfg).double()
    slow = LM(ModelConfig(**{**cfg.__dict__, "fast_kernels": False})).double()
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 64, (B_, T_))
    calls.clear()
    torch.testing.assert_close(fast(ids), slow(ids), rtol=1e-10, atol=1e-10)
    assert calls == ["ssd", "gla"]  # one scan per layer, through the kernels; none with fast_kernels off


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", ["ssd", "gla"])
def test_real_kernels_match_the_references(which):
    if (kernels.ssd_kernel if which == "ssd" else kernels.gla_kernel)() is None:
        pytest.skip(f"{'mamba-ssm' if which == 'ssd' else 'flash-linear-attention'} is not installed")
    if which == "ssd":
        x, dt, A, Bm, Cm, s0 = ssd_inputs("cuda", torch.float32)
        got, want = kernels.ssd_scan(x, dt, A, Bm, Cm, 16, s0), ssd_ref(x, dt, A, Bm, Cm, s0)
    else:
        q, k, v, g, s0 = gla_inputs("cuda", torch.float32)
        got, want = kernels.gla_scan(q, k, v, g, 16, s0), gla_ref(q, k, v, g, initial_state=s0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)
