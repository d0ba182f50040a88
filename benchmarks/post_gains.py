"""What post-training buys, measured: base vs SFT vs SFT+ORPO (and DPO) on held-out problems, over seeds.

    python benchmarks/post_gains.py [--base runs/post_cpu] [--seeds 0 1 2] [--limit 300] [--hh PATH] [--dpo]
    python benchmarks/post_gains.py --variant replay --orpo replay=0.25    # ORPO with pre-training windows

The base run is the recipe's own (``slmforge run recipes/post_cpu.yaml`` trains it; this script reuses it and
the recipe's ``post`` settings, read from ``--recipe``). For each seed (``train.seed``: the SFT and ORPO data
order and the on-policy samples) it runs SFT from the base and ORPO on verified pairs from that SFT model
(``<base>_s<seed>_sft``, ``..._orpo``; seed 0 is the recipe's own ``<base>_sft``), resuming whatever is
finished, then prints one table:

- accuracy: procedural arithmetic held out (the base corpus's test split, never trained on), the GSM8K scorer's
  strict match (the ``#### N`` line), 0-shot, greedy; the base model is asked in its pre-training format, the
  others in the chat template;
- reward accuracy and margin on held-out pairs: the verified pairs held out of the seed's ORPO run
  (``val_fraction``), scored for the SFT model before and the ORPO model after; with ``--hh``, HH-RLHF pairs
  (held out by prompt hash) through an ORPO run on the HH-RLHF training split (seed 0 only);
- the alignment tax: validation loss on the base corpus (its validation shards) before and after.

Writes ``<base>/post_gains.json`` (``post_gains_<variant>.json``). CPU, minutes per seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slmforge.checkpoint import load_for_inference  # noqa: E402
from slmforge.config import load_config  # noqa: E402
from slmforge.eval.gsm8k import GSM8KConfig, evaluate_model  # noqa: E402
from slmforge.metrics import evaluate_loss  # noqa: E402
from slmforge.post.prefs import hh_rlhf_pairs, read_pairs, split_pairs  # noqa: E402
from slmforge.post.run import finetune_config, post_train  # noqa: E402
from slmforge.post.tasks import evaluate_pairs  # noqa: E402
from slmforge.runs import RunDir  # noqa: E402
from slmforge.tokens.shards import TokenLoader  # noqa: E402


def stage_keys(recipe: str, method: str) -> list[str]:
    """The recipe's own settings for this post stage (its ``post`` entry), as key=value items."""
    cfg = load_config(recipe)
    stage = next(s for s in cfg.post if s.method == method)
    keys = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in vars(stage).items()
            if k not in ("name", "train", "method")]
    return keys + [f"train.{k}={v}" for k, v in stage.train.items()]


def train_stage(source: Path, method: str, name: str, seed: int, keys: list[str]) -> Path:
    cfg = finetune_config(source, method, [*keys, f"name={name}", f"train.seed={seed}"])
    run = RunDir.of(cfg)
    done = run.train_result.is_file() and json.loads(run.train_result.read_text())["steps"] >= cfg.train.max_steps
    if not done:
        post_train(cfg, resume=run.checkpoints.is_dir(), progress=False)
    return run.root


def accuracy(run_dir: Path, chat: bool, limit: int) -> float:
    model, tok, _ = load_for_inference(run_dir)
    cfg = GSM8KConfig(data="procedural", num_fewshot=0, chat=chat, limit=limit, batch_size=16)
    return evaluate_model(model, tok, cfg, run_dir, progress=False)["metrics"]["strict-match"]["exact_match"]


def base_loss(run_dir: Path, base: RunDir, batches: int = 40) -> float:
    model, _, cfg = load_for_inference(run_dir)
    loader = TokenLoader(base.split_shards("validation"), cfg.data.seq_len, 16, shuffle=False)
    return evaluate_loss(model, list(itertools.islice(loader, batches)), "cpu")


def held_out_pairs(orpo_dir: Path) -> list:
    cfg = load_config(orpo_dir / "config.yaml")
    return split_pairs(read_pairs(orpo_dir / "pairs" / "verified.jsonl"), cfg.finetune.val_fraction, cfg.data.seed)[1]


def pair_metrics(run_dir: Path, pairs: list, orpo_dir: Path) -> dict:
    model, tok, _ = load_for_inference(run_dir)
    m = evaluate_pairs(model, tok, pairs, load_config(orpo_dir / "config.yaml"))
    return {"reward_accuracy": m["val_reward_accuracy"], "reward_margin": m["val_reward_margin"]}


