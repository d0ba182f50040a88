"""What this CPU is and what it measures: ISA flags, native bf16, the float32 GEMM ceiling, and a small cache of
measurements keyed by the machine.

Speed paths are chosen by measurement, never by the CPU's name: the same oneDNN routing that wins on an AVX-512
Zen 4 loses 17% on an AVX2 Zen 3, and bf16 is 30x slower than float32 without native bf16. A measurement
takes a few hundred milliseconds, so it is made once per machine and kept in ``cache_dir()`` (a JSON file per
measurement) under a key of CPU model, ISA flags, thread count and torch version: another machine, another
thread count or another torch measures again.

``SLMFORGE_CPU_ISA=avx2`` is the project's switch to behave as an AVX2-only CPU: ``slmforge/__init__.py`` then
sets ``ONEDNN_MAX_CPU_ISA=AVX2`` and ``MKL_ENABLE_INSTRUCTIONS=AVX2`` before torch loads, and
``cpu_flags`` leaves out every AVX-512 and AMX flag, so that bf16 counts as not native and measurements are keyed
apart. Benchmarks use it to report figures "with AVX-512 hidden".
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

ISA_ENV = "SLMFORGE_CPU_ISA"
CACHE_ENV = "SLMFORGE_CACHE_DIR"
# The flags that decide speed paths; the cache key keeps only these, so an unrelated flag does not re-measure.
KEY_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
             "amx_tile", "amx_int8", "asimd", "sve", "bf16")


def avx512_hidden() -> bool:
    return os.environ.get(ISA_ENV, "").lower() == "avx2"


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); {} elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("cpu model") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's ISA flags (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_bf16``, ...); without /proc/cpuinfo, what
    torch reports (``avx2`` or ``avx512f``). AVX-512 and AMX are left out under ``SLMFORGE_CPU_ISA=avx2``."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("features") or "").split())
    if not flags:
        import torch

        capability = torch.backends.cpu.get_cpu_capability().lower()  # "avx2", "avx512", "default", ...
        flags = {"avx2", "fma"} | ({"avx512f"} if capability.startswith("avx512") else set())
    if avx512_hidden():
        flags = {f for f in flags if not f.startswith(("avx512", "amx"))}
    return frozenset(flags)


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively (x86: AVX512_BF16 or AMX; Arm: the BF16 extension)."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


def machine_key(threads: int | None = None) -> dict[str, Any]:
    """What a CPU measurement depends on: CPU model, the speed-relevant ISA flags, threads, torch version."""
    import torch

    return {"cpu": cpu_model(), "flags": sorted(set(KEY_FLAGS) & cpu_flags()),
            "threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "isa_env": os.environ.get(ISA_ENV, "")}


def cache_dir() -> Path:
    """``$SLMFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/slmforge``, else ``~/.cache/slmforge``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "slmforge"


def _cache_path(name: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{name}-{digest}.json"


def cached(name: str, key: dict[str, Any], measure: Callable[[], Any]) -> Any:
    """``measure()``'s JSON-able result, kept in ``cache_dir()/<name>-<hash of key>.json`` and reused while ``key``
    is the same. The hash in the name lets machines that share a home folder (a cluster's nodes, a benchmark run
    with AVX-512 hidden beside a native one) keep their own measurements instead of replacing each other's.

    A cache that cannot be read or written (a read-only home, a damaged file) is measured again, never an error.
    """
    path = _cache_path(name, key)
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    value = measure()
    store(name, key, value)
    return value


def store(name: str, key: dict[str, Any], value: Any) -> None:
    """Write ``value`` as ``cached``'s entry for (name, key), atomically; an unwritable cache is left alone."""
    path = _cache_path(name, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "value": value, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}))
        os.replace(tmp, path)
    except OSError:
        pass


def time_call(fn: Callable[[], Any], min_seconds: float = 0.05, repeats: int = 3) -> float:
    """The best of ``repeats`` mean times of ``fn()``, each over at least ``min_seconds`` (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_seconds or calls == 0:
            fn()
            calls += 1
        best = min(best, elapsed / calls)
    return best


def gemm_flops(size: int = 1024) -> float:
    """The float32 FLOP/s of a square ``size`` matmul, the best of torch's default (``torch.mm``) and oneDNN's
    (``mkldnn._linear_pointwise``, where torch has it), each the best of 3 timings. Measured now, not cached; the
    inputs come from a private generator, so the global RNG (and so training) is untouched."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    kernels = [lambda: torch.mm(a, b, out=out)]
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for kernel in kernels:
        try:
            best = max(best, 2 * size**3 / time_call(kernel, min_seconds=0.1))
        except RuntimeError:  # a oneDNN build without this op's float32 path: torch.mm's figure stands
            pass
    return best


def other_load() -> float:
    """Runnable processes besides this one, from the 1-minute load average (0 where the OS does not say)."""
    try:
        return max(0.0, os.getloadavg()[0] - 1.0)
    except (OSError, AttributeError):
        return 0.0


def gemm_ceiling(size: int = 1024) -> float:
    """The float32 GEMM FLOP/s this machine reaches with torch at its thread count (``gemm_flops``: square
    ``size`` matmuls, the best of torch's default BLAS and oneDNN): the CPU's stand-in for a GPU's peak FLOP/s in
    MFU. Measured once and cached (about 1 s).

    A ceiling measured while other processes ran (``other_load`` above 0.5) is too low, and every later MFU too
    high (over 100% once the machine is quiet), so it is kept as provisional: the first call on a quiet machine
    measures again and keeps the higher of the two."""
    name, key = f"gemm_ceiling_best_{size}", machine_key()

    def measure() -> dict:
        return {"flops": gemm_flops(size), "busy": other_load() > 0.5}

    saved = cached(name, key, measure)
    if not isinstance(saved, dict):  # a cache file written before the busy flag existed
        saved = {"flops": saved, "busy": False}
    if saved["busy"] and other_load() <= 0.5:
        saved = {"flops": max(saved["flops"], gemm_flops(size)), "busy": False}
        store(name, key, saved)
    return saved["flops"]
