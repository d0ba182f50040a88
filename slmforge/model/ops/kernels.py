"""Optional GPU kernels for the chunked scans: mamba-ssm's SSD and flash-linear-attention's chunked GLA.

``ssd_scan`` and ``gla_scan`` are what the SSM and linear-attention mixers call for training and prefill. On CUDA,
when the package imports (``pip install mamba-ssm`` / ``flash-linear-attention``; both need a GPU build of torch
and Triton) and ``model.fast_kernels`` is on, they hand the work to its fused Triton kernel; everywhere else,
and always on CPU, they run our PyTorch ``ssd_chunked`` / ``gla_chunked``. Only the layout differs between the
two sides, so that conversion is the code here. The kernels' signatures are the packages' public ones:
  mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, initial_states=...,
      return_final_states=True): x (b, T, H, P), dt (b, T, H), A (H,), B and C (b, T, G, N) with G groups
  fla.ops.gla.chunk_gla(q, k, v, g, scale=..., initial_state=..., output_final_state=True): q, k, g (b, T, H, K),
      v (b, T, H, V), g the log decays, state (b, H, K, V)
Tests check the conversion on CPU against fakes with those signatures built on our references
(``tests/model/test_kernels.py``), and the real kernels against ``ssd_ref`` / ``gla_ref`` where a GPU and the
packages are present (marked ``gpu``).
"""

from __future__ import annotations

import functools
import importlib

import torch

from slmforge.model.ops.scan import gla_chunked, ssd_chunked


@functools.cache
def _load(module: str, name: str):
    """The kernel function, or None when its package is missing or fails to load (no CUDA build, other torch)."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # ImportError, and the OSError/RuntimeError a broken CUDA extension raises
        return None


def ssd_kernel():
    return _load("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def gla_kernel():
    return _load("fla.ops.gla", "chunk_gla")


def _usable(x: torch.Tensor, enabled: bool) -> bool:
    # float64 is for the equivalence tests; the kernels take 16- and 32-bit floats.
    return enabled and x.is_cuda and x.dtype != torch.float64


def ssd_scan(x, dt, A, B, C, chunk_size: int, initial_state=None, fast: bool = True):
    """``ssd_chunked``'s arguments and results (y (b, T, H, P), final state (b, H, P, N) in float32 at least)."""
    kernel = ssd_kernel() if _usable(x, fast) else None
    if kernel is None:
        return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state)
    y, state = kernel(x.contiguous(), dt.contiguous(), A, B.unsqueeze(2).contiguous(), C.unsqueeze(2).contiguous(),
                      chunk_size, initial_states=initial_state, return_final_states=True)
    return y, state.to(torch.promote_types(state.dtype, torch.float32))


def gla_scan(q, k, v, g, chunk_size: int, initial_state=None, fast: bool = True):
    """``gla_chunked``'s arguments and results (o (b, H, T, V), final state (b, H, K, V)); scale K^-1/2."""
    kernel = gla_kernel() if _usable(q, fast) else None
    if kernel is None:
        return gla_chunked(q, k, v, g, chunk_size, initial_state=initial_state)
    q, k, v, g = (u.transpose(1, 2).contiguous() for u in (q, k, v, g))  # (b, T, H, .)
    o, state = kernel(q, k, v, g, scale=q.shape[-1] ** -0.5, initial_state=initial_state, output_final_state=True)
    return o.transpose(1, 2), state.to(torch.promote_types(state.dtype, torch.float32))
