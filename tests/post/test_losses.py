"""Preference losses: ORPO and DPO against plain-math references (float64, 1e-10) and against TRL's own loss
code; per-sequence log-probs against a loop; gradients point the right way and stay finite at certainty."""

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from slmforge.post import losses
from slmforge.post.losses import dpo_loss, orpo_loss, sequence_logps

B = 7


def _pairs(seed: int = 0) -> dict:
    """Fixed float64 inputs: mean log-probs for ORPO (some near 0, across the log1mexp branch at -log 2),
    summed log-probs of policy and reference for DPO, with pairs ranked both ways."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)  # noqa: E731
    mean_chosen = u(-3.0, -1e-3)
    mean_chosen[0] = -0.6931471805599453 + 1e-4
    return {
        "lc": mean_chosen, "lr": u(-3.0, -1e-3), "nll": torch.tensor(1.7, dtype=torch.float64),
        "pc": u(-60.0, -5.0), "pr": u(-60.0, -5.0), "rc": u(-60.0, -5.0), "rr": u(-60.0, -5.0),
    }


def _logsigmoid_ref(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def orpo_ref(lc, lr, nll: float, beta: float) -> dict:
    """Hong et al. 2024 eq. 6-8, one pair at a time in python floats."""
    log_odds = [(c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r))) for c, r in zip(lc, lr)]
    or_loss = -_mean([_logsigmoid_ref(z) for z in log_odds])
    return {
        "loss": nll + beta * or_loss, "nll": nll, "or_loss": or_loss, "log_odds": _mean(log_odds),
        "chosen_logps": _mean(lc), "rejected_logps": _mean(lr),
        "reward_chosen": beta * _mean(lc), "reward_rejected": beta * _mean(lr),
        "reward_margin": beta * _mean([c - r for c, r in zip(lc, lr)]),
        "reward_accuracy": _mean([float(c > r) for c, r in zip(lc, lr)]),
    }


def dpo_ref(pc, pr, rc, rr, beta: float, ls: float) -> dict:
    """Rafailov et al. 2023 eq. 7 with cDPO's label smoothing, one pair at a time in python floats."""
    per_pair, chosen_rewards, rejected_rewards = [], [], []
    for c, r, c0, r0 in zip(pc, pr, rc, rr):
        z = beta * ((c - c0) - (r - r0))
        per_pair.append(-(1 - ls) * _logsigmoid_ref(z) - ls * _logsigmoid_ref(-z))
        chosen_rewards.append(beta * (c - c0))
        rejected_rewards.append(beta * (r - r0))
    return {
        "loss": _mean(per_pair), "chosen_logps": _mean(pc), "rejected_logps": _mean(pr),
        "reward_chosen": _mean(chosen_rewards), "reward_rejected": _mean(rejected_rewards),
        "reward_margin": _mean([c - r for c, r in zip(chosen_rewards, rejected_rewards)]),
        "reward_accuracy": _mean([float(c > r) for c, r in zip(chosen_rewards, rejected_rewards)]),
    }


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_reference(beta):
    x = _pairs()
    loss, metrics = orpo_loss(x["lc"], x["lr"], x["nll"], beta)
    ref = orpo_ref(x["lc"].tolist(), x["lr"].tolist(), x["nll"].item(), beta)
    assert 0 < ref["reward_accuracy"] < 1
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(ref["loss"], abs=1e-10, rel=0)
    assert metrics.keys() == ref.keys()
    for key, value in ref.items():
        assert isinstance(metrics[key], float)
        assert metrics[key] == pytest.approx(value, abs=1e-10, rel=0), key


@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_equals_reference(beta, ls):
    x = _pairs(2)
    loss, metrics = dpo_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta, label_smoothing=ls)
    ref = dpo_ref(*(x[k].tolist() for k in ("pc", "pr", "rc", "rr")), beta, ls)
    assert 0 < ref["reward_accuracy"] < 1
    assert loss.item() == pytest.approx(ref["loss"], abs=1e-10, rel=0)
    assert metrics.keys() == ref.keys()
    for key, value in ref.items():
        assert metrics[key] == pytest.approx(value, abs=1e-10, rel=0), key


