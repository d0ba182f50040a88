"""Which float32 CPU matmul kernel each path uses: the candidates timed once on this machine, never guessed from
the CPU's name (oneDNN wins 1.5x on an AVX-512 Zen 4 and loses 17% on an AVX2 Zen 3).

  path     when (``layers.linear``)                     candidates (``torch`` = ``F.linear``, the reference)
  train    autograd on, or inside torch.compile          torch, onednn (``cpu.linear_onednn``)
  decode   no autograd, 1..16 rows                       torch, gemv (numba, up to ``gemv.MAX_ROWS``), onednn
                                                         (pre-blocked weight)
  prefill  no autograd, more rows                        torch, onednn (weight as stored)

A path's choice is made at its first use of a shape class: training once per machine, on fixed shapes
(``TRAIN_SHAPES``, forward + backward; torch.compile bakes it in as a constant, so it cannot depend on shapes);
decoding per weight shape, every row class at once, streaming ``STREAM_BYTES`` of weight copies as a decoding
step streams the model; prefill per weight shape and row class. Each candidate is checked against ``F.linear``
and timed (best of 3); the fastest wins if it is at least ``MIN_GAIN`` faster than torch, else torch. A candidate
that fails or differs, or a measurement that fails, leaves torch. Times are kept with ``machine.cached`` (keyed by
the machine, the candidates and the shapes) and the choices in memory; ``slmforge info --kernels`` prints them.

``SLMFORGE_KERNELS`` forces a choice (nothing is measured): ``torch``, ``onednn`` or ``auto`` for every path, or
per path, comma-separated: ``train=torch,decode=gemv,prefill=auto``. Rows N, in/out features I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from slmforge.model.ops import cpu, gemv, machine

KERNELS_ENV = "SLMFORGE_KERNELS"
PATHS = {"train": ("torch", "onednn"), "decode": ("torch", "gemv", "onednn"), "prefill": ("torch", "onednn")}
MIN_GAIN = 1.05  # a candidate must beat torch by 5% to be chosen: closer than that is within timing noise
TRAIN_ROWS = 512
TRAIN_SHAPES = ((384, 1152), (1152, 384))  # (I, O): a small LM's projections, both orientations
DECODE_ROWS = (1, 2, 4, 8, 16)  # classes: rows are rounded up to one of these
PREFILL_ROWS = (32, 64, 128, 256)  # more rows than 256 count as 256 (measuring more would be slow)
STREAM_BYTES = 64 << 20  # decoding reads weights from memory, not cache: time over this many bytes of copies
ROUNDS = 5  # timings per candidate, the best kept
VERSION = 1  # of the measurement: a change re-measures

TRAIN = {"torch": F.linear, "onednn": cpu.linear_onednn}
INFERENCE = {"decode": {"torch": F.linear, "gemv": gemv.linear, "onednn": cpu.linear_onednn_packed},
             "prefill": {"torch": F.linear, "onednn": cpu.linear_onednn_plain}}


@dataclasses.dataclass
class Choice:
    path: str
    rows: int  # the row class (train: TRAIN_ROWS)
    shape: tuple[int, int]  # (I, O); (0, 0) for train, measured on TRAIN_SHAPES
    kernel: str
    reason: str
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per call (train: per pass)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # candidate -> why it was left out


# Keyed with the thread count too: the fastest kernel at 1 thread need not be at 16 (train.num_threads).
_CHOICES: dict[tuple[str, int, int, int, int], Choice] = {}
_FAST: dict[tuple[int, int, int, int], Callable] = {}  # (row class, I, O, threads) -> kernel: one lookup per call
_FORCED: list[dict[str, str]] = []  # SLMFORGE_KERNELS parsed, once


def reset() -> None:
    """Forget every choice and the parsed ``SLMFORGE_KERNELS`` (tests; a changed environment)."""
    _CHOICES.clear()
    _FAST.clear()
    _FORCED.clear()


def train_kernel() -> str:
    """The kernel of float32 linears under autograd or torch.compile: ``torch`` or ``onednn``."""
    return choose("train", TRAIN_ROWS, 0, 0).kernel


# What torch.compiler.assume_constant_result sets (without importing dynamo, 1 s, on every import): under
# torch.compile this runs once at trace time, outside the graph, and its answer is a constant of the graph.
train_kernel._dynamo_marked_constant = True


def inference_kernel(rows: int, weight: torch.Tensor) -> Callable:
    """The kernel for ``rows`` float32 rows times ``weight`` (O, I) without autograd."""
    key = (row_class(rows), weight.shape[1], weight.shape[0], torch.get_num_threads())
    kernel = _FAST.get(key)
    if kernel is None:
        path = "decode" if key[0] <= DECODE_ROWS[-1] else "prefill"
        kernel = _FAST[key] = INFERENCE[path][choose(path, *key[:3]).kernel]
    return kernel


def row_class(rows: int) -> int:
    """Rows rounded up to a power of two, then into DECODE_ROWS or PREFILL_ROWS."""
    size = 1 << max(rows - 1, 0).bit_length()
    return size if size <= DECODE_ROWS[-1] else min(max(size, PREFILL_ROWS[0]), PREFILL_ROWS[-1])


def candidates(path: str, rows: int) -> list[str]:
    names = ["torch"]
    if path == "decode" and rows <= gemv.MAX_ROWS:
        names.append("gemv")
    if cpu.ONEDNN_LINEAR:
        names.append("onednn")
    return names


def forced() -> dict[str, str]:
    """``SLMFORGE_KERNELS`` as {path: kernel}, ``auto`` paths left out; a one-line error when it is not valid."""
    if not _FORCED:
        _FORCED.append(parse_forced(os.environ.get(KERNELS_ENV, "")))
    return _FORCED[0]


def parse_forced(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (part.strip().lower() for part in text.split(","))):
        path, sep, kernel = item.rpartition("=")
        paths = [path] if sep else list(PATHS)
        allowed = ("auto", *PATHS[path]) if path in PATHS else ("auto", "torch", "onednn")
        if (sep and path not in PATHS) or kernel not in allowed:
            per_path = ", ".join(f"{p}={'|'.join((*k, 'auto'))}" for p, k in PATHS.items())
            raise ValueError(f"{KERNELS_ENV}={text!r}: {item!r} is not a choice; use torch, onednn or auto, or per "
                             f"path (comma-separated) {per_path}")
        for p in paths:
            if kernel == "auto":
                out.pop(p, None)
            else:
                out[p] = kernel
    return out


def choose(path: str, rows: int, i: int, o: int) -> Choice:
    """The choice for a path and shape class: forced, measured (or read from the cache), or torch on any doubt."""
    key = (path, rows, i, o, torch.get_num_threads())
    if key in _CHOICES:
        return _CHOICES[key]
    names = candidates(path, rows)
    kernel = forced().get(path)
    if kernel is not None:
        choice = Choice(path, rows, (i, o), kernel, f"forced by {KERNELS_ENV}")
        if kernel not in names:
            choice.kernel, choice.reason = "torch", f"{KERNELS_ENV} asks for {kernel}, not usable here: torch"
    else:
        try:
            measured = _measured(path, rows, i, o, names)
            choice = decide(path, rows, (i, o), measured["times"], measured["errors"])
        except Exception as e:  # noqa: BLE001 - a measurement that fails must never stop a model: torch it is
            choice = Choice(path, rows, (i, o), "torch", f"fallback: measuring failed ({type(e).__name__}: {e})")
    _CHOICES[key] = choice
    return choice


def decide(path: str, rows: int, shape: tuple[int, int], times: dict[str, float], errors: dict[str, str]) -> Choice:
    """The fastest candidate if it beats torch by MIN_GAIN, else torch."""
    if "torch" not in times:
        return Choice(path, rows, shape, "torch", "fallback: torch's own timing failed", times, errors)
    best = min(times, key=times.get)
    gain = times["torch"] / times[best]
    if best != "torch" and gain >= MIN_GAIN:
        return Choice(path, rows, shape, best, f"measured: {gain:.2f}x torch", times, errors)
    why = "torch fastest" if best == "torch" else f"{best} only {gain:.2f}x torch (< {MIN_GAIN}x)"
    return Choice(path, rows, shape, "torch", f"measured: {why}", times, errors)


def measurements() -> list[Choice]:
    """The choices made so far in this process, in the order they were made."""
    return list(_CHOICES.values())


def cache_name(path: str, rows: int, i: int, o: int) -> str:
    """The ``machine.cached`` name of a measurement (decoding: every row class of a weight shape in one file)."""
    if path == "train":
        return f"kernels_train_{TRAIN_ROWS}"
    return f"kernels_decode_{i}x{o}" if path == "decode" else f"kernels_prefill_{rows}x{i}x{o}"


def _measured(path: str, rows: int, i: int, o: int, names: list[str]) -> dict:
    """{"times": {...}, "errors": {...}} of the row class, from the cache or measured now."""
    if path == "decode":
        classes = {r: candidates(path, r) for r in DECODE_ROWS}
        key = {**machine.machine_key(), "kernels": VERSION, "path": path, "shape": [i, o],
               "candidates": {str(r): c for r, c in classes.items()}, "stream_bytes": STREAM_BYTES}
        return machine.cached(cache_name(path, rows, i, o), key, lambda: _measure_decode(i, o, classes))[str(rows)]
    shapes = [list(shape) for shape in (TRAIN_SHAPES if path == "train" else ((i, o),))]  # as JSON reads back
    key = {**machine.machine_key(), "kernels": VERSION, "path": path, "rows": rows, "shapes": shapes,
           "candidates": names}
    return machine.cached(cache_name(path, rows, i, o), key,
                          lambda: _measure_train(names) if path == "train" else _measure_prefill(rows, i, o, names))


def _race(fns: dict[str, Callable], check: Callable, calls: int = 1, min_seconds: float = 0.0) -> dict:
    """{"times": seconds per call of each fn that passes ``check(fn)`` (also its warm-up), "errors": why the others
    were left out}. The best of ROUNDS, the candidates timed in turn, so a slow spell of a shared machine hits all
    of them alike; ``fn()`` makes ``calls`` calls, repeated for at least ``min_seconds``."""
    times, errors = {}, {}
    for name, fn in fns.items():
        try:
            check(fn)
            times[name] = float("inf")
        except Exception as e:  # noqa: BLE001 - a failing candidate is left out, never an error
            errors[name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:200]
    for _ in range(ROUNDS):
        for name in times:
            runs, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < min_seconds or runs == 0:
                fns[name]()
                runs += 1
            times[name] = min(times[name], elapsed / (runs * calls))
    return {"times": times, "errors": errors}


def _same(out: torch.Tensor, ref: torch.Tensor) -> None:
    """A candidate must give F.linear's numbers (float32 sums in another order: ~1e-6 relative)."""
    if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-3, atol=1e-3):
        raise ArithmeticError("differs from F.linear")


