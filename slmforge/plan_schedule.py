"""The schedule of a whole build on GPUs, stage by stage: FLOPs, GPU-hours, wall time and memory per GPU.

A build trains several models one stage after another (proxy mixtures, scaling runs, the target's pre-training,
its anneal, SFT, ORPO). Each ``StagePlan`` names a model, its training tokens and how many runs of it the stage
trains; ``schedule`` turns the list into the arithmetic of ``plan.py`` for one GPU model at several GPU counts,
and ``format_schedule`` prints it as one table.

- FLOPs are ``flops_per_token(cfg, seq_len)["train"] x tokens x runs x passes``: PaLM's MFU convention (arXiv
  2204.02311, appendix B), the full s x s attention term, so the MFU given applies to them as measured MFU does.
- GPU-hours are FLOPs / (peak x MFU x 3600): busy GPU time, the same at any GPU count.
- Memory per GPU is ``plan.memory_gib`` (fp32 AdamW state, bf16 activations); FSDP shards the state over the
  GPUs a run trains on, DDP keeps a full copy on each. A GPU "fits" within ``USABLE_MEMORY_FRACTION`` of its
  memory; when a stage does not, the largest power-of-two micro-batch that does is given, with activation
  checkpointing when no micro-batch fits without it.

Legend: g GPUs one run trains on, b micro-batch size (sequences per GPU per forward), s sequence length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from slmforge.config import ModelConfig
from slmforge.plan import GPUS, USABLE_MEMORY_FRACTION, _count, _si, _table, count_params, flops_per_token, memory_gib
from slmforge.registry import lookup


@dataclass
class StagePlan:
    """One training stage of the build."""

    name: str  # "proxy mixture", "scaling d512", "target", "anneal", "sft", "orpo", ...
    model: ModelConfig  # config.preset(name), or a ModelConfig with merged keys
    tokens: float  # training tokens of one run
    runs: int = 1  # runs of this model the stage trains (3 proxies, 5 scaling points), each of `tokens`
    seq_len: int = 2048
    micro_batch_size: int = 8  # sequences per GPU per forward
    # Training FLOPs per token relative to plain pre-training, for losses that do more than one forward-backward
    # per counted token. ORPO with `tokens` counting one side of each pair: 2 (chosen and rejected both train).
    # DPO likewise: 2 x 4/3 = 8/3, since the frozen reference's forward costs a third of a training pass.
    # Memory ignores it: set micro_batch_size to the sequences a GPU really holds (a pair is two).
    passes: float = 1.0
    # Tokens per optimizer step. A data-parallel rank does at least one micro-batch per step, so one run can use
    # at most global_batch_tokens / (b x s) GPUs; the rest sit idle or train the stage's other runs. 0: not
    # stated, every run spreads over all the GPUs (the ideal 1/count scaling).
    global_batch_tokens: float = 0


def _check(stages: list[StagePlan], gpu_counts, mfu: float) -> None:
    """One-line ValueErrors naming the key, before any arithmetic."""
    if not stages:
        raise ValueError("stages: the schedule needs at least one StagePlan")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: expected a fraction in (0, 1]")
    if not gpu_counts or any(not isinstance(n, int) or n < 1 for n in gpu_counts):
        raise ValueError(f"gpu_counts={tuple(gpu_counts)}: expected one or more positive whole GPU counts")
    for i, st in enumerate(stages):
        where = f"stages[{i}] ({st.name!r})"
        if not st.tokens > 0:
            raise ValueError(f"{where}.tokens={st.tokens}: expected a positive number of training tokens")
        if not st.passes > 0:
            raise ValueError(f"{where}.passes={st.passes}: expected a positive FLOPs multiplier")
        if st.global_batch_tokens < 0:
            raise ValueError(f"{where}.global_batch_tokens={st.global_batch_tokens}: expected 0 (not stated) or "
                             "a positive token count")
        for key in ("runs", "seq_len", "micro_batch_size"):
            value = getattr(st, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}.{key}={value}: expected a positive whole number")


def _fit(st: StagePlan, num_gpus: int, fsdp: bool, checkpointing: bool, usable_gib: float) -> dict:
    """Memory per GPU at the stage's micro-batch and, when that does not fit, the largest one that does."""
    mem = memory_gib(st.model, st.seq_len, st.micro_batch_size, num_gpus, fsdp, checkpointing)
    out = {"memory_gib": mem["total"], "memory": mem, "fits": mem["total"] <= usable_gib,
           "fit_micro_batch_size": st.micro_batch_size, "needs_checkpointing": checkpointing}
    if out["fits"]:
        return out
    # Halving the micro-batch keeps the global batch (more gradient accumulation), so FLOPs are unchanged;
    # checkpointing recomputes the forward (about a third more FLOPs), hence tried only when halving is not enough.
    smaller = [2**k for k in reversed(range(st.micro_batch_size.bit_length())) if 2**k < st.micro_batch_size]
    tries = [(b, checkpointing) for b in smaller]
    if not checkpointing:
        tries += [(b, True) for b in [st.micro_batch_size, *smaller]]
    for b, ckpt in tries:
        if memory_gib(st.model, st.seq_len, b, num_gpus, fsdp, ckpt)["total"] <= usable_gib:
            return out | {"fit_micro_batch_size": b, "needs_checkpointing": ckpt}
    return out | {"fit_micro_batch_size": None, "needs_checkpointing": None}


