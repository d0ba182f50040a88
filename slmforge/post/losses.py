"""Preference losses: per-sequence log-probs, ORPO and DPO.

ORPO (Hong et al. 2024, arXiv 2403.07691, eq. 6-8) needs no reference model. With the length-normalised
log-probs lc = (1/|yw|) sum_t log p(yw_t | x, yw_<t) and lr (the same for yl):

    odds(y|x) = p / (1 - p)                                      (eq. 4, p = exp(l))
    log_odds  = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr)))  (eq. 7, in log form)
    loss      = L_SFT - beta * mean(logsigmoid(log_odds))          (eq. 6, 8; beta is the paper's lambda)

L_SFT is the NLL of the chosen responses, a mean over their tokens. The paper defines p as the
length-normalised likelihood (eq. 4): a probability per token, comparable between a short and a long
answer, and the only form for which 1 - p is not ~1 on any realistic sequence. TRL's ORPOTrainer does the
same (get_batch_logps with average_log_prob=True); its NLL also counts prompt tokens, ours does not.

DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7) against a frozen reference, on SUMMED log-probs:

    logits = (pc - rc) - (pr - rr)
    loss   = mean(-(1 - ls) * logsigmoid(beta * logits) - ls * logsigmoid(-beta * logits))

The sums are the log-likelihood ratios of whole responses that DPO's derivation (the Bradley-Terry model on
the implicit reward beta * log(pi / pi_ref)) calls for; the length terms cancel against the reference, so
no normalisation is needed (TRL's "sigmoid" loss sums too). ls is label smoothing, the conservative DPO
of Mitchell 2023 ("cDPO"): the labels are taken to be flipped with probability ls.

Shapes: N sequences, T positions, V vocabulary, B pairs.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of float32 log-softmax computed at once by sequence_logps (64 MiB).
BLOCK_ELEMENTS = 1 << 24
# log(1 - exp(x)) is -inf at x == 0 (a response the model is certain of); clamping x below 0 keeps the
# ORPO loss and its gradient finite there. At -1e-6 the log odds saturate near 13.8, far past where
# logsigmoid flattens, so the clamp never changes a loss that matters.
CERTAIN_LOGP = -1e-6


def sequence_logps(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Sum of log p(target) over scored positions and their count, per sequence.

    logits (N, T, V) of any float dtype; targets (N, T) int64, ignore_index where a position is not scored.
    Returns two (N,) tensors, float32 (float64 for float64 logits). The log-softmax runs in float32 a block
    of rows at a time, so the float32 copy of the logits exists once (kept by autograd), never twice.
    """
    num_seqs, seq_len, vocab = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat_logits = logits.reshape(num_seqs * seq_len, vocab)  # (N*T, V)
    flat_targets = targets.reshape(-1)  # (N*T,)
    scored = flat_targets != ignore_index  # (N*T,)
    safe_targets = torch.where(scored, flat_targets, 0)
    rows = max(1, BLOCK_ELEMENTS // vocab)
    picked = []
    for start in range(0, flat_logits.shape[0], rows):
        block = flat_logits[start : start + rows].to(dtype).log_softmax(-1)  # (rows, V)
        picked.append(block.gather(1, safe_targets[start : start + rows, None]).squeeze(1))
    token_logps = torch.cat(picked) if picked else flat_logits.new_zeros(0, dtype=dtype)  # (N*T,)
    token_logps = torch.where(scored, token_logps, 0.0).reshape(num_seqs, seq_len)
    counts = scored.reshape(num_seqs, seq_len).sum(1).to(dtype)
    return token_logps.sum(1), counts


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_nll: Tensor, beta: float) -> tuple[Tensor, dict]:
    """ORPO's loss from length-normalised (B,) log-probs and the chosen responses' mean NLL (a scalar).

    Returns the scalar loss and a dict of python floats: loss, nll, or_loss, log_odds, chosen_logps,
    rejected_logps, reward_chosen, reward_rejected, reward_margin, reward_accuracy (rewards are beta * l).
    """
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    loss = chosen_nll - beta * ratio.mean()
    metrics = {
        "loss": loss.item(),
        "nll": chosen_nll.item(),
        "or_loss": -ratio.mean().item(),
        "log_odds": log_odds.mean().item(),
        "chosen_logps": chosen_logps.mean().item(),
        "rejected_logps": rejected_logps.mean().item(),
    }
    return loss, metrics | reward_metrics(beta * chosen_logps, beta * rejected_logps)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict]:
    """DPO's sigmoid loss from summed (B,) log-probs of the policy and the frozen reference.

    Returns the scalar loss and a dict of python floats: loss, chosen_logps, rejected_logps (the policy's),
    reward_chosen, reward_rejected, reward_margin, reward_accuracy (rewards are beta * (policy - ref)).
    """
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    logits = chosen_ratio - rejected_ratio  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    loss = losses.mean()
    metrics = {
        "loss": loss.item(),
        "chosen_logps": policy_chosen.mean().item(),
        "rejected_logps": policy_rejected.mean().item(),
    }
    return loss, metrics | reward_metrics(beta * chosen_ratio, beta * rejected_ratio)


def reward_metrics(reward_chosen: Tensor, reward_rejected: Tensor) -> dict:
    """Means of the (B,) implicit rewards, their margin, and the fraction of pairs ranked right."""
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    return {
        "reward_chosen": reward_chosen.mean().item(),
        "reward_rejected": reward_rejected.mean().item(),
        "reward_margin": (reward_chosen - reward_rejected).mean().item(),
        "reward_accuracy": (reward_chosen > reward_rejected).double().mean().item(),
    }


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

    Near 0, 1 - exp(x) cancels: -expm1(x) is exact there. Far below, exp(x) is tiny and log1p keeps its
    digits where log(1 - tiny) would round to 0. The branch point is -log 2, where both are accurate.
    """
    x = x.clamp(max=CERTAIN_LOGP)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
