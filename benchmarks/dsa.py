"""DeepSeek sparse attention (``model.layers=dsa``) against dense attention: long-sequence cost and short-run quality.

1. Cost: one batch-1 forward + backward (loss, all gradients, the indexer's KL included) of ``benchmarks/memory.py``'s
   model (d_model 256, 3 layers, fp32) with dense attention and with DSA in sparse mode at each ``--ks``, at each
   ``--lengths`` (4k, 8k, 16k tokens): step seconds and peak memory above the model, each point in a fresh process
   (``memory.measure``). Sparse attention reads T * k keys and keeps (T, k) indices; its indexer still scores all
   T^2 / 2 pairs, at index_heads * index_dim per pair instead of the attention's heads * head_dim.
2. Quality at equal tokens, on ``recipes/families_cpu.yaml``'s data and schedule: dense attention for ``--steps`` steps,
   against one DSA run (``recipes/dsa_cpu.yaml``) whose first ``--warmup`` steps are dense (``dsa.dense_steps``: the
   indexer learns the attention's distribution by KL), the rest sparse. Reported: validation loss of each, its gap to
   dense, and the indexer's recall of the full attention's top-k keys on held-out (validation) text after the warm-up
   and at the end, per layer, by count and by attention mass. Finished runs are reused (``--retrain``).
Writes ``--name``.json (dsa.json) to ``--out``. Never run in CI. Example: ``python benchmarks/dsa.py`` (``--quick``:
a smoke run; ``--skip-cost --name dsa_tau1 --set model.dsa.kl_temperature=1``: the recipe with the paper's KL).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import bench_config, measure  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
from layouts import base_config  # noqa: E402  (the families_cpu corpus every model comparison trains on)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def cost_rows(lengths: list[int], ks: list[int]) -> list[dict]:
    rows = []
    for t in lengths:
        dense = bench_config("attn", t)
        variants = [("dense attention", 0, dense)]
        for k in ks:
            dsa = dataclasses.replace(dense, layers="dsa", dsa=dataclasses.replace(dense.dsa, top_k=k, mode="sparse"))
            variants.append((f"dsa k={k}", k, dsa))
        for name, k, cfg in variants:
            m = measure(cfg, t)
            rows.append({"model": name, "top_k": k, "tokens": t, "seconds": m.get("seconds"),
                         "peak_bytes": m.get("peak_bytes"), "error": m.get("error")})
            print(_cost_line(rows[-1]), flush=True)
    return rows


def _cost_line(r: dict) -> str:
    if r["error"]:
        return f"| {r['model']} | {r['tokens']:,} | - | {r['error']} |"
    return f"| {r['model']} | {r['tokens']:,} | {r['seconds']:.2f} | {r['peak_bytes'] / 2**20:,.0f} MiB |"


def train_run(base, name: str, model, steps: int, ckpt_every: int = 0, retrain: bool = False) -> dict:
    from slmforge.train.loop import train

    data = dataclasses.replace(base.data, shards_dir=str(base.run_dir / "shards"),
                               tokenizer=str(base.run_dir / "tokenizer.json"))
    t = dataclasses.replace(base.train, max_steps=steps, eval_every=steps, ckpt_every=ckpt_every or steps,
                            warmup_steps=max(1, steps // 10), keep_checkpoints=0)
    cfg = dataclasses.replace(base, name=name, model=model, data=data, train=t)
    done = cfg.run_dir / "train_result.json"
    if done.exists() and not retrain and _same_model(cfg):  # a finished run is reused (--retrain: trained again)
        import json

        result = json.loads(done.read_text())
        tokens, val_loss, tps = result["tokens"], result["val_loss"], result["tokens_per_second"]
    else:
        result = train(cfg, force=True)
        tokens, val_loss, tps = result.tokens, result.val_loss, result.tokens_per_second
    return {"run": name, "steps": steps, "tokens": tokens, "val_loss": val_loss, "tokens_per_second": tps,
            "run_dir": str(cfg.run_dir)}



def _same_model(cfg) -> bool:
    """The finished run in cfg.run_dir trained this model config (a changed recipe trains it again)."""
    from slmforge.config import load_config

    saved = load_config(cfg.run_dir / "config.yaml").model
    if "dsa" not in str(cfg.model.layers):  # the dsa keys do not shape an attention-only model
        saved = dataclasses.replace(saved, dsa=cfg.model.dsa)
    return saved == cfg.model


def held_out_recall(checkpoint: str, shard_dir: Path, seq_len: int, k: int, num_rows: int = 16) -> dict:
    """Per DSA layer: the indexer's recall of the attention's top-k keys on ``num_rows`` validation rows, by count
    and by attention mass (``indexer_recall``)."""
    import numpy as np
    import torch

    from slmforge.checkpoint import load_for_inference
    from slmforge.model.dsa import DSA, indexer_recall
    from slmforge.tokens.shards import load_shards

    model, _, _ = load_for_inference(checkpoint, "cpu")
    stream = np.asarray(load_shards(shard_dir).tokens)
    rows = min(num_rows, len(stream) // seq_len)
    tokens = torch.as_tensor(stream[: rows * seq_len].astype(np.int64)).view(rows, seq_len)
    inputs: dict[int, torch.Tensor] = {}
    layers = [(i, b.mixer) for i, b in enumerate(model.layers()) if isinstance(b.mixer, DSA)]
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0])) for i, m in layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return {"count": [indexer_recall(m, inputs[i], k) for i, m in layers],
            "mass": [indexer_recall(m, inputs[i], k, mass=True) for i, m in layers]}


def quality(out: Path, steps: int, warmup: int, quick: bool, name: str = "dsa", overrides: list[str] = (),
            retrain: bool = False) -> dict:
    from slmforge.config import load_config
    from slmforge.pipeline import prepare

    base = base_config(out, steps, quick)
    prepare(base)  # the corpus, tokenizer and shards every run trains on
    dsa_model = load_config(RECIPES / "dsa_cpu.yaml", [f"model.dsa.dense_steps={warmup}", *overrides]
                            + (["model.dsa.top_k=16"] if quick else [])).model
    dense_model = dataclasses.replace(dsa_model, layers="attn")
    runs = {"dense": train_run(base, "dense", dense_model, steps, retrain=retrain),
            name: train_run(base, name, dsa_model, steps, ckpt_every=warmup, retrain=retrain)}
    val = base.run_dir / "shards" / "validation"
    k, t = dsa_model.dsa.top_k, base.data.seq_len
    dsa_dir = Path(runs[name]["run_dir"])
    recall = {"after warm-up": held_out_recall(str(dsa_dir / "checkpoints" / f"step_{warmup:06d}"), val, t, k),
              "at the end": held_out_recall(str(dsa_dir), val, t, k)}
    gap = runs[name]["val_loss"] / runs["dense"]["val_loss"] - 1
    return {"top_k": k, "seq_len": t, "warmup": warmup, "runs": runs, "recall": recall, "val_loss_gap": gap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--ks", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--warmup", type=int, default=400, help="DSA's dense warm-up steps (dsa.dense_steps)")
    ap.add_argument("--out", default="runs/bench_dsa")
    ap.add_argument("--quick", action="store_true", help="512/1024 tokens, k 16/32, a tiny corpus, 6 steps")
    ap.add_argument("--skip-cost", action="store_true", help="only the quality runs")
    ap.add_argument("--retrain", action="store_true", help="train the quality runs again even if they finished")
    ap.add_argument("--name", default="dsa", help="the DSA quality run's folder under --out")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of recipes/dsa_cpu.yaml for the DSA run, e.g. model.dsa.kl_temperature=1")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.ks, args.steps, args.warmup = [512, 1024], [16, 32], 6, 3

    from slmforge.runs import write_json

    out = Path(args.out)
    costs = []
    if not args.skip_cost:
        print("| model | tokens | step s (fwd+bwd) | peak memory |\n|---|---:|---:|---:|", flush=True)
        costs = cost_rows(args.lengths, args.ks)
    q = quality(out, args.steps, args.warmup, args.quick, args.name, args.set, args.retrain or args.quick)
    write_json(out / f"{args.name}.json", {"cost": costs, "quality": q})
    r = q["runs"]
    print(f"\nequal tokens ({r['dense']['tokens']:,}), top_k {q['top_k']} of {q['seq_len']}-token rows; DSA: "
          f"{q['warmup']} dense warm-up steps, then sparse, in one run:\n| run | steps | val loss | tokens/s |\n"
          "|---|---:|---:|---:|")
    for name, row in r.items():
        print(f"| {name} | {row['steps']} | {row['val_loss']:.4f} | {row['tokens_per_second']:,.0f} |")
    print(f"\nDSA vs dense validation loss: {100 * q['val_loss_gap']:+.2f}%\n\nindexer recall of the attention's "
          f"top-{q['top_k']} keys on held-out rows, per layer (by count; by attention mass):\n| when | by count | "
          "mean | by mass | mean |\n|---|---|---:|---|---:|")
    for when, rec in q["recall"].items():
        c, m = rec["count"], rec["mass"]
        print(f"| {when} | {', '.join(f'{x:.3f}' for x in c)} | {sum(c) / len(c):.3f} | "
              f"{', '.join(f'{x:.3f}' for x in m)} | {sum(m) / len(m):.3f} |")
    print(f"wrote {out / (args.name + '.json')}")


if __name__ == "__main__":
    main()
