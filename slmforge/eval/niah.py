"""``slmforge eval niah RUN``: needle-in-a-haystack recall over a grid of context lengths x needle depths.

Each cell (length, depth) scores ``samples`` samples of ``synth/niah.py`` (sample j of a cell is the same for every
model: its key is length:depth:j), decoded greedily in left-padded batches through ``serve/generate.py``, which
works for every mixer layout. Exact match: the first word of the generation (a trailing "." dropped) equals the
answer. Per length it reports seconds per sample and memory: ``peak_rss_mb``, the process's resident set polled
every 5 ms while the cell ran (Linux ``/proc/self/statm``; on CUDA, ``torch.cuda.max_memory_allocated`` instead),
and ``state_mb``, the decoding state the layout keeps at that length (``info.state_bytes``, float32).
Writes ``niah.json`` after every cell (a stopped run resumes: cells already there under the same settings are
skipped) and ``niah.png``, the heatmap, under ``<run>/eval/niah`` (or ``out_dir``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmforge.checkpoint import load_for_inference
from slmforge.info import state_bytes
from slmforge.progress import progress_bar
from slmforge.runs import RunDir, atomic_path, write_json
from slmforge.serve.generate import generate_batch
from slmforge.synth.niah import Haystack, NiahConfig, make_sample


@dataclass
class NiahEvalConfig(NiahConfig):
    lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])  # context tokens of each grid row
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depths (columns)
    samples: int = 10  # samples per cell
    batch_size: int = 4  # samples decoded together (left-padded)
    seed: int = 1  # training's samples use seed 0: these are others
    out_dir: str = ""  # "" = <run>/eval/niah

    def validate(self, prefix: str = "") -> None:
        super().validate(prefix)
        if not self.lengths or not self.depths:
            raise ValueError(f"{prefix}lengths and depths need at least one value each (lengths=1024,4096)")
        if min(self.lengths) < 32:
            raise ValueError(f"{prefix}lengths={self.lengths}: expected context lengths of at least 32 tokens")
        if not all(0 <= d <= 1 for d in self.depths):
            raise ValueError(f"{prefix}depths={self.depths}: expected fractions in [0, 1]")
        for key in ("samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{prefix}{key}={getattr(self, key)}: expected a value >= 1")


SETTINGS = ("haystack", "text_field", "kinds", "num_needles", "digits", "seed")  # a cell is reused only under these


def evaluate(run_dir: str | Path, cfg: NiahEvalConfig | None = None, progress: bool = True) -> dict:
    """Score a run folder's model over the grid; see ``evaluate_model``."""
    model, tokenizer, _ = load_for_inference(run_dir)
    return evaluate_model(model, tokenizer, cfg or NiahEvalConfig(), run_dir, progress)


