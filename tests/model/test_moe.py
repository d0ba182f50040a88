"""The DeepSeekMoE FFN (``model/moe.py``): dispatch against the loop reference, routing, the selection bias and its
balancing, checkpoints, cached decoding, parameter counts, and the training loop's hook and metrics."""

import dataclasses
import json

import pytest
import torch

from slmforge.config import AttnConfig, ModelConfig, MoEConfig, load_config
from slmforge.model.block import check_model
from slmforge.model.lm import LM
from slmforge.model.moe import MoE, after_step, seq_balance_loss
from slmforge.plan import count_params, flops_per_token
from tests.conftest import forward_and_decode, tiny_run_config

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, max_seq_len=64, ffn="moe",
                  attn=AttnConfig(num_heads=4, num_kv_heads=2), moe=MoEConfig(num_experts=8, top_k=2))


def _moe(dtype=torch.float64, **moe) -> MoE:
    layer = MoE(dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, **moe))).to(dtype)
    layer.reset_parameters(0.3, 0.2)
    return layer


def _grads(layer: MoE, x: torch.Tensor, reference: bool) -> tuple[torch.Tensor, dict]:
    layer.reference = reference
    x = x.detach().requires_grad_()
    layer.zero_grad()
    y, _ = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), {"x": x.grad, **{n: p.grad.clone() for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shared", [0, 2])
def test_dispatch_equals_the_loop_reference(gate, shared):
    layer = _moe(gate=gate, num_shared=shared, num_experts=16, top_k=3)
    layer.expert_bias[3] = -100.0  # an expert that gets no token
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    load = torch.bincount(layer.route(x.view(-1, 32))[1].view(-1), minlength=16)
    assert load[3] == 0 and load.sum() == 63 and load.max() > 1
    y, grads = _grads(layer, x, reference=False)
    y_ref, grads_ref = _grads(layer, x, reference=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    assert grads.keys() == grads_ref.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=1e-10, msg=name)


def test_topk_and_gates():
    x = torch.randn(10, 32, dtype=torch.float64)
    soft, sig = _moe(gate="softmax"), _moe(gate="sigmoid")
    sig.load_state_dict(soft.state_dict())
    logits = x @ soft.router.weight.T
    want = logits.topk(2, dim=-1)
    scores, chosen, weights = soft.route(x)
    torch.testing.assert_close(scores, logits.softmax(-1))
    assert torch.equal(chosen, want.indices)  # same ranking for softmax and sigmoid: both are monotone
    torch.testing.assert_close(weights, logits.softmax(-1).gather(1, want.indices))  # DeepSeekMoE: not renormalised
    scores, chosen, weights = sig.route(x)
    top = logits.sigmoid().gather(1, want.indices)
    assert torch.equal(chosen, want.indices)
    torch.testing.assert_close(weights, top / top.sum(-1, keepdim=True))  # V3: normalised over the chosen
    torch.testing.assert_close(weights.sum(-1), torch.ones(10, dtype=torch.float64))


def test_the_bias_changes_only_the_selection():
    layer = _moe(gate="softmax")
    x = torch.randn(12, 32, dtype=torch.float64)
    scores, chosen, weights = layer.route(x)
    with torch.no_grad():  # a bias too small to change any choice changes nothing at all
        gaps = scores.sort(-1, descending=True).values
        layer.expert_bias.copy_(torch.linspace(0, 1, 8) * (gaps[:, 1] - gaps[:, 2]).min().item() / 4)
    y_small = layer(x[None])[0]
    layer.expert_bias.zero_()
    torch.testing.assert_close(y_small, layer(x[None])[0], rtol=0, atol=0)
    layer.expert_bias[5] = 10.0  # a large bias: expert 5 is chosen for every token, with its unbiased weight
    biased_scores, biased_chosen, biased_weights = layer.route(x)
    torch.testing.assert_close(biased_scores, scores, rtol=0, atol=0)
    assert (biased_chosen == 5).any(-1).all()
    torch.testing.assert_close(biased_weights, scores.gather(1, biased_chosen), rtol=0, atol=0)
    assert not layer.expert_bias.requires_grad and "expert_bias" not in dict(layer.named_parameters())


def test_bias_update_is_sign_of_the_load_gap_and_counts_training_forwards_only():
    layer = _moe(gate="sigmoid", bias_update_rate=0.1)
    with torch.no_grad():
        layer.eval()(torch.randn(1, 10, 32, dtype=torch.float64))
    assert layer.after_step() == {}  # eval forwards are not counted
    layer.train()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    load = torch.bincount(layer.route(x.view(-1, 32))[1].view(-1), minlength=8).double()
    layer(x)
    layer(x)  # two micro-batches: their loads add up
    stats = layer.after_step()
    torch.testing.assert_close(layer.expert_bias, 0.1 * torch.sign(load.mean() - load), rtol=0, atol=0)
    assert stats["max_mean"] == pytest.approx((load.max() / load.mean()).item())
    p = load / load.sum()
    assert stats["entropy"] == pytest.approx((-(p[p > 0] * p[p > 0].log()).sum() / torch.log(torch.tensor(8.))).item())
    assert layer.after_step() == {}  # the count restarts after each step


def _train_tiny(rate: float, steps: int = 30) -> list[float]:
    """AdamW on 256 fixed tokens with a one-layer MoE (8 experts, top-2); the worst max/mean load per step."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, num_layers=1, moe=dataclasses.replace(CFG.moe, bias_update_rate=rate))
    model = LM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 64, (4, 65), generator=torch.Generator().manual_seed(1))
    history = []
    for _ in range(steps):
        _, loss = model(data[:, :-1], targets=data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(after_step(model)["moe_max_mean"])
    return history


def test_bias_updates_balance_the_load_without_an_aux_loss():
    without, with_bias = _train_tiny(0.0), _train_tiny(0.01)
    assert without[0] == with_bias[0]  # the same start
    late_without, late_with = sum(without[-10:]) / 10, sum(with_bias[-10:]) / 10
    assert late_without > 1.4  # training alone leaves the load skewed
    assert late_with < 1.2


def test_seq_balance_loss_is_one_when_balanced_and_trains_the_router():
    scores = torch.full((1, 4, 4), 0.5)
    chosen = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert seq_balance_loss(scores, chosen).item() == pytest.approx(1.0)
    layer = _moe(seq_aux_loss=0.1)
    _, aux = layer(torch.randn(2, 9, 32, dtype=torch.float64))
    aux.backward()
    assert aux.item() > 0 and layer.router.weight.grad.abs().sum() > 0
    assert layer.eval()(torch.randn(2, 9, 32, dtype=torch.float64))[1] == 0.0  # validation loss stays the LM's


def test_checkpoint_round_trip_keeps_the_bias(tmp_path):
    from slmforge.train.checkpoint import load_checkpoint, save_checkpoint

    model = LM(CFG)
    for _, layer in model.named_modules():
        if isinstance(layer, MoE):
            layer.expert_bias.copy_(torch.randn(8))
    path = save_checkpoint(tmp_path, 3, model, torch.optim.AdamW(model.parameters()), {})
    torch.manual_seed(1)
    loaded = LM(CFG)
    load_checkpoint(path, loaded)
    assert torch.equal(loaded.blocks[1].ffn.expert_bias, model.blocks[1].ffn.expert_bias)
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x)[0], model.eval()(x)[0])


def test_decode_with_cache_equals_forward():
    cfg = dataclasses.replace(CFG, ffn="dense,moe", moe=dataclasses.replace(CFG.moe, num_shared=1, gate="softmax"))
    model = LM(cfg).eval()
    full, stepwise, _ = forward_and_decode(model, torch.randint(0, 64, (2, 13)), 5)
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5)


def test_counts_total_and_active():
    cfg = dataclasses.replace(CFG, ffn="dense,moe", moe=MoEConfig(num_experts=16, num_shared=1, top_k=2))
    check_model(cfg)
    model = LM(cfg)
    n, d, h = count_params(cfg), cfg.d_model, cfg.ffn_dim // 3
    assert model.blocks[1].ffn.hidden == h and isinstance(model.blocks[0].ffn, torch.nn.Module)
    assert n.total == model.num_params()
    assert n.total - n.active == (16 - 2) * 3 * d * h  # the routed experts a token does not use
    dense = dataclasses.replace(cfg, ffn="dense")
    # per token: the router, one shared and two routed experts of ffn_dim / 3 units against the dense SwiGLU
    moe_matmul = 16 * d + 3 * 3 * d * h
    assert flops_per_token(cfg, 64)["forward"] - flops_per_token(dense, 64)["forward"] == \
        2 * (moe_matmul - 3 * d * cfg.ffn_dim)
    assert count_params(dense).active == count_params(dense).total


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match="model.moe.top_k=9: expected at most model.moe.num_experts=8"):
        load_config(None, ["model.ffn=moe", "model.moe.top_k=9"])
    with pytest.raises(ValueError, match="model.moe.gate='relu'"):
        load_config(None, ["model.moe.gate=relu"])
    with pytest.raises(ValueError, match="share_ffn"):
        load_config(None, ["model.ffn=dense,moe", "model.share_ffn=true"])
    with pytest.raises(ValueError, match="unknown FFN.*'mo'"):
        check_model(dataclasses.replace(CFG, ffn="dense,mo"))


def test_hf_export_refuses_moe():
    from slmforge.serve.hf import _check_exportable

    with pytest.raises(ValueError, match="export_hf: model.ffn='moe' has mixture-of-experts layers"):
        _check_exportable(CFG)


def test_training_loop_updates_the_bias_and_logs_the_load(tmp_path, shards_dir):
    from slmforge.checkpoint import latest_checkpoint
    from slmforge.train.checkpoint import load_checkpoint
    from slmforge.train.loop import train

    cfg = tiny_run_config(tmp_path, name="moe", max_steps=4, eval_every=4, ckpt_every=4)
    model_cfg = dataclasses.replace(cfg.model, ffn="moe", moe=MoEConfig(num_experts=4, top_k=2,
                                                                          bias_update_rate=0.01))
    data = dataclasses.replace(cfg.data, shards_dir=str(shards_dir / "shards"),
                               tokenizer=str(shards_dir / "tokenizer.json"))
    cfg = dataclasses.replace(cfg, model=model_cfg, data=data)
    train(cfg, progress=False)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert r["moe_max_mean"] == max(r["moe_max_mean_block0"], r["moe_max_mean_block1"]) >= 1.0
        assert 0 < r["moe_entropy_block0"] <= 1
    model = LM(cfg.model)
    load_checkpoint(latest_checkpoint(cfg.run_dir / "checkpoints"), model)
    bias = model.blocks[0].ffn.expert_bias
    # four steps of +-0.01 each (0 where an expert's load equals the mean): a sum of four such steps
    assert 0 < bias.abs().max() <= 0.04 + 1e-6
    torch.testing.assert_close(bias * 100, (bias * 100).round(), rtol=0, atol=1e-4)
