"""Small building blocks shared by mixers and FFNs: linear, RMSNorm, rotary embeddings, the loss, initialisation.

``linear``, ``RMSNorm`` and ``cross_entropy`` choose between a CPU fast path (``ops/cpu.py``, ``ops/gemv.py``;
for ``linear`` by measurement, ``ops/choice.py``) and the plain reference beside them here (``F.linear``,
``rms_norm_ref``, ``cross_entropy_ref``; compared in ``tests/model/test_speed_paths.py``). RMSNorm: Zhang & Sennrich 2019 (arXiv 1910.07467). RoPE: Su et al. 2021 (arXiv 2104.09864).
Shapes: B batch, T time, H heads, D head dim, I/O in/out features, N rows, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config.model import AttnConfig
from slmforge.model.ops import choice, cpu


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (the reference), except float32 on CPU, which takes the kernel measured fastest
    on this machine for its path (``ops/choice.py``: oneDNN, the numba GEMV loop or ``F.linear`` itself).

    torch's CPU float32 matmul calls MKL's sgemm, which on AMD CPUs runs AVX2 code; oneDNN uses AVX-512
    where the CPU has it: 2x on the block matmuls and about 1.5x on a whole float32 training step of the 10m
    preset on a Zen 5 CPU, but 17% slower on an AVX2-only Zen 3. bf16 autocast already reaches oneDNN through
    ``F.linear``.
    """
    if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            if choice.train_kernel() == "onednn":
                return cpu.linear_onednn(x, weight)
        else:
            return choice.inference_kernel(x.numel() // max(x.shape[-1], 1), weight)(x, weight)
    return F.linear(x, weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            if not torch.is_grad_enabled():  # inference: the same numbers without autograd.Function's overhead
                return cpu.rms_norm_cpu(x, self.weight, self.eps)[0]
            return cpu.RMSNormCPU.apply(x, self.weight, self.eps)
        # F.rms_norm dispatches to one fused kernel where the backend has one.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain reference for RMSNorm, computed in float32 (float64 stays float64)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None, scale: AttnConfig | None = None,
                original_len: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim // 2), in float32.

    ``scale`` (an ``AttnConfig``) extends the context by ``rope_factor`` over ``original_len`` tokens:
    ``linear`` divides every frequency by the factor (position interpolation, arXiv 2306.15595); ``ntk`` raises
    the base to theta * factor^(D / (D - 2)), so the lowest frequency is interpolated and the highest kept; ``yarn``
    (arXiv 2309.00071) keeps the frequencies that turn more than ``yarn_beta_fast`` times in the original context,
    interpolates those turning fewer than ``yarn_beta_slow`` times, ramps linearly between, and scales the logits'
    temperature by (0.1 ln factor + 1)^2 through cos and sin. Factor 1 is no scaling in every mode.
    """
    dims = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    kind, factor = (scale.rope_scaling, scale.rope_factor) if scale is not None else ("none", 1.0)
    if kind == "ntk":
        theta = theta * factor ** (head_dim / max(head_dim - 2, 1))
    inv_freq = 1.0 / (theta ** dims)  # (D/2,)
    mscale = 1.0
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "yarn":
        turns = original_len * inv_freq / (2 * math.pi)  # rotations of each pair over the original context
        keep = ((turns - scale.yarn_beta_slow) / max(scale.yarn_beta_fast - scale.yarn_beta_slow, 1e-6)).clamp(0, 1)
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
        mscale = 0.1 * math.log(factor) + 1.0
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos() * mscale, angles.sin() * mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) by position angles ("rotate half", as in Llama/HF).

    x: (B, H, T, D) with cos, sin: (T, D/2), or x: (B, T, H, D) with cos, sin: (T, 1, D/2).
    As ``x * [cos, cos] + [x2, x1] * [-sin, sin]``: three full-size passes instead of six (up to 1.8x faster
    forward + backward on CPU), the same numbers as ``apply_rope_ref``.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * torch.cat((cos, cos), dim=-1) + torch.cat((x2, x1), dim=-1) * torch.cat((-sin, sin), dim=-1)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain reference for ``apply_rope``: rotate each pair (x1, x2) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) targets, log-softmax in float32 whatever the logits' dtype."""
    if torch.compiler.is_compiling():
        # Inductor fuses the plain version into a few passes; it would unroll the loop over blocks instead.
        return cross_entropy_ref(logits, targets, ignore_index)
    return cpu.ChunkedCrossEntropy.apply(logits, targets, ignore_index)


def cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Plain reference: one float32 (or float64) copy of all logits, then ``F.cross_entropy``."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index)


def init_linear(module: nn.Linear, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
