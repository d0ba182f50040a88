"""Every entry of ``block.MIXERS`` (and ``FFNS``) keeps its promises, with no per-mixer test code: its static
``cost().params`` equals the parameters of the built module, ``state_bytes`` equals the bytes of the cache
``init_cache`` makes, and cached decoding equals one parallel forward. A toy mixer registered in the test shows
that the LM, the planner and ``info`` take a new entry with no other edit.
"""

import pytest
import torch
from torch import nn

from slmforge.config import AttnConfig, HymbaConfig, LinearConfig, ModelConfig, SSMConfig
from slmforge.info import state_bytes
from slmforge.model.block import FFNS, MIXERS, check_model
from slmforge.model.cache import RecurrentCache
from slmforge.model.cost import LayerCost
from slmforge.model.layers import init_linear, linear
from slmforge.model.lm import LM
from slmforge.plan import count_params, flops_per_token
from tests.conftest import forward_and_decode

CONFIGS = {
    "gqa": ModelConfig(d_model=32, max_seq_len=64, attn=AttnConfig(num_heads=4, num_kv_heads=2),
                       ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=8), linear=LinearConfig(num_heads=2)),
    # MQA, sliding windows shorter than the sequence, chunks that do not divide it
    "mqa_window": ModelConfig(d_model=32, max_seq_len=64, attn=AttnConfig(num_heads=4, num_kv_heads=1, window=5),
                              ssm=SSMConfig(state_dim=4, head_dim=8, expand=1, chunk_size=6),
                              linear=LinearConfig(num_heads=4, chunk_size=5), hymba=HymbaConfig(window=6)),
    # odd widths: 3 heads of 8, a 5-wide state, a 3-tap conv, rank-5 decay, 40 FFN units
    "odd": ModelConfig(d_model=24, max_seq_len=64, ffn_hidden=40, attn=AttnConfig(num_heads=3, num_kv_heads=1),
                       ssm=SSMConfig(state_dim=5, head_dim=8, conv_kernel=3, chunk_size=7),
                       linear=LinearConfig(num_heads=3, expand_k=0.75, decay_rank=5, chunk_size=7)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_params(cls: type[nn.Module], cfg: ModelConfig) -> None:
    with torch.device("meta"):
        module = cls(cfg)
    assert cls.cost(cfg, cfg.max_seq_len).params == sum(p.numel() for p in module.parameters())


def check_state_bytes(cls: type[nn.Module], cfg: ModelConfig, tokens: int, dtype: torch.dtype) -> None:
    with torch.device("meta"):
        module = cls(cfg)
    cache = module.init_cache(1, tokens, "meta", dtype)
    assert cls.state_bytes(cfg, tokens, dtype.itemsize) == cache.nbytes()


def check_decode_equals_forward(cls: type[nn.Module], cfg: ModelConfig, length: int = 19) -> None:
    """Prefill half, decode the rest one token at a time, compare with one parallel forward (float64)."""
    module = cls(cfg).double()
    module.reset_parameters(0.2, 0.1)
    x = torch.randn(2, length, cfg.d_model, dtype=torch.float64)
    prefill = length // 2
    with torch.no_grad():
        full = module(x)
        cache = module.init_cache(2, length, x.device, x.dtype)
        steps = [module(x[:, :prefill], cache=cache)]
        steps += [module(x[:, i : i + 1], cache=cache) for i in range(prefill, length)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)
    assert cache.pos == length


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(MIXERS))
def test_cost_params_equal_the_module(kind, config):
    check_params(MIXERS[kind], CONFIGS[config])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(FFNS))
def test_ffn_cost_params_equal_the_module(kind, config):
    check_params(FFNS[kind], CONFIGS[config])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(MIXERS))
def test_state_bytes_equal_the_cache(kind, config, dtype):
    for tokens in (1, 37):
        check_state_bytes(MIXERS[kind], CONFIGS[config], tokens, DTYPES[dtype])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(MIXERS))