def one_seed(base: RunDir, recipe: str, seed: int, limit: int, variant: str = "", orpo_keys: tuple = ()) -> dict:
    # Seed 0 is the recipe's own post stages (<base>_sft, <base>_sft_orpo): `slmforge run` may have trained them.
    # A variant trains its own ORPO runs (<sft>_orpo_<variant>) from the same SFT runs, with orpo_keys on top.
    name = f"{base.root.name}_sft" if seed == 0 else f"{base.root.name}_s{seed}_sft"
    sft = train_stage(base.root, "sft", name, seed, stage_keys(recipe, "sft"))
    orpo = train_stage(sft, "orpo", f"{sft.name}_orpo" + (f"_{variant}" if variant else ""), seed,
                       [*stage_keys(recipe, "orpo"), *orpo_keys])
    pairs = held_out_pairs(orpo)
    row = {"seed": seed, "sft_accuracy": accuracy(sft, True, limit), "orpo_accuracy": accuracy(orpo, True, limit),
           "sft_loss": base_loss(sft, base), "orpo_loss": base_loss(orpo, base), "held_out_pairs": len(pairs)}
    row.update({f"sft_{k}": v for k, v in pair_metrics(sft, pairs, orpo).items()})
    row.update({f"orpo_{k}": v for k, v in pair_metrics(orpo, pairs, orpo).items()})
    return row


def hh_rows(base: RunDir, hh: str, limit_pairs: int) -> dict:
    sft = base.root.parent / f"{base.root.name}_sft"
    keys = [f"data=[hh-rlhf:{hh}]", f"num_examples={limit_pairs}", "val_fraction=0.1", "train.max_steps=150",
            "train.batch_size=8", "max_len=256"]
    orpo = train_stage(sft, "orpo", f"{base.root.name}_sft_orpo_hh", 0, keys)
    cfg = load_config(orpo / "config.yaml")
    pairs = split_pairs(hh_rlhf_pairs(hh, limit=limit_pairs)[0], cfg.finetune.val_fraction, cfg.data.seed)[1]
    return {"held_out_pairs": len(pairs), "sft": pair_metrics(sft, pairs, orpo),
            "orpo": pair_metrics(orpo, pairs, orpo), "orpo_loss": base_loss(orpo, base)}


def spread(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/post_cpu")
    ap.add_argument("--recipe", default="recipes/post_cpu.yaml", help="the post stages' settings (its `post` list)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=300, help="held-out problems scored (0 = all)")
    ap.add_argument("--hh", default="", help="an HH-RLHF .jsonl.gz: also ORPO on it, scored on its held-out pairs")
    ap.add_argument("--hh-pairs", type=int, default=1200)
    ap.add_argument("--orpo", nargs="*", default=[], metavar="KEY=VALUE",
                    help="ORPO keys over the recipe's (e.g. replay=0.25), trained as the variant --variant")
    ap.add_argument("--variant", default="", help="name of the ORPO variant (needed with --orpo)")
    args = ap.parse_args()
    if bool(args.orpo) != bool(args.variant):
        sys.exit("--orpo and --variant go together: the variant's ORPO runs are <sft>_orpo_<variant>")
    base = RunDir.at(args.base)
    if not base.train_result.is_file():
        sys.exit(f"{base.root}: no trained base run; train it first: slmforge run recipes/post_cpu.yaml")
    report = {"base_accuracy": accuracy(base.root, False, args.limit), "base_loss": base_loss(base.root, base),
              "variant": {"name": args.variant, "orpo": args.orpo},
              "seeds": [one_seed(base, args.recipe, s, args.limit, args.variant, tuple(args.orpo)) for s in args.seeds]}
    if args.hh:
        report["hh_rlhf"] = hh_rows(base, args.hh, args.hh_pairs)
    rows = report["seeds"]
    print(f"| measurement ({len(rows)} seeds: mean ± sd (each)) | base | SFT | SFT + ORPO |\n|---|---|---|---|")
    print(f"| held-out arithmetic accuracy, 0-shot greedy | {report['base_accuracy']:.3f} | "
          f"{spread(rows, 'sft_accuracy')} | {spread(rows, 'orpo_accuracy')} |")
    for key in ("reward_accuracy", "reward_margin"):
        print(f"| verified pairs held out: {key} | - | {spread(rows, 'sft_' + key)} | {spread(rows, 'orpo_' + key)} |")
    print(f"| base-corpus validation loss | {report['base_loss']:.4f} | {spread(rows, 'sft_loss')} | "
          f"{spread(rows, 'orpo_loss')} |")
    if args.hh:
        h = report["hh_rlhf"]
        print(f"| HH-RLHF held out ({h['held_out_pairs']} pairs): reward accuracy / margin | - | "
              f"{h['sft']['reward_accuracy']:.3f} / {h['sft']['reward_margin']:.4f} | "
              f"{h['orpo']['reward_accuracy']:.3f} / {h['orpo']['reward_margin']:.4f} (ORPO on HH-RLHF) |")
    gain = [r["orpo_accuracy"] - r["sft_accuracy"] for r in rows]
    print(f"\nORPO - SFT accuracy: {statistics.mean(gain) * 100:+.1f} points (per seed: "
          f"{', '.join(f'{g * 100:+.1f}' for g in gain)}); goal +5")
    out = base.root / ("post_gains" + (f"_{args.variant}" if args.variant else "") + ".json")
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
