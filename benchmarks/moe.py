"""Dense SwiGLU against a DeepSeekMoE FFN at equal active parameters and equal tokens, over several seeds.

The MoE model is ``recipes/moe_cpu.yaml``'s (16 routed experts of ffn_dim / 3 units, top-2, one shared expert); the
dense model is ``recipes/families_cpu.yaml``'s with its FFN width set so that its parameters per token equal the MoE's
active ones (router included) as closely as a whole number of units allows. Both train on the same token shards
(built once under ``--out``) with families_cpu's data, batch and schedule for ``--steps`` steps, once per ``--seeds``
seed. Reported per model: total and active parameters, validation loss, training tokens/s (mean and spread over the
seeds; and ``--speed-steps`` steps of both models taking turns step by step on one batch, the median step, so that
a shared machine's slow spells hit both alike), the peak memory of one forward + backward of ``--memory-tokens`` tokens (``benchmarks/memory.py``, a fresh
process), and for the MoE the expert load after warm-up (max/mean, worst layer, averaged over the last 20% of
steps; 1.0 is perfect balance) without an auxiliary loss. Writes moe.json and moe_load.png (per-layer max/mean
load by step, first seed). Never run in CI. Example: ``python benchmarks/moe.py --steps 1200 --seeds 0 1 2``
(``--quick`` for a smoke run of a few tiny steps). A run folder with a train_result.json of ``--steps`` steps is
read, not trained again (a rerun after an interruption); delete ``--out`` to start over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measure  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
from layouts import base_config  # noqa: E402  (the families_cpu corpus every model comparison trains on)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def models() -> dict:
    """{"dense": ..., "moe": ...} model configs with equal parameters per token."""
    from slmforge.config import load_config
    from slmforge.plan import count_params

    moe = load_config(RECIPES / "moe_cpu.yaml").model
    dense = dataclasses.replace(moe, ffn="dense")
    ffn_active = (count_params(moe).active - count_params(dense).total) / moe.num_layers + 3 * moe.d_model * moe.ffn_dim
    return {"dense": dataclasses.replace(dense, ffn_hidden=round(ffn_active / (3 * moe.d_model))), "moe": moe}


def late_load(run_dir: Path) -> float | None:
    """The worst layer's max/mean expert load, averaged over the last 20% of the steps (None: no MoE)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loads = [r["moe_max_mean"] for r in records if "moe_max_mean" in r]
    return statistics.mean(loads[-max(1, len(loads) // 5):]) if loads else None


def run_one(name: str, model, base, seed: int) -> dict:
    from slmforge.train.loop import train

    data = dataclasses.replace(base.data, shards_dir=str(base.run_dir / "shards"),
                               tokenizer=str(base.run_dir / "tokenizer.json"))
    cfg = dataclasses.replace(base, name=f"{name}_seed{seed}", model=model, data=data,
                              train=dataclasses.replace(base.train, seed=seed))
    done = cfg.run_dir / "train_result.json"
    if done.exists() and json.loads(done.read_text())["steps"] == cfg.train.max_steps:
        result = argparse.Namespace(**json.loads(done.read_text()))  # finished by an earlier, interrupted call
    else:
        result = train(cfg, force=True)
    return {"model": name, "seed": seed, "tokens": result.tokens, "val_loss": result.val_loss,
            "tokens_per_second": result.tokens_per_second, "load_max_mean": late_load(cfg.run_dir),
            "run_dir": str(cfg.run_dir)}


def interleaved_speed(configs: dict, batch_size: int, seq_len: int, steps: int, warmup: int = 5) -> dict[str, float]:
    """Training tokens/s of each model (forward, backward, AdamW step, the MoE bias hook), the models taking turns
    step by step on one random batch: the median step time of each."""
    import time

    import torch

    from slmforge.config import TrainConfig
    from slmforge.model.lm import LM
    from slmforge.model.moe import after_step
    from slmforge.train.optim import build_optimizer

    runs = {}
    for name, model_cfg in configs.items():
        torch.manual_seed(0)
        model = LM(model_cfg)
        runs[name] = (model, build_optimizer(model, TrainConfig()))
    vocab = next(iter(configs.values())).vocab_size
    x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            _, loss = model(inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            after_step(model)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: batch_size * seq_len / statistics.median(t) for name, t in times.items()}


def plot_load(run_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted(k for k in records[0] if k.startswith("moe_max_mean_")):
        ax.plot([r["step"] for r in records], [r[key] for r in records], lw=1, label=key.removeprefix("moe_max_mean_"))
    ax.axhline(1.3, color="grey", ls="--", lw=1)
    ax.set(xlabel="step", ylabel="max / mean expert load", title="MoE expert load per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    return format(mean, fmt) + (f" ± {format(statistics.stdev(values), fmt)}" if len(values) > 1 else "")


def format_table(rows: list[dict], summary: dict, memory_tokens: int) -> str:
    lines = [f"| model | params total | params active | val loss | tokens/s | peak fwd+bwd at {memory_tokens:,} "
             f"tokens | max/mean load (late) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        mine = [r for r in rows if r["model"] == name]
        mem = s["memory_error"] or f"{s['peak_bytes_fwd_bwd'] / 2**20:,.0f} MiB"
        loads = [r["load_max_mean"] for r in mine if r["load_max_mean"] is not None]
        lines.append(f"| {name} | {s['params']:,} | {s['active']:,} | "
                     f"{_spread([r['val_loss'] for r in mine], '.4f')} | "
                     f"{_spread([r['tokens_per_second'] for r in mine], ',.0f')} | {mem} | "
                     f"{_spread(loads, '.3f') if loads else '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--memory-tokens", type=int, default=4096)
    ap.add_argument("--speed-steps", type=int, default=40, help="interleaved speed steps (0: skip)")
    ap.add_argument("--out", default="runs/bench_moe")
    ap.add_argument("--quick", action="store_true", help="small corpus, 64-token rows, 4 steps: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.memory_tokens, args.speed_steps = 4, 256, min(args.speed_steps, 3)

    from slmforge.pipeline import prepare
    from slmforge.plan import count_params
    from slmforge.runs import write_json

    out = Path(args.out)
    base = base_config(out, args.steps, args.quick)
    prepare(base)  # the corpus, tokenizer and shards both models train on
    configs = models()
    # Seeds interleaved (dense, moe, dense, ...) so that a machine slowing down affects both alike.
    rows = [run_one(name, model, base, seed) for seed in args.seeds for name, model in configs.items()]
    summary = {}
    for name, model in configs.items():
        n = count_params(model)
        mem = measure(dataclasses.replace(model, max_seq_len=args.memory_tokens), args.memory_tokens)
        summary[name] = {"params": n.total, "active": n.active, "ffn": model.ffn, "ffn_hidden": model.ffn_dim,
                         "peak_bytes_fwd_bwd": mem.get("peak_bytes"), "memory_error": mem.get("error")}
    speed = interleaved_speed(configs, base.train.batch_size, base.data.seq_len, args.speed_steps) \
        if args.speed_steps else {}
    for name in summary:
        summary[name]["interleaved_tokens_per_second"] = speed.get(name)
    plot_load(Path(next(r["run_dir"] for r in rows if r["model"] == "moe")), out / "moe_load.png")
    write_json(out / "moe.json", {"steps": args.steps, "seeds": args.seeds, "batch_size": base.train.batch_size,
                                  "seq_len": base.data.seq_len, "models": summary, "rows": rows})
    print(f"\n{args.steps} steps x {base.train.batch_size} x {base.data.seq_len} tokens each "
          f"({rows[0]['tokens']:,} tokens), seeds {args.seeds}; recipes/families_cpu.yaml's data and schedule\n")
    print(format_table(rows, summary, args.memory_tokens))
    if speed:
        ratio = speed["moe"] / speed["dense"]
        print(f"\ninterleaved speed ({args.speed_steps} steps each, taking turns): dense {speed['dense']:,.0f}, "
              f"moe {speed['moe']:,.0f} tokens/s = {ratio:.0%} of dense")
    print(f"\nwrote {out / 'moe.json'} and {out / 'moe_load.png'}")


if __name__ == "__main__":
    main()
