"""Every token-mixer layout and sharing variant trained the same way: parameters, validation loss, speed, memory.

Each layout takes its ``model`` section from its recipe (``recipes/families_cpu.yaml`` for attention,
``recipes/layout_*.yaml``, ``recipes/sharing_*.yaml``); everything else (data, batch, sequence length, steps,
schedule, seed) comes from ``recipes/families_cpu.yaml`` with ``--steps``, so all train on the same token shards (built
once under ``--out``) for the same number of tokens. Reported per layout: parameters (total and shared), validation
loss at the end, training tokens/s, and the peak memory of one forward + backward of a 4k-token sequence
(``benchmarks/memory.py``'s ``measure``, a fresh process each). Prints a markdown table and writes layouts.json.
Never run in CI. Example: ``python benchmarks/layouts.py`` (``--quick`` for a smoke run of a few tiny steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measure  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LAYOUTS = {
    "attention": "families_cpu.yaml", "ssm": "layout_ssm.yaml", "linear": "layout_linear.yaml",
    "hybrid": "layout_hybrid.yaml", "hymba": "layout_hymba.yaml", "shared FFN": "sharing_ffn.yaml",
    "block repeat x2": "sharing_repeat.yaml", "OpenELM scaling": "sharing_openelm.yaml",
}


def base_config(out: Path, steps: int, quick: bool):
    from slmforge.config import load_config

    overrides = [f"out_dir={out}", "name=data", f"train.max_steps={steps}", f"train.eval_every={steps}",
                 f"train.ckpt_every={steps}", f"train.warmup_steps={max(1, steps // 10)}"]
    if quick:
        overrides += ["data.num_train_docs=400", "data.num_val_docs=40", "data.num_test_docs=40",
                      "data.seq_len=64", "train.batch_size=4", "train.eval_batches=2"]
    return load_config(RECIPES / "families_cpu.yaml", overrides)


def run_layout(name: str, base, memory_tokens: int) -> dict:
    from slmforge.config import load_config
    from slmforge.plan import count_params
    from slmforge.train.loop import train

    model = load_config(RECIPES / LAYOUTS[name]).model
    data = dataclasses.replace(base.data, shards_dir=str(base.run_dir / "shards"),
                               tokenizer=str(base.run_dir / "tokenizer.json"))
    cfg = dataclasses.replace(base, name=name.replace(" ", "_"), model=model, data=data)
    result = train(cfg)
    n = count_params(model)
    mem = measure(dataclasses.replace(model, max_seq_len=memory_tokens), memory_tokens)
    return {"layout": name, "recipe": LAYOUTS[name], "layers": model.layers, "params": n.total,
            "shared_params": n.shared, "tokens": result.tokens, "val_loss": result.val_loss,
            "tokens_per_second": result.tokens_per_second, "peak_bytes_fwd_bwd": mem.get("peak_bytes"),
            "memory_error": mem.get("error")}


def format_table(rows: list[dict], memory_tokens: int) -> str:
    lines = [f"| layout | parameters (shared) | val loss | tokens/s | peak fwd+bwd at {memory_tokens:,} tokens |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        mem = r["memory_error"] or f"{r['peak_bytes_fwd_bwd'] / 2**20:,.0f} MiB"
        lines.append(f"| {r['layout']} | {r['params']:,} ({r['shared_params']:,}) | {r['val_loss']:.3f} | "
                     f"{r['tokens_per_second']:,.0f} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--memory-tokens", type=int, default=4096)
    ap.add_argument("--out", default="runs/bench_layouts")
    ap.add_argument("--quick", action="store_true", help="small corpus, 64-token rows, 4 steps: a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.memory_tokens = 4, 256

    from slmforge.pipeline import prepare
    from slmforge.runs import write_json

    out = Path(args.out)
    base = base_config(out, args.steps, args.quick)
    prepare(base)  # the corpus, tokenizer and shards every layout trains on
    rows = [run_layout(name, base, args.memory_tokens) for name in args.layouts]
    write_json(out / "layouts.json", {"steps": args.steps, "batch_size": base.train.batch_size,
                                      "seq_len": base.data.seq_len, "rows": rows})
    print(f"\n{args.steps} steps x {base.train.batch_size} x {base.data.seq_len} tokens each "
          f"({rows[0]['tokens']:,} tokens), recipes/families_cpu.yaml's data and schedule\n")
    print(format_table(rows, args.memory_tokens))
    print(f"\nwrote {out / 'layouts.json'}")


if __name__ == "__main__":
    main()
