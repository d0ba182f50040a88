"""The Mamba-2 SSM mixer: chunked SSD scan against the for-loop reference (outputs, final states, all gradients,
float64), the module against its equations, the fixed-size cache, exact parameter counts and a tiny LM that learns.

(Decoding against the parallel forward, for every mixer: ``test_mixers_decode.py``.)
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from slmforge.config import SSMConfig, preset
from slmforge.model.lm import LM
from slmforge.model.ops import segsum, ssd_chunked, ssd_ref
from slmforge.model.ssm import SSM
from tests.conftest import assert_count_params_exact, assert_tiny_lm_learns

RTOL = 1e-8  # max |chunked - ref| / max |ref|, in float64


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)).item()


def ssm_cfg(cfg, **kw):
    return dataclasses.replace(cfg, layers="ssm", ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=8, **kw))


def _scan_inputs(t: int, initial: bool, b=2, h=3, p=4, n=5):
    f64 = dict(dtype=torch.float64)
    x = torch.randn(b, t, h, p, **f64)
    dt = F.softplus(torch.randn(b, t, h, **f64) - 1)  # steps in (0, ~2): strong and weak decays
    A = -torch.rand(h, **f64) * 2 - 0.1
    B, C = torch.randn(b, t, n, **f64), torch.randn(b, t, n, **f64)
    state = torch.randn(b, h, p, n, **f64) if initial else None
    return [u.requires_grad_() for u in (x, dt, A, B, C, state) if u is not None]


def _outputs_and_grads(scan, inputs, initial: bool):
    x, dt, A, B, C, *state = inputs
    y, final = scan(x, dt, A, B, C, state[0] if initial else None)
    gen = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum() + \
        (final * torch.randn(final.shape, generator=gen, dtype=y.dtype)).sum()
    return [y, final, *torch.autograd.grad(loss, inputs)]


NAMES = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dinitial_state"]


@pytest.mark.parametrize("initial", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("chunk", [5, 16, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("t", [1, 7, 63], ids=lambda t: f"T{t}")
def test_ssd_chunked_matches_ref(t, chunk, initial):
    inputs = _scan_inputs(t, initial)
    got = _outputs_and_grads(lambda *a: ssd_chunked(*a[:5], chunk, a[5]), inputs, initial)
    want = _outputs_and_grads(ssd_ref, inputs, initial)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and rel_diff(g, w) <= RTOL, name


def test_ssd_chunked_keeps_float32_and_long_sequences_finite():
    # 600 steps of strong decay: the segment sums reach -600, where exp must underflow to 0, never overflow.
    x, dt, A, B, C = (u.detach().float() for u in _scan_inputs(600, False))
    y, state = ssd_chunked(x, dt * 5, A, B, C, 64)
    y_ref, state_ref = ssd_ref(x, dt * 5, A, B, C)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert rel_diff(y, y_ref) < 1e-5 and rel_diff(state, state_ref) < 1e-5


def test_segsum():
    a = torch.randn(2, 6, dtype=torch.float64)
    out = segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[:, j + 1 : i + 1].sum(-1) if j <= i else torch.full((2,), float("-inf"), dtype=a.dtype)
            torch.testing.assert_close(out[:, i, j], want)


def test_module_follows_its_equations(tiny_model_cfg):
    cfg = ssm_cfg(tiny_model_cfg)
    ssm = SSM(cfg).double()
    ssm.reset_parameters(0.02, 0.01)
    x = torch.randn(2, 11, cfg.d_model, dtype=torch.float64)
    w, n, h, p = ssm.width, ssm.state_dim, ssm.num_heads, ssm.head_dim
    z, xbc, dt = ssm.in_proj(x).split([w, w + 2 * n, h], dim=-1)
    # causal depthwise conv, written as a sum over the kernel's taps
    k = ssm.conv_kernel
    padded = F.pad(xbc, (0, 0, k - 1, 0))
    conv = sum(padded[:, i : i + 11] * ssm.conv.weight[:, 0, i] for i in range(k)) + ssm.conv.bias
    xs, B, C = F.silu(conv).split([w, n, n], dim=-1)
    y, _ = ssd_ref(xs.view(2, 11, h, p), F.softplus(dt + ssm.dt_bias), -ssm.A_log.exp(), B, C)
    y = (y + ssm.D[:, None] * xs.view(2, 11, h, p)).reshape(2, 11, w) * F.silu(z)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * ssm.norm.weight
    torch.testing.assert_close(ssm(x), ssm.out_proj(y), rtol=1e-10, atol=1e-12)


def test_init():
    ssm = SSM(preset("tiny"))
    ssm.reset_parameters(0.02, 0.005)
    dt = F.softplus(ssm.dt_bias)
    assert ((dt >= 1e-3 - 1e-9) & (dt <= 1e-1 + 1e-9)).all()
    assert ((ssm.A_log.exp() >= 1) & (ssm.A_log.exp() <= 16)).all()
    assert ssm.out_proj.weight.std() < ssm.in_proj.weight.std()


def test_cache_size_is_constant_in_length(tiny_model_cfg):
    ssm = SSM(ssm_cfg(tiny_model_cfg))
    short, long = (ssm.init_cache(2, n, "cpu", torch.float32) for n in (1024, 16384))
    assert short.nbytes() == long.nbytes() > 0
    # conv: the last k-1 inputs of x, B, C; state: (B, H, P, N) in float32
    assert short.nbytes() == 4 * 2 * ((ssm.conv_kernel - 1) * (ssm.width + 2 * ssm.state_dim)
                                      + ssm.num_heads * ssm.head_dim * ssm.state_dim)


def test_bad_head_dim_is_a_clear_error(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, ssm=SSMConfig(head_dim=24))
    with pytest.raises(ValueError, match="ssm.head_dim=24"):
        SSM(cfg)


@pytest.mark.parametrize("layers", ["ssm", "attn,ssm,ssm"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_count_params_is_exact(layers, tie):
    assert_count_params_exact(layers, tie)


def test_tiny_lm_learns(tiny_model_cfg):
    assert_tiny_lm_learns(LM(ssm_cfg(tiny_model_cfg)))
