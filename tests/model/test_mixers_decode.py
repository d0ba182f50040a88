"""Cached decoding reproduces the parallel forward for every mixer in ``MIXERS`` and for a mixed layout, through the
full LM: prefill a prefix then decode one token at a time, and prefill in several chunks (fla's
``run_test_generation``, mamba's ``teacher_outputs``). Also: exact parameter counts of the mixed layout, and the
recurrent mixers' caches do not grow with the sequence length.
"""

import dataclasses

import pytest
import torch

from slmforge.config import LinearConfig, SSMConfig, preset
from slmforge.model.block import MIXERS
from slmforge.model.lm import LM
from slmforge.plan import count_params
from slmforge.serve.generate import generate_batch_ref
from tests.conftest import forward_and_decode

MIXED = ",".join(MIXERS)  # every mixer in one model
LAYOUTS = [*MIXERS, MIXED]


def _model(tiny_model_cfg, layers: str) -> LM:
    # Chunks of 8 tokens, so a 25-token forward spans several chunks and the prefill splits cut through them.
    cfg = dataclasses.replace(tiny_model_cfg, layers=layers, num_layers=max(2, len(layers.split(","))),
                              ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=8),
                              linear=LinearConfig(num_heads=2, chunk_size=8))
    return LM(cfg).eval()


@pytest.mark.parametrize("prefill", [1, 9], ids=lambda p: f"prefill{p}")
@pytest.mark.parametrize("layers", LAYOUTS)
def test_decode_equals_forward(tiny_model_cfg, layers, prefill):
    model = _model(tiny_model_cfg, layers)
    full, stepwise, cache = forward_and_decode(model, torch.randint(0, 97, (3, 25)), prefill)
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5)
    assert all(c.pos == 25 for c in cache)


@pytest.mark.parametrize("layers", LAYOUTS)
def test_chunked_prefill_equals_forward(tiny_model_cfg, layers):
    model = _model(tiny_model_cfg, layers)
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.init_cache(2, 30)
        parts = [model(x[:, a:b], cache=cache)[0] for a, b in ((0, 3), (3, 13), (13, 14), (14, 30))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_greedy_generation_with_cache_equals_full_recompute(tiny_model_cfg):
    model = _model(tiny_model_cfg, MIXED)
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (1, 6, 11)]
    assert generate_batch_ref(model, prompts, 8, use_cache=True) == generate_batch_ref(model, prompts, 8)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", ["tiny", "100m"])
def test_count_params_of_mixed_layout_is_exact(name, tie):
    cfg = dataclasses.replace(preset(name), layers=MIXED, tie_embeddings=tie)
    with torch.device("meta"):
        model = LM(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("layers", ["ssm", "linear"])
def test_recurrent_cache_does_not_grow_with_length(tiny_model_cfg, layers):
    model = _model(tiny_model_cfg, layers)
    short, long = (sum(c.nbytes() for c in model.init_cache(2, n)) for n in (1024, 16384))
    assert short == long > 0
    attn = _model(tiny_model_cfg, "attn")
    assert sum(c.nbytes() for c in attn.init_cache(2, 16384)) == 16 * sum(c.nbytes() for c in attn.init_cache(2, 1024))
