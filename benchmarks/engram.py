"""Engram conditional memory against the same model without it: equal compute per token, equal tokens, 3 seeds.

The corpus (built once under ``--out``): the training biographies of a ``synth.knowledge`` knowledge base (fictional
people whose facts must be memorized) mixed with the procedural corpus's general text (stories, word problems,
sorting puzzles); one BPE tokenizer over both. Every model is recipes/families_cpu.yaml's schedule on a small Llama
(``--d-model``, ``--layers``) for ``--steps`` steps; the Engram models add one memory at layer 1 (orders 2-3, 2
heads per order, 16 wide per table) at ``--rows`` rows per table, so the tables grow while the compute per token
(two d_model x 64 projections) stays the same. Reported per model, mean ± spread over the seeds: parameters
(compute and table), training FLOPs per token, validation loss on held-out biographies (the same facts, new
sentences) and on general text, fact-question accuracy (the true value ranked first among its attribute's
values, ``eval.facts``; chance about 1/11) and training tokens/s. Writes engram.json. Never run in CI.
Example: ``python benchmarks/engram.py`` (the full run), ``--quick`` for a smoke run of a few tiny steps.

``--speed N``: the cost of the memory alone. Every model is set up once in this process and the real training
step (``train.loop.train_step``: forward, backward, clipping, AdamW) runs N timed rounds after 3 warm-up ones,
every model one step per round in a rotating order, so a machine slowing down slows all alike; reported: median
wall seconds and median CPU seconds of the step (the thread's own time, steadier on a shared machine) and
tokens/s from each, relative to the baseline. Writes engram_speed.json.

Seeds can run as separate processes (``--seeds 1 --result engram_seed1.json``); ``--merge A.json B.json ...``
prints the one table of their rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def build_corpus(out: Path, num_entities: int, num_general: int) -> None:
    """tokenizer.json, shards/{train,validation}/ and held_out.json (the validation texts by kind) under ``out``."""
    from slmforge.synth.knowledge import KnowledgeBase
    from slmforge.synth.procedural import build_corpus as procedural
    from slmforge.tokens.shards import tokenize_to_shards
    from slmforge.tokens.tokenizer import train_tokenizer

    if (out / "held_out.json").exists():
        return
    kb = KnowledgeBase(num_entities, 1, seed=0, num_phrasings=4)
    general = procedural(["narrative", "arithmetic", "sorting"], num_general, num_general // 20, 0, seed=0)
    train = kb.documents() + [d.text for d in general["train"]]
    random.Random(0).shuffle(train)
    held_out = {"knowledge": kb.validation_documents(), "general": [d.text for d in general["validation"]]}
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(train, 512, out / "tokenizer.json")
    tokenize_to_shards(train, out / "tokenizer.json", out / "shards" / "train", num_workers=1)
    tokenize_to_shards(held_out["knowledge"] + held_out["general"], out / "tokenizer.json",
                       out / "shards" / "validation", num_workers=1)
    (out / "held_out.json").write_text(json.dumps(held_out))


def models(d_model: int, layers: int, rows: list[int], baseline: bool = True) -> dict:
    from slmforge.config.model import AttnConfig, EngramConfig, ModelConfig

    base = ModelConfig(vocab_size=512, d_model=d_model, num_layers=layers, max_seq_len=256,
                       attn=AttnConfig(num_heads=4, num_kv_heads=2))
    out = {"baseline": base} if baseline else {}
    for r in rows:
        out[f"engram {r:,} rows"] = dataclasses.replace(base, engram=EngramConfig(layers="1", table_rows=r, dim=16))
    return out


def evaluate(run_dir: str, out: Path, num_entities: int) -> dict:
    """Held-out losses (nats per token, by kind) and fact accuracy of the trained run."""
    from slmforge.checkpoint import load_for_inference
    from slmforge.eval.facts import fact_accuracy
    from slmforge.eval.perplexity import stream_nats
    from slmforge.synth.knowledge import KnowledgeBase

    model, tok, _ = load_for_inference(run_dir)
    held_out = json.loads((out / "held_out.json").read_text())
    result = {}
    for kind, texts in held_out.items():
        ids = [i for text in texts for i in [tok.eos_id] + tok.encode(text)]
        nats, count = stream_nats(model, ids, 256, 256)
        result[f"{kind}_loss"] = nats / count
    result["fact_accuracy"] = fact_accuracy(model, tok, KnowledgeBase(num_entities, 1, seed=0, num_phrasings=4).questions())
    return result


def run_one(name: str, model, base, seed: int, out: Path, num_entities: int) -> dict:
    from slmforge.train.loop import train

    cfg = dataclasses.replace(base, name=f"{name.replace(' ', '_').replace(',', '')}_seed{seed}", model=model,
                              train=dataclasses.replace(base.train, seed=seed))
    result = train(cfg, force=True)
    return {"model": name, "seed": seed, "tokens": result.tokens, "tokens_per_second": result.tokens_per_second,
            "val_loss": result.val_loss, **evaluate(result.run_dir, out, num_entities)}


def speed(base, configs: dict, rounds: int, warmup: int = 3) -> dict:
    """{model: median wall and CPU seconds per training step}, steps interleaved round-robin in one process."""
    import time

    from slmforge.train import distributed as dist
    from slmforge.train.loop import setup, train_step

    info = dist.init("cpu")
    trainers = {name: setup(dataclasses.replace(base, name=f"speed_{i}", model=model), info, False, force=True)
                for i, (name, model) in enumerate(configs.items())}
    batches = {name: iter(tr.loader) for name, tr in trainers.items()}
    wall, cpu = {name: [] for name in trainers}, {name: [] for name in trainers}
    names = list(trainers)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            tr = trainers[name]
            w0, c0 = time.perf_counter(), time.thread_time()
            train_step(tr, batches[name], tr.task.loss)
            if r >= warmup:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.thread_time() - c0)
    tokens = base.train.batch_size * base.data.seq_len
    return {name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name]),
                   "tokens_per_step": tokens} for name in names}


def format_speed(result: dict) -> str:
    lines = ["| model | step, wall (median) | tokens/s, wall | step, CPU (median) | tokens/s, CPU | vs baseline (CPU) |",
             "|---|---:|---:|---:|---:|---:|"]
    ref = result["baseline"]["cpu_s"]
    for name, r in result.items():
        tok = r["tokens_per_step"]
        lines.append(f"| {name} | {1000 * r['wall_s']:.1f} ms | {tok / r['wall_s']:,.0f} | {1000 * r['cpu_s']:.1f} ms "
                     f"| {tok / r['cpu_s']:,.0f} | {100 * (ref / r['cpu_s'] - 1):+.1f}% |")
    return "\n".join(lines)


def _spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    return format(mean, fmt) + (f" ± {format(statistics.stdev(values), fmt)}" if len(values) > 1 else "")


def format_table(rows: list[dict], summary: dict) -> str:
    lines = ["| model | compute params | table params | train FLOPs/token | knowledge loss | general loss | "
             "fact accuracy | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        mine = [r for r in rows if r["model"] == name]
        lines.append(f"| {name} | {s['compute']:,} | {s['table']:,} | {s['train_flops']:,.0f} | "
                     f"{_spread([r['knowledge_loss'] for r in mine], '.4f')} | "
                     f"{_spread([r['general_loss'] for r in mine], '.4f')} | "
                     f"{_spread([100 * r['fact_accuracy'] for r in mine], '.1f')}% | "
                     f"{_spread([r['tokens_per_second'] for r in mine], ',.0f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", type=int, nargs="*", default=[2_000, 8_000, 32_000], help="rows per table")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="train the model without a memory too (--no-baseline: the tables only)")
    ap.add_argument("--entities", type=int, default=100, help="people in the knowledge base (6 facts each)")
    ap.add_argument("--general-docs", type=int, default=1500, help="general-text training documents")
    ap.add_argument("--d-model", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--out", default="runs/bench_engram")
    ap.add_argument("--quick", action="store_true", help="a small corpus, 6 steps, one seed: a smoke run")
    ap.add_argument("--speed", type=int, default=0, metavar="ROUNDS",
                    help="time ROUNDS interleaved training steps of every model (no training runs, no evaluation)")
    ap.add_argument("--result", default="engram.json", help="the result file's name under --out")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="print the table of these result files' rows together")
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        summary = {name: s for part in parts for name, s in part["models"].items()}
        print(f"{parts[0]['steps']} steps, seeds {sorted({r['seed'] for r in rows})}\n")
        print(format_table(rows, summary))
        return
    if args.quick:
        args.steps, args.seeds, args.rows, args.entities, args.general_docs = 6, [0], [500, 2000, 8000], 30, 200

    import torch

    from slmforge.config import load_config
    from slmforge.plan import count_params, flops_per_token
    from slmforge.runs import write_json

    out = Path(args.out)
    build_corpus(out, args.entities, args.general_docs)
    base = load_config(RECIPES / "families_cpu.yaml", [
        f"out_dir={out}", f"data.shards_dir={out / 'shards'}", f"data.tokenizer={out / 'tokenizer.json'}",
        f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 10)}", "train.batch_size=16", "data.seq_len=128",
        "train.eval_batches=8"])
    configs = models(args.d_model, args.layers, args.rows, args.baseline)
    if args.speed:
        result = speed(base, configs, args.speed)
        write_json(out / "engram_speed.json", {"rounds": args.speed, "models": result})
        print(f"\n{args.speed} rounds, {base.train.batch_size} x {base.data.seq_len} tokens a step, "
              f"{torch.get_num_threads()} threads\n")
        print(format_speed(result))
        return
    # Seeds interleaved (baseline, engram, ...) so that a machine slowing down affects every model alike.
    rows = [run_one(name, model, base, seed, out, args.entities) for seed in args.seeds
            for name, model in configs.items()]
    summary = {name: {"compute": count_params(m).non_embedding, "table": count_params(m).table,
                      "total": count_params(m).total, "train_flops": flops_per_token(m, 128)["train"]}
               for name, m in configs.items()}
    write_json(out / args.result, {"steps": args.steps, "seeds": args.seeds, "entities": args.entities,
                                     "models": summary, "rows": rows})
    print(f"\n{args.steps} steps x {base.train.batch_size} x {base.data.seq_len} tokens each "
          f"({rows[0]['tokens']:,} tokens), seeds {args.seeds}, {args.entities} people x 6 facts\n")
    print(format_table(rows, summary))
    print(f"\nwrote {out / args.result}")


if __name__ == "__main__":
    main()
