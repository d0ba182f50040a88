"""FlexOlmo's FFN: the base model's FFN (the anchor expert) plus one expert FFN per data source, domain-routed.

FlexOlmo (Shi et al. 2025, arXiv 2507.07024): every data owner trains an expert FFN of the base FFN's size on its
own data, coupled to the frozen base FFN in a 2-expert MoE, so that independently trained experts stay compatible;
the merged model stacks the anchor and all experts behind one router whose rows are the experts' router embeddings
(built from each domain's data, ``slmforge/post/flex.py``). Opting a source out deletes its expert and its router
row; nothing is retrained.

Routing per token: logits ``x @ [r_anchor; r_1 .. r_N]^T + [b_anchor; b_1 .. b_N]``, the ``top_k`` highest (all
when 0 or more than the experts), their softmax as gate weights; the chosen experts run through
``moe.moe_dispatch`` (``moe_reference`` beside it). The anchor and the expert rows are separate parameters, so
expert training freezes the anchor and its router row by ``requires_grad`` alone. With no experts the layer is the
anchor SwiGLU itself, bit for bit. The biases ``b`` (``router_anchor_bias``, ``router_experts_bias``; zero: plain
dot routing) let the router be a nearest-centroid classifier: rows ``m`` (domain means) and biases ``-|m|^2 / 2``
give ``argmax x.m - |m|^2/2 = argmin |x - m|``, so a domain whose mean hidden state has the larger norm does not
win every token (``post/flex.py``: ``router_row``, also its whitened form).

Context routing (``model.flexmoe.router_input=context``, default): a document's domain is a property of the
document, and one token's hidden state tells it poorly, so the router reads the causal running mean of the layer's
FFN inputs over the sequence so far, ``(x_1 + .. + x_t + k m0) / (t + k)``, started with ``k`` (``context_prior``)
pseudo-tokens of the public data's mean ``m0`` (``router_prior``, a base-side row): a sequence's first tokens go
to the anchor until the context outweighs the prior. The rows stay the domain means, so opt-out is still deleting
a row. Causal, so decoding can continue it: ``forward(x, cache)`` keeps each row's running sum and count on the
layer's cache (``ffn_state``, which ``Cache.keep`` trims with the rows), skipping left-padded slots, and cached chunks route as the full sequence would.

Shapes: B batch, T time, C d_model, N tokens (B*T), S expert FFNs (sources), E = S + 1 with the anchor, H ffn_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cost import LayerCost
from slmforge.model.ffn import SwiGLU
from slmforge.model.layers import linear
from slmforge.model.moe import moe_dispatch, moe_reference


def flex_sources(cfg: ModelConfig) -> list[str]:
    """The expert names of ``model.flexmoe.sources``, in router order."""
    return [s.strip() for s in cfg.flexmoe.sources.split(",") if s.strip()]


def active_experts(cfg: ModelConfig) -> int:
    """Experts a token runs through: ``top_k`` of anchor + sources (all when top_k is 0 or larger)."""
    e = len(flex_sources(cfg)) + 1
    return e if cfg.flexmoe.top_k <= 0 else min(cfg.flexmoe.top_k, e)


class FlexMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, h = cfg.d_model, cfg.ffn_dim
        self.sources = flex_sources(cfg)
        s = len(self.sources)
        self.top_k = active_experts(cfg)
        self.router_input, self.context_prior = cfg.flexmoe.router_input, cfg.flexmoe.context_prior
        self.anchor = SwiGLU(cfg)  # the base FFN: blocks.i.ffn.anchor.* holds the base's blocks.i.ffn.*
        self.w13 = nn.Parameter(torch.empty(s, c, 2 * h))  # per expert: gate (w1) then up (w3) columns, as moe.py
        self.w2 = nn.Parameter(torch.empty(s, h, c))
        self.router_anchor = nn.Parameter(torch.empty(1, c))
        self.router_experts = nn.Parameter(torch.empty(s, c))
        self.router_anchor_bias = nn.Parameter(torch.zeros(1))
        self.router_experts_bias = nn.Parameter(torch.zeros(s))
        self.router_prior = nn.Parameter(torch.zeros(1, c))  # the public data's mean FFN input (context routing)
        self.reference = False  # True: moe_reference instead of moe_dispatch (tests)

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.anchor.reset_parameters(std, out_std)
        nn.init.normal_(self.w13, mean=0.0, std=std)
        nn.init.normal_(self.w2, mean=0.0, std=out_std)
        nn.init.normal_(self.router_anchor, mean=0.0, std=std)
        nn.init.normal_(self.router_experts, mean=0.0, std=std)
        nn.init.zeros_(self.router_anchor_bias)
        nn.init.zeros_(self.router_experts_bias)
        nn.init.zeros_(self.router_prior)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C) -> (N, E) router logits, at least float32; column 0 is the anchor."""
        logits = linear(x.to(self.router_anchor.dtype), torch.cat([self.router_anchor, self.router_experts]))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return logits + torch.cat([self.router_anchor_bias, self.router_experts_bias]).to(logits.dtype)

    def context(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        """x (B, T, C) -> (B*T, C) float32: the router's input, the token itself (``router_input=token``) or the
        running mean of the sequence's FFN inputs up to each token, ``context_prior`` pseudo-tokens of
        ``router_prior`` first; with ``cache``, continued from (and advancing) its running sums."""
        b, t, c = x.shape
        if self.router_input == "token":
            return x.reshape(-1, c)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        real = _real_slots(cache, b, t, x.device)  # (B, T) bool, False on left padding; None: all real
        if real is not None:
            xf = xf * real[..., None]
        counts = (real.to(xf.dtype) if real is not None else xf.new_ones(b, t)).cumsum(1)
        sums = xf.cumsum(1)
        state = getattr(cache, "ffn_state", None) if cache is not None else None
        if state is not None:
            sums, counts = sums + state[0][:, None], counts + state[1][:, None]
        if cache is not None:
            cache.ffn_state = (sums[:, -1], counts[:, -1])
        k = self.context_prior
        mean = (sums + k * self.router_prior.to(xf.dtype)) / (counts + k).clamp_min(1e-6)[..., None]
        return mean.reshape(-1, c)

    def route(self, x: torch.Tensor, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> chosen experts (B*T, K) (0 is the anchor) and their softmax gate weights (B*T, K), float32;
        the router reads ``context(x, cache)``."""
        logits = self.router_logits(self.context(x, cache))
        top = logits.topk(self.top_k, dim=-1)
        return top.indices, top.values.softmax(-1)

    @property
    def takes_cache(self) -> bool:
        """Context routing continues across decoding steps: the block passes this FFN its layer's cache."""
        return self.router_input == "context" and bool(self.sources)

    def forward(self, x: torch.Tensor, cache=None) -> tuple[torch.Tensor, torch.Tensor | float]:
        if not self.sources:
            return self.anchor(x)
        b, t, c = x.shape
        flat = x.reshape(-1, c)
        chosen, weights = self.route(x, cache)
        # The anchor as expert 0 of the stacked weights: SwiGLU's (2H, C) and (C, H) matrices transposed.
        w13 = torch.cat([self.anchor.w13.weight.t()[None], self.w13])  # (E, C, 2H)
        w2 = torch.cat([self.anchor.w2.weight.t()[None], self.w2])  # (E, H, C)
        y = (moe_reference if self.reference else moe_dispatch)(flat, chosen, weights, w13, w2)
        return y.view(b, t, c), 0.0

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        """All experts' parameters; a token's matmuls use the router and ``active_experts`` SwiGLUs."""
        c, h, e, k = cfg.d_model, cfg.ffn_dim, len(flex_sources(cfg)) + 1, active_experts(cfg)
        expert = 3 * c * h
        router = e * (c + 1) + c  # rows and biases, and the public prior row
        params, active = router + e * expert, router + k * expert
        if e == 1:  # the anchor alone: a plain SwiGLU, no router in the forward
            return LayerCost(params, expert, activation_bytes=2 * (c + 4 * h), inactive_params=router)
        # Saved: the normed input, the router logits (fp32), per chosen copy the gathered input, gate/up outputs,
        # silu and product, and the expert output.
        saved = 2 * c + 4 * e + 2 * k * (2 * c + 4 * h)
        return LayerCost(params, active, activation_bytes=saved, inactive_params=params - active)


def _real_slots(cache, b: int, t: int, device) -> torch.Tensor | None:
    """(B, T) bool, True where the ``t`` new slots hold real tokens (not left padding); None when all do. The block's
    mixer has already written them, so they are the cache's last ``t`` slots."""
    if cache is None or getattr(cache, "num_pad", None) is None or cache.pos - t >= cache.max_pad:
        return None
    slots = torch.arange(cache.pos - t, cache.pos, device=device)
    return slots[None, :] >= cache.num_pad.to(device)[:, None]
