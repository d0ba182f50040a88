"""FlexOlmo on CPU: a public base, one expert per private data owner's domain of fictional facts, the merge, opt-out.

The base is ``recipes/families_cpu.yaml``'s model trained on public data only (procedural stories, the ``narrative``
family). Three private sources are three data owners with different domains, the disjoint entity sets of
``synth.knowledge.KnowledgeBase(num_sources=3, domains=[medicine, astronomy, finance])``: drugs (condition, form,
side effect, organ), planets (gas, moons, mineral, climate) and companies (sector, product, currency, logo), each
with its own sentences and vocabulary, as separate owners' data would be. Sources written in one style that differ
only in entity names give the router nothing to separate them by: routing is by domain.

Each owner trains its expert (``slmforge flex train``: the base frozen as the anchor expert) on its own biographies
only. Routing (``post/flex.py``): each router row is the domain's mean FFN input under the base, whitened by the
public covariance, with the bias that makes the router pick the nearest domain mean; the router reads the sequence's
running mean of FFN inputs (``--router-input context``, default; ``token``: the token alone), started with 16
pseudo-tokens of the public mean; ``--top-k 1`` (default) trains each expert on the tokens routed to it and merges
with top-1 of anchor + 3 experts, so every token runs one FFN and opting a source out moves only the tokens routed
to it. Experts and merge are named by the router input (``base_<domain>_context``, ``base_flex_context``). ``flex report`` prints the issue's one table: per domain, loss on held-out
documents (new biographies of the same facts; public: held-out stories) and fact accuracy (the true value ranked
first among its attribute's values) for the base, the expert alone, the merged model, the merged model with that
source opted out, the largest change of the other domains' accuracy when it is, and the merged model's routing share
per domain and expert. Writes ``<out>/flexolmo.json``. Never run in CI. Example: ``python benchmarks/flexolmo.py``
(about 30 minutes at 1 thread on a shared 2-core CPU); ``--quick`` for a smoke run of a few tiny steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

DOMAINS = ["medicine", "astronomy", "finance"]
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SIZES = {
    "full": dict(base_steps=250, base_docs=4000, expert_steps=300, entities=120, phrasings=3),
    "quick": dict(base_steps=20, base_docs=600, expert_steps=10, entities=45, phrasings=2),
}


def train_base(out: Path, size: dict) -> Path:
    from slmforge.config import load_config
    from slmforge.pipeline import prepare
    from slmforge.train.loop import train

    steps = size["base_steps"]
    cfg = load_config(RECIPES / "families_cpu.yaml", [
        "name=base", f"out_dir={out}", "data.families=[narrative]", f"data.num_train_docs={size['base_docs']}",
        "data.num_val_docs=100", "data.num_test_docs=100", f"train.max_steps={steps}",
        f"train.eval_every={max(steps // 4, 1)}", f"train.ckpt_every={steps}", "sample_prompts=[]"])
    if not (cfg.run_dir / "train_result.json").is_file():
        prepare(cfg)
        train(cfg, resume=(cfg.run_dir / "checkpoints").is_dir(), progress=False)
    return cfg.run_dir


def source_files(out: Path, kb, source: int) -> list[str]:
    """The source's training biographies, held-out biographies and fact probes, as flex train keys."""
    from slmforge.synth.knowledge import candidates

    files = {"data": out / f"source{source}_train.jsonl", "val_data": out / f"source{source}_validation.jsonl",
             "questions": out / f"source{source}_questions.jsonl"}
    files["data"].write_text("".join(json.dumps({"text": d}) + "\n" for d in kb.documents(source)))
    files["val_data"].write_text("".join(json.dumps({"text": d}) + "\n" for d in kb.validation_documents(source)))
    files["questions"].write_text("".join(json.dumps({"prompt": p, "answer": a, "candidates": candidates(a)}) + "\n"
                                          for p, a in kb.questions(source)))
    return [f"{k}={v}" for k, v in files.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_flexolmo")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few tiny steps")
    ap.add_argument("--seed", type=int, default=0, help="the knowledge base's seed")
    ap.add_argument("--top-k", type=int, default=1, help="experts per token, in expert training and the merge")
    ap.add_argument("--router-input", choices=["token", "context"], default="context",
                    help="route on the token's hidden state or on the sequence's running mean (model.flexmoe)")
    args = ap.parse_args()
    from slmforge.post.flex import flex_configs, flex_train
    from slmforge.post.flex_merge import flex_merge, flex_report, markdown
    from slmforge.synth.knowledge import KnowledgeBase

    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = train_base(out, size)
    kb = KnowledgeBase(size["entities"], num_sources=3, seed=args.seed, num_phrasings=size["phrasings"],
                       domains=DOMAINS)
    experts, timings = [], {"base_s": time.perf_counter() - start}
    for source in kb.sources:
        t0 = time.perf_counter()
        steps = size["expert_steps"]
        keys = [f"source={kb.domains[source]}", *source_files(out, kb, source), f"train.max_steps={steps}",
                f"name=base_{kb.domains[source]}_{args.router_input}", f"model.flexmoe.router_input={args.router_input}",
                f"top_k={args.top_k}", f"train_router={args.top_k != 1}",
                f"train.eval_every={max(steps // 4, 1)}", f"train.ckpt_every={steps}", "train.lr_peak=3e-3",
                "train.batch_size=8", "data.seq_len=128"]  # biographies are ~130 tokens
        flex, cfg = flex_configs(base, keys)
        if not (cfg.run_dir / "train_result.json").is_file():
            flex_train(base, flex, cfg, resume=(cfg.run_dir / "checkpoints").is_dir(), progress=False)
        experts.append(cfg.run_dir)
        timings[f"expert_s{source}_s"] = time.perf_counter() - t0
    shutil.rmtree(out / f"base_flex_{args.router_input}", ignore_errors=True)
    merged = flex_merge(base, experts, name=f"base_flex_{args.router_input}", top_k=args.top_k)
    report = flex_report(merged)
    timings["total_s"] = time.perf_counter() - start
    print(markdown(report), end="")
    print(f"\ntime: {timings['total_s']:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in timings.items())})")
    (out / "flexolmo.json").write_text(json.dumps({**report, "sizes": size, "timings": timings}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
