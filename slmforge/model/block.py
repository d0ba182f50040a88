"""The residual block ``x + mixer(norm(x))``, then ``x + ffn(norm(x))``, and the choice of parts.

Token mixers and FFNs are picked per layer by name from the two tables below, so grep finds every option.
An entry is the whole mixer: its module, its cost and its decoding state side by side in one class; the
planner (``plan.py``) and ``info.py`` read the same table, so a new mixer is one file, one entry and one test
(``tests/model/test_mixer_table.py`` runs every entry). Add your own with ``MIXERS["mine"] = Mine``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.attention import Attention
from slmforge.model.dsa import DSA
from slmforge.model.ffn import SwiGLU
from slmforge.model.flexmoe import FlexMoE
from slmforge.model.hymba import Hymba
from slmforge.model.layers import RMSNorm
from slmforge.model.linear import GatedLinear
from slmforge.model.moe import MoE
from slmforge.model.ssm import SSM
from slmforge.registry import lookup

# A MIXERS entry is an nn.Module class with
#   __init__(cfg: ModelConfig)                        reads its options from cfg (cfg.attn, cfg.ssm, ...)
#   forward(x, cache=None) -> y                       (B, T, C) -> (B, T, C), causal; with a cache, T new tokens
#   init_cache(batch_size, max_len, device, dtype)    a cache with ``pos``, ``nbytes()``, ``left_pad(num_pad)`` and
#                                                     ``keep(rows)`` (model/cache.py); forward keeps left padding
#                                                     (``cache.pad_mask``) out of the real tokens' results
#   reset_parameters(std, out_std)                    out_std for the projection back into the residual stream
#   @staticmethod cost(cfg, seq_len) -> LayerCost     parameters, FLOPs and activations per token (model/cost.py)
#   @staticmethod state_bytes(cfg, tokens, nbytes) -> int   bytes of init_cache(1, tokens, ...) in that dtype
# A mixer with an auxiliary training loss sets ``self.aux_loss`` in forward (0.0 when none); the block adds it.
# An FFNS entry has the same __init__, reset_parameters and cost, and forward(x) -> (y, aux_loss).
# Options: a mixer with its own options adds an options dataclass to config.py and a ModelConfig field named
# like the mixer (cfg.attn, cfg.ssm, cfg.linear, cfg.hymba), since config.py is the torch-free ground floor and
# cannot import model files; a mixer reading only d_model and the like needs no config change.
MIXERS: dict[str, type[nn.Module]] = {"attn": Attention, "ssm": SSM, "linear": GatedLinear, "hymba": Hymba,
                                      "dsa": DSA}
FFNS: dict[str, type[nn.Module]] = {"dense": SwiGLU, "moe": MoE, "flexmoe": FlexMoE}


class Block(nn.Module):
    """One unique block. With ``own_ffn=False`` (``model.share_ffn``) it keeps its FFN norm but the FFN itself
    is the model's shared one, passed to ``forward``; a block repeated by ``model.block_repeat`` is simply
    called several times, each time with its own cache."""

    def __init__(self, cfg: ModelConfig, mixer: str, own_ffn: bool = True, ffn: str | None = None):
        super().__init__()
        self.kind = mixer
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = lookup(MIXERS, mixer, "token mixer (model.layers)")(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg, ffn) if own_ffn else None

    def reset_parameters(self, cfg: ModelConfig) -> None:
        self.mixer_norm.weight.data.fill_(1.0)
        self.ffn_norm.weight.data.fill_(1.0)
        self.mixer.reset_parameters(cfg.init_std, residual_out_std(cfg))
        if self.ffn is not None:
            self.ffn.reset_parameters(cfg.init_std, residual_out_std(cfg))

    def forward(self, x: torch.Tensor, cache=None, ffn: nn.Module | None = None,
                doc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | float]:
        # Only attention takes ``doc`` (LM.forward refuses it for the other mixers), so they keep their signature.
        mixed = self.mixer(self.mixer_norm(x), cache=cache) if doc is None else self.mixer(self.mixer_norm(x), doc=doc)
        x = x + mixed
        ffn = self.ffn if ffn is None else ffn
        # An FFN whose routing reads the sequence so far (FlexMoE's context routing) keeps its state on the cache.
        y, aux = ffn(self.ffn_norm(x), cache=cache) if getattr(ffn, "takes_cache", False) else ffn(self.ffn_norm(x))
        # A mixer with a training loss of its own (DSA's indexer KL) leaves it in ``aux_loss`` after each forward.
        return x + y, aux + getattr(self.mixer, "aux_loss", 0.0)


def build_ffn(cfg: ModelConfig, kind: str | None = None) -> nn.Module:
    """The FFN named ``kind`` (default ``cfg.ffn``, a single name when the FFN is shared)."""
    return lookup(FFNS, kind or cfg.ffn, "FFN (model.ffn)")(cfg)


def residual_out_std(cfg: ModelConfig) -> float:
    # Residual-output projections are scaled down by depth (layer applications, shared or not) so the residual
    # stream's variance stays O(1) at init (GPT-2, arXiv 2005.14165 sec. 2.3).
    return cfg.init_std / math.sqrt(2 * cfg.num_layers)


def check_model(cfg: ModelConfig) -> None:
    """Raise a one-line ValueError (with did-you-mean) for an unknown mixer in ``model.layers`` or FFN in
    ``model.ffn``; callers run it as soon as a config is loaded, before any work starts."""
    if not [p for p in cfg.layers.split(",") if p.strip()]:
        raise ValueError("model.layers is empty; give a comma-separated pattern of token mixers, e.g. attn,ssm")
    for kind in dict.fromkeys(p.strip() for p in cfg.layers.split(",") if p.strip()):
        lookup(MIXERS, kind, "token mixer in model.layers")
    ffns = [p.strip() for p in cfg.ffn.split(",") if p.strip()]
    if not ffns:
        raise ValueError("model.ffn is empty; give an FFN (dense, moe) or a comma-separated pattern, e.g. dense,moe")
    for kind in dict.fromkeys(ffns):
        lookup(FFNS, kind, "FFN in model.ffn")