def _inputs(rows: int, i: int, o: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random x (rows, I) and weight (O, I) from a private generator (the global RNG, and so training, is
    untouched), as ordinary tensors even under inference mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):
        return torch.randn(rows, i, generator=gen), torch.randn(o, i, generator=gen).div_(i**0.5)


def _measure_train(names: list[str]) -> dict:
    """Forward + backward over TRAIN_SHAPES at TRAIN_ROWS rows: seconds per pass over all of them."""
    with torch.inference_mode(False), torch.enable_grad():
        cases = [(x.requires_grad_(), w.requires_grad_(), torch.ones(TRAIN_ROWS, o))
                 for i, o in TRAIN_SHAPES for x, w in [_inputs(TRAIN_ROWS, i, o)]]

        def step(fn):
            outs = []
            for x, w, g in cases:
                x.grad = w.grad = None
                out = fn(x, w)
                out.backward(g)
                outs += [out.detach(), x.grad, w.grad]
            return outs

        ref = step(F.linear)
        fns = {name: functools.partial(step, TRAIN[name]) for name in names}
        return _race(fns, lambda fn: [_same(a, b) for a, b in zip(fn(), ref)])


def _measure_decode(i: int, o: int, classes: dict[int, list[str]]) -> dict:
    """Each row class: seconds per call, over copies of a weight that together exceed the caches."""
    _, weight = _inputs(1, i, o)
    with torch.inference_mode(False):
        pool = [weight] + [weight.clone() for _ in range(min(255, STREAM_BYTES // (4 * i * o)))]
    out = {}
    with torch.no_grad():
        for rows, names in classes.items():
            x, _ = _inputs(rows, i, 1)
            ref = F.linear(x, weight)
            fns = {name: functools.partial(_sweep, INFERENCE["decode"][name], x, pool) for name in names}
            out[str(rows)] = _race(fns, lambda fn: [_same(y, ref) for y in fn()[:1]], calls=len(pool))
    return out


def _sweep(fn: Callable, x: torch.Tensor, pool: list[torch.Tensor]) -> list[torch.Tensor]:
    return [fn(x, w) for w in pool]


def _measure_prefill(rows: int, i: int, o: int, names: list[str]) -> dict:
    x, weight = _inputs(rows, i, o)
    with torch.no_grad():
        ref = F.linear(x, weight)
        fns = {name: functools.partial(INFERENCE["prefill"][name], x, weight) for name in names}
        return _race(fns, lambda fn: _same(fn(), ref), min_seconds=0.005)
