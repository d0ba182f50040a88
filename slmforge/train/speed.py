"""What the training loop needs to know about the device's speed: the FLOP/s that MFU is measured against, and
the dtype that ``train.dtype`` resolves to, with the bf16 guard for CPUs without native bf16.

MFU is model FLOPs per second (``plan.flops_per_token`` x tokens/s, PaLM's convention) over one device's peak. On
a GPU the peak is its dense bf16 tensor-core figure from ``plan.GPUS`` (no MFU for a GPU not in the table). A CPU
has no published peak worth the name, so there MFU is against the float32 GEMM ceiling that torch reaches on this
machine at its thread count (``machine.gemm_ceiling``: the best of torch's default BLAS and oneDNN, measured once
and cached): 80% on a CPU means the model's FLOPs run at 80% of a large float32 matmul's speed, the same ceiling
``benchmarks/train_throughput.py`` prints.

bf16 on a CPU without native bf16 (x86 without AVX512_BF16 or AMX, such as Zen 3, or any CPU under
``SLMFORGE_CPU_ISA=avx2``) is emulated, several to 30x slower than float32. ``train.dtype=bf16`` there warns once
with the slowdown measured on this machine; ``auto`` is float32 on every CPU (bf16 on a CPU is opt-in).
"""

from __future__ import annotations

import functools
import sys

import torch

from slmforge.model.ops import machine
from slmforge.plan import GPUS


def peak_flops(device: torch.device) -> float | None:
    """One device's FLOP/s for MFU: the GPU's dense bf16 peak, the CPU's measured float32 GEMM ceiling; None where
    neither is known. Measure it before seeding: the first call on a machine takes about a second."""
    if device.type == "cpu":
        return machine.gemm_ceiling()
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((spec.peak_flops for key, spec in GPUS.items() if key in name), None)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. 'auto' is bf16 on GPU and fp32 on CPU (bf16 on CPU is opt-in); 'bf16' on a CPU
    without native bf16 warns once (``warn_slow_bf16``)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "bf16" and device.type == "cpu" and not machine.native_bf16():
        warn_slow_bf16()
    return {"fp32": None, "bf16": torch.bfloat16}[name]


@functools.cache
def warn_slow_bf16() -> None:
    """One line on stderr, once per process: bf16 is emulated on this CPU, how much slower it measured, what to
    use instead."""
    print(f"[slmforge] warning: train.dtype=bf16 on a CPU without native bf16 (no AVX512_BF16 or AMX): a bf16 "
          f"matmul takes {bf16_slowdown():.1f}x the float32 time here; set train.dtype=fp32 (or auto: fp32 on CPU)",
          file=sys.stderr, flush=True)


def bf16_slowdown() -> float:
    """How many times longer a training-shaped bf16 matmul (512 x 256 by 256 x 256) takes than in float32 on this
    CPU: measured once (about 0.3 s) and cached."""
    return machine.cached("bf16_slowdown", machine.machine_key(), _measure_bf16_slowdown)


def _measure_bf16_slowdown() -> float:
    # On one thread: a ratio of two kernels does not depend on the thread count, and one thread is not thrown off
    # by other processes descheduling a thread team. A private generator leaves the global RNG as it was.
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 256, generator=gen), torch.randn(256, 256, generator=gen)
    x16, w16 = x.bfloat16(), w.bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = machine.time_call(lambda: torch.nn.functional.linear(x, w), min_seconds=0.02)
        bf16 = machine.time_call(lambda: torch.nn.functional.linear(x16, w16), min_seconds=0.02)
    finally:
        torch.set_num_threads(threads)
    return bf16 / fp32
