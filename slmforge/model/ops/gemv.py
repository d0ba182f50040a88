"""A compiled (numba) float32 matmul for a few rows against a large weight: the batch-1..8 decoding step.

Decoding multiplies a handful of activation rows by every weight matrix, so a step reads all the weights
once and does little arithmetic with them: its speed is the memory bandwidth the matmul reaches. On a 2-core
Zen 4, with the 121 weight matrices of a SmolLM2-135M-shaped step (537 MB, far beyond the caches), oneDNN's
GEMV streams them at about 36 GB/s (15 ms, with the weights pre-blocked) and MKL's at about 17; this loop,
output rows split over the threads and a vectorised dot product each, at about 43 GB/s (12.5 ms). From 4 rows
on, pre-blocked oneDNN wins there (``ops/cpu.py`` has the table); on other CPUs the order differs, so
``ops/choice.py`` measures it, with this loop a candidate up to MAX_ROWS rows. ``F.linear`` is the reference;
``tests/model/test_speed_paths.py`` compares them. Float32 sums in another order: about 1e-6 relative.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
import torch.nn.functional as F

# The most rows this loop is tried for: one dot product per (row, output), no register blocking, so beyond a few
# rows a GEMM wins.
MAX_ROWS = 8
# numba's "workqueue" threading layer (its fallback where OpenMP is missing) must not run two parallel kernels
# at once; decoding runs on one thread, but a lock costs nothing next to a matmul.
_LOCK = threading.Lock()


@numba.njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rows_times_weight_t(x, w, out):
    """out[m, r] = sum_c x[m, c] * w[r, c]; x: (M, I), w: (O, I), out: (M, O), float32, M small."""
    rows, cols = x.shape
    for r in numba.prange(w.shape[0]):
        for m in range(rows):
            acc = np.float32(0.0)
            for c in range(cols):
                acc += x[m, c] * w[r, c]
            out[m, r] = acc


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and weight.is_contiguous()
            and x.numel() <= MAX_ROWS * x.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``small_linear`` where it is usable, else ``F.linear``."""
    return small_linear(x, weight) if usable(x, weight) else F.linear(x, weight)


def small_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for float32 CPU x with at most MAX_ROWS rows: (..., I) @ (O, I)^T -> (..., O)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
    with _LOCK:
        _rows_times_weight_t(rows.numpy(), weight.detach().numpy(), out.numpy())
    return out.view(*x.shape[:-1], weight.shape[0])