def test_log1mexp_keeps_its_digits_at_both_ends():
    # near 0, log1p(-exp(x)) cancels; far below, log(-expm1(x)) rounds to log(1) = 0
    xs = [-1e-6, -3e-6, -1e-3, -0.5, -0.6931471805599453, -0.9, -5.0, -40.0, -700.0]
    got = losses.log1mexp(torch.tensor(xs, dtype=torch.float64)).tolist()
    assert got == pytest.approx([math.log(-math.expm1(x)) if x > -1 else math.log1p(-math.exp(x)) for x in xs],
                                rel=1e-13, abs=0)


def _logits_targets(seed: int = 0, n: int = 5, t: int = 9, v: int = 13):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, t, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n, t), generator=g)
    targets[torch.rand(n, t, generator=g) < 0.3] = -100
    targets[2] = -100  # a row with nothing scored
    targets[3, :] = torch.arange(t) % v  # a row with everything scored
    return logits, targets


def sequence_logps_ref(logits: torch.Tensor, targets: torch.Tensor) -> tuple[list, list]:
    sums, counts = [], []
    for row_logits, row_targets in zip(logits.tolist(), targets.tolist()):
        total, count = 0.0, 0
        for position, target in zip(row_logits, row_targets):
            if target != -100:
                top = max(position)
                total += position[target] - top - math.log(sum(math.exp(z - top) for z in position))
                count += 1
        sums.append(total)
        counts.append(float(count))
    return sums, counts


@pytest.mark.parametrize("block_elements", [1 << 24, 13 * 4], ids=["one-block", "blocks-of-4-rows"])
def test_sequence_logps_equals_loop(monkeypatch, block_elements):
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", block_elements)
    logits, targets = _logits_targets()
    sums, counts = sequence_logps(logits, targets)
    ref_sums, ref_counts = sequence_logps_ref(logits, targets)
    assert sums.shape == counts.shape == (5,)
    assert sums.tolist() == pytest.approx(ref_sums, abs=1e-10, rel=0)
    assert counts.tolist() == ref_counts
    assert sums[2].item() == 0.0 and counts[2].item() == 0.0 and counts[3].item() == 9.0


def test_sequence_logps_gradient_through_blocks(monkeypatch):
    logits, targets = _logits_targets(1)
    whole = logits.clone().requires_grad_()
    sequence_logps(whole, targets)[0].sum().backward()
    monkeypatch.setattr(losses, "BLOCK_ELEMENTS", 13 * 4)
    blocked = logits.clone().requires_grad_()
    sequence_logps(blocked, targets)[0].sum().backward()
    assert whole.grad.abs().sum() > 0
    torch.testing.assert_close(blocked.grad, whole.grad, rtol=0, atol=1e-12)
    # ignored positions get no gradient
    assert blocked.grad[targets == -100].abs().max() == 0


def test_sequence_logps_bf16_runs_in_float32():
    logits, targets = _logits_targets(2)
    low = logits.bfloat16()
    sums, counts = sequence_logps(low, targets)
    assert sums.dtype == counts.dtype == torch.float32
    ref_sums, _ = sequence_logps_ref(low.double(), targets)
    # float32 arithmetic on the bf16 values: ~1e-6; a bf16 log-softmax would be off by ~1e-2
    assert sums.tolist() == pytest.approx(ref_sums, abs=1e-4, rel=0)
    unrounded, _ = sequence_logps_ref(logits, targets)
    assert sums.tolist() == pytest.approx(unrounded, abs=0.5, rel=0)