def test_decode_equals_forward(kind, config):
    check_decode_equals_forward(MIXERS[kind], CONFIGS[config])


@pytest.mark.parametrize("kind", list(MIXERS))
def test_cost_grows_with_flops_not_params(kind):
    """Context FLOPs never shrink with a longer sequence; parameters and matmul weights do not change."""
    cfg = CONFIGS["gqa"]
    short, long = MIXERS[kind].cost(cfg, 16), MIXERS[kind].cost(cfg, 64)
    assert (short.params, short.matmul_params) == (long.params, long.matmul_params)
    assert 0 < short.context_flops <= long.context_flops and short.context_flops_causal <= short.context_flops


class CumulativeMean(nn.Module):
    """A toy causal mixer: y_t = W (x_1 + ... + x_t) / t. Its cache is the running sum, (B, 1, C) in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        init_linear(self.proj, out_std)

    def init_cache(self, batch_size: int, max_len: int, device, dtype) -> RecurrentCache:
        d = self.proj.in_features
        return RecurrentCache(torch.zeros(batch_size, 1, d, device=device,
                                          dtype=torch.promote_types(dtype, torch.float32)))

    def forward(self, x: torch.Tensor, cache: RecurrentCache | None = None) -> torch.Tensor:
        sums = x.cumsum(1)
        count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        if cache is not None:
            sums, count = sums + cache.state.to(x.dtype), count + cache.pos
            cache.state.copy_(sums[:, -1:])
            cache.pos += x.shape[1]
        return linear(sums / count, self.proj.weight)

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        d = cfg.d_model
        return LayerCost(d * d, d * d, context_flops=d, context_flops_causal=d, activation_bytes=2 * 2 * d)

    @staticmethod
    def state_bytes(cfg: ModelConfig, tokens: int, nbytes: int) -> int:
        return cfg.d_model * max(nbytes, 4)


def test_a_new_mixer_needs_only_a_table_entry(monkeypatch, tiny_model_cfg):
    monkeypatch.setitem(MIXERS, "toy", CumulativeMean)
    check_params(CumulativeMean, CONFIGS["odd"])
    check_state_bytes(CumulativeMean, CONFIGS["odd"], 37, torch.bfloat16)
    check_decode_equals_forward(CumulativeMean, CONFIGS["odd"])

    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=3, max_seq_len=64, layers="attn,toy,toy",
                      attn=AttnConfig(num_heads=4, num_kv_heads=2))
    check_model(cfg)
    model = LM(cfg).eval()
    assert count_params(cfg).total == model.num_params()
    full, stepwise, _ = forward_and_decode(model, torch.randint(0, 97, (2, 13)), 5)
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5)

    # the toy layers add their own weights (2 FLOPs each) and d context FLOPs to attention's per token
    attn_only = ModelConfig(vocab_size=97, d_model=32, num_layers=1, max_seq_len=64,
                            attn=AttnConfig(num_heads=4, num_kv_heads=2))
    d, f = cfg.d_model, cfg.ffn_dim
    toy = 2 * (2 * (d * d + 3 * d * f) + d)
    assert flops_per_token(cfg, 64)["forward"] == flops_per_token(attn_only, 64)["forward"] + toy

    by_kind = state_bytes(cfg, 40, "fp32")
    caches = model.init_cache(1, 40, dtype=torch.float32)
    assert by_kind["toy"] == 2 * 32 * 4 == sum(c.nbytes() for c in caches[1:])
    assert by_kind["total"] == sum(c.nbytes() for c in caches)


def test_unknown_mixer_names_the_choices():
    cfg = ModelConfig(layers="attn,atn")
    for call in (check_model, count_params, lambda c: state_bytes(c, 16)):
        with pytest.raises(ValueError, match="unknown token mixer.*'atn'.*Did you mean attn"):
            call(cfg)
