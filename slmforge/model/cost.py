"""What one token mixer or FFN costs per token: parameters, FLOPs and saved activations (``LayerCost``).

Each entry of ``block.MIXERS`` / ``block.FFNS`` computes its own cost in a static ``cost(cfg, seq_len)`` beside
its module, from the same config the module is built from; ``plan.py`` adds the costs up over the layers and
``tests/model/test_mixer_table.py`` checks ``params`` against the instantiated module. Pure arithmetic: no torch.

FLOPs follow PaLM's MFU convention (Chowdhery et al. 2022, arXiv 2204.02311, appendix B): 2 forward FLOPs per
matmul weight per token, plus the work that grows with the context (attention scores, a scan within a chunk).
Activations are the bytes per token kept for the backward pass under bf16 autocast (Korthikanti et al. 2022,
arXiv 2205.05198).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayerCost:
    """What one mixer or FFN adds to a block, per token."""

    params: int
    matmul_params: int  # weights used in a matmul: 2 forward FLOPs per token each
    context_flops: float = 0.0  # forward FLOPs per token that grow with the context (scores and AV)
    context_flops_causal: float = 0.0
    activation_bytes: int = 0  # bytes per token kept for the backward pass (bf16)
    inactive_params: int = 0  # parameters a token does not use: the routed experts it is not sent to (MoE)

    def __add__(self, other: LayerCost) -> LayerCost:
        """Two parts of one layer side by side (Hymba's branches, a projection after a scan)."""
        return LayerCost(self.params + other.params, self.matmul_params + other.matmul_params,
                         self.context_flops + other.context_flops,
                         self.context_flops_causal + other.context_flops_causal,
                         self.activation_bytes + other.activation_bytes,
                         self.inactive_params + other.inactive_params)


def mean_keys(seq_len: int, window: int, causal: bool) -> float:
    """Keys each query attends to, averaged over a sequence of ``seq_len`` (``window`` 0 = no window)."""
    w = min(window, seq_len) if window else seq_len
    if not causal:
        return w
    # query i (1-based) sees min(i, w) keys
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
