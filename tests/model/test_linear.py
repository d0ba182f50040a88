"""Gated linear attention: chunked GLA against the for-loop reference (outputs, final states, all gradients,
float64), numerical safety under strong decay, the module against its equations, the fixed-size cache, exact
parameter counts and a tiny LM that learns.

(Decoding against the parallel forward, for every mixer: ``test_mixers_decode.py``.)
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from slmforge.config import LinearConfig
from slmforge.model.linear import GatedLinear
from slmforge.model.lm import LM
from slmforge.model.ops import gla_chunked, gla_ref
from tests.conftest import assert_count_params_exact, assert_tiny_lm_learns

RTOL = 1e-8  # max |chunked - ref| / max |ref|, in float64


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)).item()


def linear_cfg(cfg, **kw):
    return dataclasses.replace(cfg, layers="linear", linear=LinearConfig(num_heads=2, chunk_size=8, **kw))


def _scan_inputs(t: int, initial: bool, b=2, h=3, dk=6, dv=5, decay=1.0):
    f64 = dict(dtype=torch.float64)
    q, k = torch.randn(b, h, t, dk, **f64), torch.randn(b, h, t, dk, **f64)
    v = torch.randn(b, h, t, dv, **f64)
    g = F.logsigmoid(torch.randn(b, h, t, dk, **f64)) * decay  # log decays <= 0, per key channel
    state = torch.randn(b, h, dk, dv, **f64) if initial else None
    return [u.requires_grad_() for u in (q, k, v, g, state) if u is not None]


def _outputs_and_grads(scan, inputs, initial: bool):
    q, k, v, g, *state = inputs
    o, final = scan(q, k, v, g, state[0] if initial else None)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
        (final * torch.randn(final.shape, generator=gen, dtype=o.dtype)).sum()
    return [o, final, *torch.autograd.grad(loss, inputs)]


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dinitial_state"]


@pytest.mark.parametrize("initial", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("chunk", [5, 16, 24, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("t", [1, 7, 63], ids=lambda t: f"T{t}")
def test_gla_chunked_matches_ref(t, chunk, initial):
    inputs = _scan_inputs(t, initial)
    got = _outputs_and_grads(lambda q, k, v, g, s: gla_chunked(q, k, v, g, chunk, initial_state=s), inputs, initial)
    want = _outputs_and_grads(lambda q, k, v, g, s: gla_ref(q, k, v, g, initial_state=s), inputs, initial)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and rel_diff(a, b) <= RTOL, name


def test_gla_chunked_strong_decay_never_overflows():
    # log decays near -40 per step: over a 64-step chunk exp(-G) would be exp(2500), inf even in float64; every
    # exponent the chunked form takes is <= 0, so outputs and gradients stay finite and exact.
    inputs = _scan_inputs(63, True, decay=40.0)
    got = _outputs_and_grads(lambda q, k, v, g, s: gla_chunked(q, k, v, g, 64, initial_state=s), inputs, True)
    want = _outputs_and_grads(lambda q, k, v, g, s: gla_ref(q, k, v, g, initial_state=s), inputs, True)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all() and rel_diff(a, b) <= RTOL, name


def test_gla_chunked_float32():
    q, k, v, g = (u.detach().float() for u in _scan_inputs(200, False))
    o, state = gla_chunked(q, k, v, g, 64)
    o_ref, state_ref = gla_ref(q, k, v, g)
    assert o.dtype == torch.float32 and rel_diff(o, o_ref) < 1e-5 and rel_diff(state, state_ref) < 1e-5


def test_module_follows_its_equations(tiny_model_cfg):
    cfg = linear_cfg(tiny_model_cfg)
    gla = GatedLinear(cfg).double()
    gla.reset_parameters(0.02, 0.01)
    x = torch.randn(2, 11, cfg.d_model, dtype=torch.float64)
    h, dk, dv = gla.num_heads, gla.key_dim, gla.value_dim
    q, k, v, gate, low = gla.in_proj(x).split(gla.widths, dim=-1)
    g = F.logsigmoid(gla.decay_proj(low)) / cfg.linear.decay_normalizer
    q, k, g = (u.view(2, 11, h, dk) for u in (q, k, g))
    v = v.view(2, 11, h, dv)
    state = torch.zeros(2, h, dk, dv, dtype=torch.float64)
    outs = []
    for t in range(11):  # the recurrence, written out
        state = g[:, t, :, :, None].exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append((q[:, t, :, None] / dk**0.5 @ state).squeeze(2))
    o = torch.stack(outs, 1)  # (B, T, H, V)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * gla.norm.weight
    torch.testing.assert_close(gla(x), gla.out_proj(o.reshape(2, 11, h * dv) * F.silu(gate)), rtol=1e-10, atol=1e-12)


def test_decay_starts_close_to_one(tiny_model_cfg):
    gla = GatedLinear(linear_cfg(tiny_model_cfg))
    gla.reset_parameters(0.02, 0.01)
    low = gla.in_proj(torch.randn(4, 9, 32)).split(gla.widths, dim=-1)[-1]
    decay = (F.logsigmoid(gla.decay_proj(low)) / 16).exp()
    assert ((decay > 0.94) & (decay < 0.97)).all()  # exp(log(1/2) / 16) = 0.958


def test_cache_size_is_constant_in_length(tiny_model_cfg):
    gla = GatedLinear(linear_cfg(tiny_model_cfg))
    short, long = (gla.init_cache(2, n, "cpu", torch.bfloat16) for n in (1024, 16384))
    assert short.nbytes() == long.nbytes() == 4 * 2 * gla.num_heads * gla.key_dim * gla.value_dim  # fp32 state


def test_bad_heads_are_a_clear_error(tiny_model_cfg):
    with pytest.raises(ValueError, match="linear.num_heads=3"):
        GatedLinear(dataclasses.replace(tiny_model_cfg, linear=LinearConfig(num_heads=3)))


@pytest.mark.parametrize("layers", ["linear", "attn,linear"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_count_params_is_exact(layers, tie):
    assert_count_params_exact(layers, tie)


def test_tiny_lm_learns(tiny_model_cfg):
    assert_tiny_lm_learns(LM(linear_cfg(tiny_model_cfg)))
