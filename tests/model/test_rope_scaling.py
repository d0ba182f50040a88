"""RoPE scaling (``model.attn.rope_scaling``): factor 1 is no scaling; linear, NTK and YaRN move the frequencies
as their papers say; a scaled model still packs documents exactly."""

import math

import pytest
import torch

from slmforge.config import AttnConfig, ModelConfig, load_config
from slmforge.model.layers import rope_tables
from slmforge.model.lm import LM

MODES = ["linear", "ntk", "yarn"]


def _attn(kind: str, factor: float, **kw) -> AttnConfig:
    return AttnConfig(rope_scaling=kind, rope_factor=factor, **kw)


@pytest.mark.parametrize("kind", MODES)
def test_factor_one_equals_no_scaling(kind):
    plain = rope_tables(16, 300, 10000.0)
    scaled = rope_tables(16, 300, 10000.0, scale=_attn(kind, 1.0), original_len=128)
    for a, b in zip(plain, scaled):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    x = torch.randint(0, 50, (2, 40))
    logits = []
    for attn in (AttnConfig(), _attn(kind, 1.0, rope_original_len=16)):
        torch.manual_seed(1)
        model = LM(ModelConfig(vocab_size=50, d_model=32, num_layers=1, max_seq_len=64, attn=attn))
        logits.append(model(x)[0])
    assert torch.equal(*logits)


def test_linear_interpolates_positions():
    plain_cos, _ = rope_tables(16, 64, 10000.0)
    cos, sin = rope_tables(16, 256, 10000.0, scale=_attn("linear", 4.0), original_len=64)
    torch.testing.assert_close(cos[::4], plain_cos, rtol=0, atol=1e-5)  # position 4p now looks like p did


def test_ntk_keeps_the_highest_frequency_and_interpolates_the_lowest():
    d, theta, factor = 16, 10000.0, 8.0
    angle = lambda table: torch.atan2(table[1][1], table[0][1])  # noqa: E731  the angle of position 1
    plain, ntk = angle(rope_tables(d, 2, theta)), angle(rope_tables(d, 2, theta, scale=_attn("ntk", factor)))
    assert ntk[0] == plain[0]
    torch.testing.assert_close(ntk[-1], plain[-1] / factor, rtol=1e-4, atol=0)


def test_yarn_keeps_fast_dimensions_interpolates_slow_ones_and_scales_temperature():
    d, theta, factor, original = 32, 10000.0, 4.0, 256
    cos_p, sin_p = rope_tables(d, 2, theta)
    cos, sin = rope_tables(d, 2, theta, scale=_attn("yarn", factor), original_len=original)
    mscale = 0.1 * math.log(factor) + 1
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.full_like(cos, mscale ** 2))
    angle, plain = torch.atan2(sin[1], cos[1]), torch.atan2(sin_p[1], cos_p[1])
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2) / d)
    turns = original * inv_freq / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any()
    torch.testing.assert_close(angle[fast], plain[fast])
    torch.testing.assert_close(angle[slow], plain[slow] / factor)
    between = ~fast & ~slow
    assert ((angle[between] < plain[between]) & (angle[between] > plain[between] / factor)).all()


@pytest.mark.parametrize("kind", MODES)
def test_scaled_model_packs_documents_as_if_run_alone(kind):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=1, max_seq_len=64, attn=_attn(kind, 4.0))
    model = LM(cfg).double().eval()
    a, b = torch.randint(0, 50, (9,)), torch.randint(0, 50, (7,))
    packed = model(torch.cat([a, b])[None], doc=torch.tensor([[0] * 9 + [1] * 7]))[0]
    torch.testing.assert_close(packed[0, 9:], model(b[None])[0][0], rtol=0, atol=1e-10)


def test_bad_factor_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"model.attn.rope_factor=0.5: expected a value >= 1"):
        load_config(None, ["model.attn.rope_factor=0.5"])
    with pytest.raises(ValueError, match="rope_scaling.*yarn"):
        load_config(None, ["model.attn.rope_scaling=yarm"])


def test_scaled_rope_is_not_exported_as_plain_llama():
    from slmforge.serve.hf import _check_exportable

    _check_exportable(ModelConfig(attn=_attn("yarn", 1.0)))  # factor 1: plain RoPE, exported as is
    with pytest.raises(ValueError, match="rope_scaling='yarn' is not exported"):
        _check_exportable(ModelConfig(attn=_attn("yarn", 4.0)))