def _on_gpus(st: StagePlan, count: int, max_useful: int | None, run_gpu_hours: float) -> dict:
    """How the stage's runs share `count` GPUs (the fastest split): GPUs per run, runs side by side, wall hours."""
    # A run spreads over at most max_useful GPUs (its global batch); spare GPUs train the stage's other runs
    # side by side. Hours assume perfect scaling up to that limit: on many GPUs a small model's step is short
    # and communication takes a larger share, so real wall time is longer than this.
    best = None
    for side_by_side in range(1, min(st.runs, count) + 1):
        per_run = count // side_by_side if max_useful is None else min(count // side_by_side, max_useful)
        wall = math.ceil(st.runs / side_by_side) * run_gpu_hours / per_run
        if best is None or wall < best[0]:  # ties keep fewer, wider runs
            best = (wall, per_run, side_by_side)
    wall, per_run, side_by_side = best
    step_tokens = max(st.global_batch_tokens, per_run * st.micro_batch_size * st.seq_len)
    return {"gpus_per_run": per_run, "runs_side_by_side": side_by_side, "idle_gpus": count - per_run * side_by_side,
            "wall_hours": wall, "steps_per_run": st.tokens / step_tokens}


def _stage(st: StagePlan, peak_flops: float, gpu_counts, usable_gib: float, fsdp: bool,
           checkpointing: bool) -> dict:
    params = count_params(st.model)
    fpt = flops_per_token(st.model, st.seq_len)["train"]
    flops = fpt * st.tokens * st.runs * st.passes
    gpu_hours = flops / (peak_flops * 3600)
    max_useful = (max(1, int(st.global_batch_tokens // (st.micro_batch_size * st.seq_len)))
                  if st.global_batch_tokens else None)
    gpus = {}
    for count in gpu_counts:
        on = _on_gpus(st, count, max_useful, gpu_hours / st.runs)
        gpus[str(count)] = on | _fit(st, on["gpus_per_run"], fsdp, checkpointing, usable_gib)
    return {"name": st.name, "params_total": params.total, "params_active": params.active,
            "tokens_per_run": st.tokens, "runs": st.runs, "tokens": st.tokens * st.runs,
            "tokens_per_param": st.tokens / params.total, "passes": st.passes, "seq_len": st.seq_len,
            "micro_batch_size": st.micro_batch_size, "global_batch_tokens": st.global_batch_tokens,
            "max_useful_gpus": max_useful, "train_flops_per_token": fpt, "flops": flops, "gpu_hours": gpu_hours,
            "gpus": gpus}


def schedule(stages: list[StagePlan], gpu: str = "h100", gpu_counts=(1, 8, 64), mfu: float = 0.4,
             fsdp: bool = True, activation_checkpointing: bool = False) -> dict:
    """The build's stages on `gpu` at each of `gpu_counts`, and their totals (stages run one after another).

    Returns {"setup": ..., "stages": [one dict per stage], "totals": ...}; a stage's "gpus" and the totals'
    "wall_hours" are keyed by the GPU count as a string ("8"), so the result survives a JSON round trip
    unchanged. "max_useful_gpus" is per run (None: no global batch stated).
    """
    spec = lookup(GPUS, gpu, "GPU (gpu)")
    _check(stages, gpu_counts, mfu)
    gpu_counts = tuple(dict.fromkeys(gpu_counts))
    usable = USABLE_MEMORY_FRACTION * spec.memory_gib
    rows = [_stage(st, spec.peak_flops * mfu, gpu_counts, usable, fsdp, activation_checkpointing) for st in stages]
    total_hours = sum(r["gpu_hours"] for r in rows)
    costliest = max(rows, key=lambda r: r["flops"])
    return {
        "setup": {"gpu": gpu, "peak_flops_per_gpu": spec.peak_flops, "gpu_memory_gib": spec.memory_gib,
                  "usable_memory_gib": usable, "mfu": mfu, "gpu_counts": list(gpu_counts), "fsdp": fsdp,
                  "activation_checkpointing": activation_checkpointing},
        "stages": rows,
        "totals": {"flops": sum(r["flops"] for r in rows), "gpu_hours": total_hours,
                   "wall_hours": {str(n): sum(r["gpus"][str(n)]["wall_hours"] for r in rows) for n in gpu_counts},
                   "costliest": costliest["name"], "costliest_share": costliest["gpu_hours"] / total_hours},
    }


# ---------------------------------------------------------------- report


def _hours(h: float) -> str:
    if h >= 100:
        return f"{h:,.0f} h"
    if h >= 1:
        return f"{h:.1f} h"
    return f"{h * 60:.1f} min" if h >= 1 / 60 else f"{h * 3600:.0f} s"


def _gpu_hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 1 else f"{h:.2g}"


def _memory_cell(on: dict, checkpointing: bool) -> str:
    gib = f"{on['memory_gib']:.1f}"
    if on["fits"]:
        return f"{gib} ok"
    if on["fit_micro_batch_size"] is None:
        return f"{gib} NO"
    # +ckpt only when checkpointing is needed beyond what the schedule already assumes
    extra = on["needs_checkpointing"] and not checkpointing
    return f"{gib} NO: b={on['fit_micro_batch_size']}" + ("+ckpt" if extra else "")


def format_schedule(result: dict) -> str:
    s, t = result["setup"], result["totals"]
    counts = [str(n) for n in s["gpu_counts"]]
    header = ("stage", "params", "tokens", "FLOPs", "GPU-hours",
              *(f"wall@{n}" for n in counts), *(f"GiB/GPU@{n}" for n in counts))
    rows, notes = [header], []
    for r in result["stages"]:
        params = _count(r["params_total"]) + (f" ({_count(r['params_active'])} act.)"
                                              if r["params_active"] != r["params_total"] else "")
        tokens = _count(r["tokens"]) + (f" ({r['runs']} x {_count(r['tokens_per_run'])})" if r["runs"] > 1 else "")
        walls = []
        for n in counts:
            on = r["gpus"][n]
            walls.append(_hours(on["wall_hours"]) + ("*" if on["idle_gpus"] else ""))
            if on["idle_gpus"]:
                notes.append(f"  * {r['name']} on {n} GPUs: {on['runs_side_by_side']} run(s) side by side on "
                             f"{on['gpus_per_run']} GPUs each, {on['idle_gpus']} idle (a run uses at most "
                             f"{r['max_useful_gpus']}: global batch {_count(r['global_batch_tokens'])} tokens / "
                             f"(b={r['micro_batch_size']} x s={r['seq_len']}))")
        mems = [_memory_cell(r["gpus"][n], s["activation_checkpointing"]) for n in counts]
        rows.append((r["name"], params, tokens, _si(r["flops"], "FLOP"), _gpu_hours(r["gpu_hours"]), *walls, *mems))
    rows.append(("total", "", "", _si(t["flops"], "FLOP"), f"{t['gpu_hours']:,.1f}",
                 *(_hours(t["wall_hours"][n]) for n in counts), *("" for _ in counts)))
    setup = (f"{s['gpu']} ({s['gpu_memory_gib']:g} GiB, {_si(s['peak_flops_per_gpu'], 'FLOP/s')} dense bf16 peak) "
             f"at {s['mfu']:.0%} MFU, {'FSDP' if s['fsdp'] else 'DDP'}, "
             f"{'with' if s['activation_checkpointing'] else 'no'} activation checkpointing")
    legend = (f"  GiB/GPU: memory per GPU at the stage's micro-batch; ok within {USABLE_MEMORY_FRACTION:.0%} of "
              "the GPU's memory,\n  else NO with the largest micro-batch b that fits (+ckpt: only with activation "
              "checkpointing)")
    days = ", ".join(f"{t['wall_hours'][n] / 24:,.1f} days on {n}" for n in counts)
    return "\n".join([f"Build schedule on {setup}", *_table(rows), "",
                      f"  costliest stage: {t['costliest']} ({t['costliest_share']:.0%} of the GPU-hours)",
                      f"  wall time in total: {days}", legend, *notes])