def test_raising_chosen_logp_lowers_both_losses():
    x = _pairs(2)
    lc = x["lc"].clone().requires_grad_()
    orpo_loss(lc, x["lr"], x["nll"], 0.1)[0].backward()
    assert (lc.grad < 0).all()
    pc = x["pc"].clone().requires_grad_()
    pr = x["pr"].clone().requires_grad_()
    dpo_loss(pc, pr, x["rc"], x["rr"], 0.1)[0].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_certain_responses_give_finite_losses_and_grads(dtype):
    lc = torch.tensor([0.0, 0.0, -1e-9, -2.0], dtype=dtype, requires_grad=True)
    lr = torch.tensor([0.0, -1.0, 0.0, -1e-12], dtype=dtype, requires_grad=True)
    loss, metrics = orpo_loss(lc, lr, torch.tensor(0.5, dtype=dtype), 0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in metrics.values())
    assert torch.isfinite(lc.grad).all() and torch.isfinite(lr.grad).all()
    # a certain chosen answer against a likely-wrong one: the odds ratio term is at its floor, not NaN
    assert 0 < orpo_loss(lc[1:2], lr[1:2], torch.tensor(0.0, dtype=dtype), 0.1)[1]["or_loss"] < 1e-5
    pc = torch.zeros(4, dtype=dtype, requires_grad=True)
    loss, _ = dpo_loss(pc, lr, torch.zeros(4, dtype=dtype), lr.detach(), 0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(pc.grad).all()


# TRL (pip install trl==1.16.0): its loss code called on the same tensors, without building a trainer.


def _trl():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return pytest.importorskip("trl")


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trl(beta):
    _trl()
    from trl.experimental.orpo import ORPOTrainer

    x = _pairs(3)
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    odds_ratio_loss = ORPOTrainer.odds_ratio_loss.__get__(trainer)
    lc, lr = x["lc"].float(), x["lr"].float()
    terms, chosen_rewards, rejected_rewards, mean_ratio, mean_log_odds = odds_ratio_loss(lc, lr)
    # ORPOTrainer.get_batch_loss_metrics: loss = nll - mean(beta * logsigmoid(log_odds))
    trl_loss = x["nll"].float() - terms.mean()
    loss, metrics = orpo_loss(lc, lr, x["nll"].float(), beta)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    assert metrics["or_loss"] == pytest.approx(-mean_ratio.item(), abs=1e-6)
    assert metrics["log_odds"] == pytest.approx(mean_log_odds.item(), abs=1e-6)
    assert metrics["reward_chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)
    assert metrics["reward_rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-6)
    assert metrics["reward_accuracy"] == pytest.approx((chosen_rewards > rejected_rewards).float().mean().item())


def test_length_normalised_logps_equal_trl():
    _trl()
    from trl.experimental.orpo import ORPOTrainer

    logits, targets = _logits_targets(4)
    keep = [0, 1, 3, 4]  # TRL divides by the count: a row with nothing scored would give NaN there
    logits, targets = logits[keep].float(), targets[keep]
    # TRL shifts inside (logits[:, :-1] score labels[:, 1:]); ours takes targets already aligned
    labels = torch.cat([torch.full_like(targets[:, :1], -100), targets], 1)
    padded = torch.cat([logits, torch.zeros_like(logits[:, :1])], 1)
    theirs = ORPOTrainer.get_batch_logps(padded, labels, average_log_prob=True)
    sums, counts = sequence_logps(logits, targets)
    torch.testing.assert_close(sums / counts, theirs, rtol=0, atol=1e-6)


def _trl_dpo_metrics(pc, pr, rc, rr, beta: float) -> tuple[float, dict]:
    """DPOTrainer._compute_loss (TRL 1.x: the loss lives there) with a stand-in model whose per-token
    log-probs are one position holding each sequence's summed log-prob, and precomputed reference log-probs."""
    from trl import DPOTrainer

    num_seqs = 2 * len(pc)
    outputs = SimpleNamespace(
        log_probs=torch.cat([pc, pr])[:, None], entropy=torch.zeros(num_seqs, 1),
        mean_logits=torch.zeros(num_seqs, 1), is_top1=torch.zeros(num_seqs, 1, dtype=torch.bool))
    identity = lambda t: t  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), beta=beta, label_smoothing=0.0, loss_types=["sigmoid"],
        loss_weights=[1.0], f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True,
        aux_loss_enabled=False, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity))
    inputs = {
        "input_ids": torch.zeros(num_seqs, 2, dtype=torch.long), "attention_mask": torch.ones(num_seqs, 2),
        "completion_mask": torch.ones(num_seqs, 2, dtype=torch.long), "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss.__get__(trainer)(lambda **kwargs: outputs, inputs, False)
    return loss.item(), {key: values[-1] for key, values in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trl(beta):
    _trl()
    x = _pairs(4)
    pc, pr, rc, rr = (x[k].float() for k in ("pc", "pr", "rc", "rr"))
    trl_loss, trl_metrics = _trl_dpo_metrics(pc, pr, rc, rr, beta)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(trl_loss, abs=1e-6)
    pairs = {"reward_chosen": "rewards/chosen", "reward_rejected": "rewards/rejected",
             "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies",
             "chosen_logps": "logps/chosen", "rejected_logps": "logps/rejected"}
    for ours, theirs in pairs.items():
        assert metrics[ours] == pytest.approx(trl_metrics[theirs], abs=1e-5), ours
