"""Hymba hybrid heads: built from ``Attention`` and ``SSMHeads`` with one output projection, the combination
beta1 * norm(attn) + beta2 * norm(ssm), its sliding window, its paired cache, exact parameter counts and a tiny
LM that learns.

(Decoding against the parallel forward, for every mixer: ``test_mixers_decode.py``.)
"""

import dataclasses

import pytest
import torch

from slmforge.config import HymbaConfig, SSMConfig
from slmforge.model.attention import Attention, attention_ref, causal_mask
from slmforge.model.cache import KVCache, RecurrentCache
from slmforge.model.hymba import Hymba, attention_heads
from slmforge.model.layers import apply_rope
from slmforge.model.lm import LM
from slmforge.model.ssm import SSMHeads
from tests.conftest import assert_count_params_exact, assert_tiny_lm_learns


def hymba_cfg(cfg, window=0):
    return dataclasses.replace(cfg, layers="hymba", ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=8),
                               hymba=HymbaConfig(window=window))


def _hymba(cfg, window=0) -> Hymba:
    mixer = Hymba(hymba_cfg(cfg, window)).double()
    mixer.reset_parameters(0.02, 0.01)
    return mixer


def test_parts_are_attention_and_ssm_heads_with_one_output_projection(tiny_model_cfg):
    mixer = _hymba(tiny_model_cfg)
    assert type(mixer.attn) is Attention and type(mixer.ssm) is SSMHeads
    assert mixer.ssm.width == mixer.attn.num_heads * mixer.attn.head_dim
    assert not hasattr(mixer.ssm, "out_proj")  # attn.wo is the only projection back to d_model
    assert (mixer.attn_norm.weight == 0.5).all() and (mixer.ssm.norm.weight == 0.5).all()  # the branches' mean


def test_attention_heads_equal_attention_forward_without_its_projection(tiny_model_cfg):
    attn = Attention(tiny_model_cfg).double()
    x = torch.randn(2, 13, tiny_model_cfg.d_model, dtype=torch.float64)
    heads = attention_heads(attn, x, None)
    torch.testing.assert_close(attn.wo(heads), attn(x), rtol=1e-12, atol=1e-12)
    cache = attn.init_cache(2, 13, "cpu", torch.float64)
    parts = [attention_heads(attn, x[:, a:b], cache) for a, b in ((0, 6), (6, 7), (7, 13))]
    torch.testing.assert_close(torch.cat(parts, 1), heads, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [0, 4], ids=["full", "window4"])
def test_forward_is_the_normalised_sum_of_the_branches(tiny_model_cfg, window):
    mixer = _hymba(tiny_model_cfg, window)
    with torch.no_grad():
        mixer.attn_norm.weight.uniform_(0.5, 1.5)
        mixer.ssm.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 11, tiny_model_cfg.d_model, dtype=torch.float64)
    a = mixer.attn
    h, kvh, d = a.num_heads, a.num_kv_heads, a.head_dim
    q, k, v = a.wqkv(x).view(2, 11, h + 2 * kvh, d).transpose(1, 2).split([h, kvh, kvh], dim=1)
    cos, sin = a.cos[:11], a.sin[:11]
    o = attention_ref(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, causal_mask(11, 11, window, "cpu"))
    attn_out = o.transpose(1, 2).reshape(2, 11, h * d)
    normed = attn_out * torch.rsqrt(attn_out.pow(2).mean(-1, keepdim=True) + 1e-5) * mixer.attn_norm.weight
    want = a.wo(normed + mixer.ssm(x))  # the SSM heads end in their own gated RMSNorm, weight beta2
    torch.testing.assert_close(mixer(x), want, rtol=1e-10, atol=1e-12)
    assert a.window == window and tiny_model_cfg.attn.window == 0


def test_cache_pairs_kv_and_ssm_state(tiny_model_cfg):
    mixer = _hymba(tiny_model_cfg)
    cache = mixer.init_cache(2, 20, "cpu", torch.float64)
    assert isinstance(cache.kv, KVCache) and isinstance(cache.ssm, RecurrentCache)
    mixer(torch.randn(2, 5, tiny_model_cfg.d_model, dtype=torch.float64), cache=cache)
    assert cache.pos == cache.kv.pos == cache.ssm.pos == 5
    assert cache.nbytes() == cache.kv.nbytes() + cache.ssm.nbytes()
    # the KV part grows with max_len, the SSM part does not
    longer = mixer.init_cache(2, 40, "cpu", torch.float64)
    assert longer.kv.nbytes() == 2 * cache.kv.nbytes() and longer.ssm.nbytes() == cache.ssm.nbytes()


@pytest.mark.parametrize("layers", ["hymba", "attn,hymba"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_count_params_is_exact(layers, tie):
    assert_count_params_exact(layers, tie)


def test_tiny_lm_learns(tiny_model_cfg):
    assert_tiny_lm_learns(LM(hymba_cfg(tiny_model_cfg)))
