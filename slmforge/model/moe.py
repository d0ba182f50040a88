"""A DeepSeekMoE feed-forward layer: fine-grained routed experts, always-on shared experts, aux-loss-free balancing.

DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066): many small SwiGLU experts (``expert_hidden`` units each), of which
a router picks ``top_k`` per token, plus ``num_shared`` experts every token goes through (stored as one SwiGLU of
``num_shared * expert_hidden`` units: the same function as separate experts summed). Gates: ``softmax`` over all
experts, the chosen ones' probabilities as weights (DeepSeekMoE, V2); ``sigmoid`` scores, the chosen ones'
normalised to sum to 1 (DeepSeek-V3, arXiv 2412.19437, eq. 13).

Balancing without an auxiliary loss (V3 sec. 2.1.2): a per-expert bias ``expert_bias`` is added to the scores for
the top-k *selection* only (the weights come from the unbiased scores). Training-mode forwards count the tokens
each expert receives; ``after_step(model)``, called by the training loop once per optimizer step, moves each bias by
``bias_update_rate * sign(mean_load - load_i)`` outside autograd and returns the load statistics to log. Under
DDP/FSDP the loop passes ``torch.distributed.all_reduce`` so every rank sums the loads of all ranks and keeps the
same bias. (Activation checkpointing counts a recomputed forward twice; the update and the statistics depend only
on the loads' proportions, which stay the same.) An optional sequence-wise balance loss (V3 eq. 17-20) is the
layer's ``aux_loss``, added to the LM loss in training mode only.

Dispatch is dropless: the (token, expert) assignments are sorted by expert, the tokens gathered, each expert runs
one matmul over its contiguous slice, and the weighted outputs are scatter-added back (``moe_dispatch``); no
token is dropped, whatever the imbalance. ``moe_reference`` is the plain loop over experts on every token that the
tests compare it with. Routed weights are stacked, ``w13`` (E, C, 2H) and ``w2`` (E, H, C), so FSDP2 shards them
like any weight. Expert parallelism (experts on different GPUs, tokens exchanged by all-to-all) is left for GPU
clusters: at this toolkit's sizes (at most 1B parameters, <= 8 GPUs) all experts fit on every GPU and FSDP2 already
shards their storage; an all-to-all per layer would cost more than the matmuls it spreads.

Shapes: B batch, T time, C d_model, N tokens (B*T), E routed experts, K top_k, H expert hidden units.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cost import LayerCost
from slmforge.model.ffn import SwiGLU
from slmforge.model.layers import linear


def expert_hidden(cfg: ModelConfig) -> int:
    """Hidden units per expert: ``moe.expert_hidden``, or the dense FFN's split over the active experts."""
    m = cfg.moe
    return m.expert_hidden or max(1, cfg.ffn_dim // (m.top_k + m.num_shared))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, c = cfg.moe, cfg.d_model
        self.num_experts, self.top_k, self.gate = m.num_experts, m.top_k, m.gate
        self.rate, self.seq_aux_loss = m.bias_update_rate, m.seq_aux_loss
        self.hidden = h = expert_hidden(cfg)
        self.router = nn.Linear(c, m.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(m.num_experts, c, 2 * h))  # per expert: gate (w1) then up (w3) columns
        self.w2 = nn.Parameter(torch.empty(m.num_experts, h, c))
        self.shared = SwiGLU(dataclasses.replace(cfg, ffn_hidden=m.num_shared * h)) if m.num_shared else None
        self.register_buffer("expert_bias", torch.zeros(m.num_experts))  # selection only; saved in checkpoints
        self.reference = False  # True: moe_reference instead of moe_dispatch (tests)
        self._load: torch.Tensor | None = None  # tokens per expert since the last after_step (not a buffer: DDP
        # would overwrite it with rank 0's at every forward)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.w13, mean=0.0, std=std)
        nn.init.normal_(self.w2, mean=0.0, std=out_std)
        self.expert_bias.zero_()
        if self.shared is not None:
            self.shared.reset_parameters(std, out_std)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> scores (N, E) in at least float32, chosen experts (N, K), their gate weights (N, K)."""
        logits = linear(x, self.router.weight)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores = logits.softmax(-1) if self.gate == "softmax" else logits.sigmoid()
        chosen = (scores.detach() + self.expert_bias.to(scores.dtype)).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.gate == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True)
        return scores, chosen, weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        b, t, c = x.shape
        flat = x.reshape(-1, c)
        scores, chosen, weights = self.route(flat)
        y = (moe_reference if self.reference else moe_dispatch)(flat, chosen, weights, self.w13, self.w2)
        if self.shared is not None:
            y = y + self.shared(flat)[0]
        aux: torch.Tensor | float = 0.0
        if self.training:
            self._count(chosen)
            if self.seq_aux_loss:
                aux = self.seq_aux_loss * seq_balance_loss(scores.view(b, t, -1), chosen.view(b, t, -1))
        return y.view(b, t, c), aux

    @torch.no_grad()
    def _count(self, chosen: torch.Tensor) -> None:
        load = torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
        self._load = load if self._load is None else self._load + load

    @torch.no_grad()
    def after_step(self, all_reduce: Callable[[torch.Tensor], object] | None = None) -> dict[str, float]:
        """Update the selection bias from the load counted since the last call; the load's max/mean and entropy
        (divided by log E: 1 is uniform). ``all_reduce`` sums a tensor over ranks in place. {} if nothing ran."""
        if self._load is None:
            return {}
        load, self._load = self._load, None
        if all_reduce is not None:
            all_reduce(load)
        load = load.double()
        mean = load.mean()
        if self.rate:
            self.expert_bias += (self.rate * torch.sign(mean - load)).to(self.expert_bias.dtype)
        p = load / load.sum().clamp_min(1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum() / math.log(max(self.num_experts, 2))
        return {"max_mean": (load.max() / mean.clamp_min(1e-30)).item(), "entropy": entropy.item()}

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        """All experts' parameters; a token's matmuls use the router, the shared experts and top_k routed ones."""
        m, c, h = cfg.moe, cfg.d_model, expert_hidden(cfg)
        expert = 3 * c * h
        params = m.num_experts * c + (m.num_experts + m.num_shared) * expert
        active = m.num_experts * c + (m.top_k + m.num_shared) * expert
        # Saved: the normed input, router scores (fp32), the shared SwiGLU's tensors, and per routed copy the
        # gathered input, its gate/up outputs, silu and product, and the expert output.
        saved = 2 * (c + 4 * m.num_shared * h) + 4 * m.num_experts + 2 * m.top_k * (2 * c + 4 * h)
        return LayerCost(params, active, activation_bytes=saved, inactive_params=params - active)


def _expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: x (n, C), w13 (C, 2H), w2 (H, C) -> (n, C)."""
    gate, up = (x @ w13).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2


def moe_dispatch(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    """Dropless routed output: sum over k of weights[n, k] * expert_{chosen[n, k]}(x[n]), one matmul per expert.

    The N*K assignments are sorted by expert (stable: token order within an expert), the tokens gathered into
    one contiguous slice per expert, each slice run through its expert, weighted, and added back per token.
    """
    n, k = chosen.shape
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()  # one host sync per layer
    token = order // k
    gathered = x[token]
    outs, start = [], 0
    for e, count in enumerate(counts):
        if count:
            outs.append(_expert(gathered[start : start + count], w13[e], w2[e]))
        start += count
    ys = torch.cat(outs) * weights.reshape(-1)[order, None].to(outs[0].dtype)
    return torch.zeros(n, x.shape[1], dtype=ys.dtype, device=x.device).index_add(0, token, ys)


def moe_reference(x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor) -> torch.Tensor:
    """Plain reference of ``moe_dispatch``: every expert on every token, weighted by its gate (0 where not chosen)."""
    out = 0
    for e in range(w13.shape[0]):
        gate = (weights * (chosen == e)).sum(-1, keepdim=True)  # (N, 1)
        out = out + gate.to(x.dtype) * _expert(x, w13[e], w2[e])
    return out


def seq_balance_loss(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, averaged over sequences (weight applied by caller).

    scores (B, T, E), chosen (B, T, K): f_i = E / (K T) * (tokens of the sequence sent to i), P_i the mean over
    the sequence of the scores normalised to sum to 1 per token. Balanced routing gives 1.
    """
    b, t, e = scores.shape
    k = chosen.shape[-1]
    sent = torch.zeros(b, e, device=scores.device, dtype=scores.dtype).scatter_add_(
        1, chosen.reshape(b, -1), torch.ones(b, t * k, device=scores.device, dtype=scores.dtype))
    f = sent * e / (k * t)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(label, layer) of every MoE in ``model``: ``block3`` for ``blocks.3.ffn``, ``shared`` for a shared FFN."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            parts = name.split(".")
            found.append((f"block{parts[1]}" if parts[0] == "blocks" else "shared", module))
    return found


def after_step(model: nn.Module, all_reduce: Callable[[torch.Tensor], object] | None = None) -> dict[str, float]:
    """The training loop's one MoE hook, once per optimizer step: every MoE layer updates its selection bias from
    the load it counted (summed over ranks by ``all_reduce``); returns metrics ``moe_max_mean_<label>`` and
    ``moe_entropy_<label>`` per layer and ``moe_max_mean``, the worst layer's. {} for a model without MoE."""
    out: dict[str, float] = {}
    for label, layer in moe_layers(model):
        stats = layer.after_step(all_reduce)
        for key, value in stats.items():
            out[f"moe_{key}_{label}"] = value
    worst = [v for k, v in out.items() if k.startswith("moe_max_mean_")]
    if worst:
        out["moe_max_mean"] = max(worst)
    return out
