import dataclasses
import math

import numpy as np
import pytest

from slmforge.config import PRESETS, AttnConfig, ModelConfig, preset
from slmforge.plan import (GPUS, PlanConfig, chinchilla_loss, chinchilla_optimal, count_params, flops_per_token,
                           format_plan, format_presets, memory_gib, plan, tokens_20x_optimal)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_count_matches_model(name, tie):
    torch = pytest.importorskip("torch")
    lm = pytest.importorskip("slmforge.model.lm")
    cfg = dataclasses.replace(preset(name), tie_embeddings=tie)
    with torch.device("meta"):
        model = lm.LM(cfg)
    # parameters() yields a tied (shared) tensor once, as count_params counts it
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_tied_vs_untied():
    cfg = preset("100m")
    tied = count_params(dataclasses.replace(cfg, tie_embeddings=True))
    untied = count_params(dataclasses.replace(cfg, tie_embeddings=False))
    assert untied.total - tied.total == cfg.vocab_size * cfg.d_model
    assert untied.non_embedding == tied.non_embedding
    assert tied.total == tied.non_embedding + tied.embedding
    assert len(tied.per_layer) == cfg.num_layers


def test_hand_count_tiny():
    cfg = ModelConfig(vocab_size=10, d_model=8, num_layers=2, ffn_hidden=16,
                      attn=AttnConfig(num_heads=2, num_kv_heads=1))
    # wq 8x8, wk/wv 8x4, wo 8x8, SwiGLU 3x8x16, two norms
    layer = 64 + 2 * 32 + 64 + 3 * 128 + 2 * 8
    assert count_params(cfg).per_layer == [layer, layer]
    assert count_params(cfg).total == 10 * 8 + 2 * layer + 8


def test_unknown_layer_kind_lists_the_table():
    with pytest.raises(ValueError, match="token mixer.*'ssn'.*attn, dsa, hymba, linear, ssm.*Did you mean ssm"):
        count_params(ModelConfig(layers="attn,ssn"))
    with pytest.raises(ValueError, match="FFN.*'mine'.*dense"):
        flops_per_token(ModelConfig(ffn="mine"), 64)


def test_flops_per_token():
    cfg = preset("100m")
    n = count_params(cfg)
    norms = (2 * cfg.num_layers + 1) * cfg.d_model
    seq = 2048
    f = flops_per_token(cfg, seq)
    attention = 4 * cfg.num_layers * seq * cfg.attn.num_heads * cfg.head_dim
    # tied head: the embedding is counted once in params but the head is still a matmul
    assert f["forward"] == 2 * (n.non_embedding - norms + cfg.vocab_size * cfg.d_model) + attention
    assert f["train"] == 3 * f["forward"]
    assert f["attention_share"] == pytest.approx(attention / f["forward"])
    assert f["forward"] - f["forward_causal"] == pytest.approx(attention * (seq - 1) / (2 * seq))


def test_chinchilla_optimum_minimises_fitted_loss():
    for c in (1e18, 1e21, 1e24):
        opt = chinchilla_optimal(c)
        assert 6 * opt["params"] * opt["tokens"] == pytest.approx(c)
        grid = np.exp(np.linspace(math.log(opt["params"] / 30), math.log(opt["params"] * 30), 20001))
        losses = chinchilla_loss(grid, c / (6 * grid))
        assert grid[np.argmin(losses)] == pytest.approx(opt["params"], rel=1e-3)
        assert opt["loss"] <= losses.min() + 1e-12


def test_20_tokens_rule():
    for c in (1e19, 3e22):
        r = tokens_20x_optimal(c)
        assert r["tokens"] == pytest.approx(20 * r["params"])
        assert 6 * r["params"] * r["tokens"] == pytest.approx(c)


def test_gpu_hours_round_trip():
    by_hours = plan(PlanConfig(gpu_hours=123.0, gpu="a100", mfu=0.5, num_gpus=4))
    assert by_hours["budget"]["flops"] == pytest.approx(123.0 * 312e12 * 0.5 * 3600)
    by_flops = plan(PlanConfig(flops=by_hours["budget"]["flops"], gpu="a100", mfu=0.5, num_gpus=4))
    assert by_flops["budget"]["gpu_hours"] == pytest.approx(123.0)
    assert by_flops["budget"]["wall_hours"] == pytest.approx(123.0 / 4)
    p = by_flops["preset"]
    assert p["tokens"] * p["train_flops_per_token"] == pytest.approx(by_flops["budget"]["flops"])
    assert p["wall_hours"] == pytest.approx(123.0 / 4)


def test_memory_scaling():
    cfg = preset("300m")
    base = memory_gib(cfg, 1024, micro_batch_size=4, num_gpus=8)
    sharded = memory_gib(cfg, 1024, micro_batch_size=4, num_gpus=8, fsdp=True)
    double = memory_gib(cfg, 1024, micro_batch_size=8, num_gpus=8)
    ckpt = memory_gib(cfg, 1024, micro_batch_size=4, num_gpus=8, activation_checkpointing=True)
    n = count_params(cfg).total
    assert base["weights"] == pytest.approx(4 * n / 2**30)
    assert base["optimizer"] == pytest.approx(2 * base["gradients"])
    for key in ("weights", "gradients", "optimizer"):
        assert sharded[key] == pytest.approx(base[key] / 8)
        assert double[key] == base[key]
    assert sharded["activations"] == base["activations"]
    assert double["activations"] == pytest.approx(2 * base["activations"])
    assert ckpt["activations"] < base["activations"] / 3
    assert base["total"] == pytest.approx(sum(v for k, v in base.items() if k != "total"))


def test_budget_picks_sensible_preset():
    big = plan(PlanConfig(flops=1e21))
    assert big["preset"]["name"] == "1b"
    assert plan(PlanConfig(flops=1e17))["preset"]["name"] in ("10m", "50m")
    assert plan(PlanConfig(flops=1e21, preset="tiny"))["preset"]["name"] == "tiny"


def test_1b_preset_is_at_most_1b():
    assert count_params(preset("1b")).total <= 1e9


def test_unknown_gpu_lists_choices():
    with pytest.raises(ValueError, match="h100") as err:
        plan(PlanConfig(gpu_hours=1, gpu="h1000"))
    assert all(name in str(err.value) for name in GPUS)


def test_reports():
    table = format_presets()
    assert all(name in table for name in PRESETS)
    assert f"{count_params(preset('1b')).total:,}" in table
    text = format_plan(plan(PlanConfig(gpu_hours=100)))
    assert "EFLOP" in text and "GiB" in text and "fits" in text