def evaluate_model(model, tokenizer, cfg: NiahEvalConfig, run_dir: str | Path = ".", progress: bool = True) -> dict:
    """Fill ``niah.json`` cell by cell (lengths ascending), then draw the heatmap; returns the results."""
    out_dir = Path(cfg.out_dir) if cfg.out_dir else RunDir.at(run_dir).eval_output("niah")
    path = out_dir / "niah.json"
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    results = _previous(path, settings)
    haystack = Haystack(cfg.haystack, tokenizer, cfg.text_field)
    grid = [(length, depth) for length in sorted(cfg.lengths) for depth in cfg.depths]
    todo = [cell for cell in grid if _key(*cell) not in results["cells"]]
    bar = progress_bar(total=len(grid), initial=len(grid) - len(todo), desc="niah", disable=not progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    for length, depth in todo:
        results["cells"][_key(length, depth)] = score_cell(model, haystack, cfg, length, depth)
        results["lengths"] = _per_length(model, results["cells"])
        write_json(path, results)
        bar.update(1)
    bar.close()
    results["lengths"] = _per_length(model, results["cells"])
    write_json(path, results)
    plot_heatmap(results, cfg, out_dir / "niah.png")
    return results


def _key(length: int, depth: float) -> str:
    return f"{length}:{depth:g}"


def _previous(path: Path, settings: dict) -> dict:
    """The results of an earlier run under the same settings (its cells are kept), else an empty one."""
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("settings") == settings:
            return old
    return {"settings": settings, "cells": {}, "lengths": {}}


def score_cell(model, haystack: Haystack, cfg: NiahEvalConfig, length: int, depth: float) -> dict:
    """Exact-match recall of ``cfg.samples`` samples at one (length, depth), with time and memory."""
    one = dataclasses.replace(cfg, questions=1)
    samples = [make_sample(haystack, one, length, depth, f"{length}:{depth:g}:{j}") for j in range(cfg.samples)]
    eos = haystack.tokenizer.eos_id
    correct, records = 0, []
    with PeakMemory(next(model.parameters()).device) as memory:
        start = time.perf_counter()
        for i in range(0, len(samples), cfg.batch_size):
            batch = samples[i : i + cfg.batch_size]
            steps = max(s.answers[-1][1] - s.answers[-1][0] for s in batch) + 1
            new = generate_batch(model, [s.prompt for s in batch], steps, eos_id=eos)
            for s, ids in zip(batch, new):
                text = haystack.tokenizer.decode(ids)
                ok = answer_of(text) == s.answer_texts[-1]
                correct += ok
                records.append({"kind": s.kind, "answer": s.answer_texts[-1], "generation": text, "correct": ok})
        seconds = time.perf_counter() - start
    return {"length": length, "depth": depth, "recall": correct / len(samples), "samples": len(samples),
            "seconds_per_sample": seconds / len(samples), "peak_mb": memory.peak / 2**20,
            "memory": memory.what, "records": records}


def answer_of(text: str) -> str:
    """The first word of a generation, a trailing full stop or comma dropped."""
    words = text.split()
    return words[0].rstrip(".,;") if words else ""


def _per_length(model, cells: dict) -> dict:
    """Recall averaged over depths, the lowest depth's, seconds per sample, peak memory and decoding state."""
    out = {}
    for length in sorted({c["length"] for c in cells.values()}):
        row = [c for c in cells.values() if c["length"] == length]
        out[str(length)] = {
            "recall": sum(c["recall"] for c in row) / len(row), "min_recall": min(c["recall"] for c in row),
            "seconds_per_sample": sum(c["seconds_per_sample"] for c in row) / len(row),
            "peak_mb": max(c["peak_mb"] for c in row), "memory": row[0]["memory"],
            "state_mb": sum(state_bytes(model.cfg, length, "fp32").values()) / 2**20}
    return out


class PeakMemory:
    """The peak memory while the block runs: CUDA's allocator peak, or the process's RSS polled every 5 ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.what = "torch.cuda.max_memory_allocated" if self.cuda else "peak RSS (/proc/self/statm, 5 ms polls)"
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
    """The resident set of this process now (Linux), else its peak so far (``resource``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plot_heatmap(results: dict, cfg: NiahEvalConfig, path: Path) -> None:
    """Recall by length (rows) and depth (columns), green = found; cells not scored are blank."""
    import matplotlib  # slow to import; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = sorted(cfg.lengths), list(cfg.depths)
    grid = [[results["cells"].get(_key(n, d), {}).get("recall", float("nan")) for d in depths] for n in lengths]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.5, 0.6 * len(lengths) + 2))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set(xticks=range(len(depths)), xticklabels=[f"{d:.0%}" for d in depths], yticks=range(len(lengths)),
           yticklabels=[f"{n:,}" for n in lengths], xlabel="needle depth", ylabel="context tokens",
           title=f"Needle in a haystack: exact-match recall ({cfg.samples} per cell)")
    fig.colorbar(image, ax=ax, label="recall")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
