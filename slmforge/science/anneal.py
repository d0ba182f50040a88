"""``anneal_ablation(cfg)``: a recipe with an anneal stage against the same run without the anneal mix.

The control keeps everything (tokens, stage budgets, the WSD decay aligned with the anneal stage through
``train.anneal_stage``) but trains its anneal stage on the mix of the stage before it. Both runs share data and
tokenizer (``science.sweep``); the report compares validation loss (overall and per source), the loss at the
start and end of the anneal stage, and accuracy on held-out procedural arithmetic (``eval.gsm8k``,
``data=procedural`` problems, scored as lm-eval's gsm8k task).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from slmforge.config import RunConfig
from slmforge.corpus import shard_dirs
from slmforge.eval.gsm8k import GSM8KConfig, evaluate
from slmforge.metrics import tokens_per_step
from slmforge.runs import RunDir, write_json
from slmforge.science.sweep import SHARED, mean_and_stderr, run_sweep, share_data, with_run


def anneal_ablation(cfg: RunConfig, gsm8k: GSM8KConfig | None = None, eval_batches: int = 20,
                    problems: Path | None = None) -> dict:
    """Train ``cfg`` and its constant-mix control under <out_dir>/<name>/; return and write anneal.json.

    ``gsm8k``: how to score arithmetic (its ``data`` and ``out_dir`` are set here); the default is zero-shot on
    200 problems with 128 new tokens, which fits a 256-token context. ``problems``: the held-out problems' JSONL;
    by default the test split of the corpus built here (a ``cfg`` whose shards were built elsewhere names it).
    """
    stages = cfg.data.mixture.stages
    names = [s.name for s in stages]
    if cfg.train.anneal_stage not in names[1:]:
        raise ValueError(f"anneal_ablation: train.anneal_stage={cfg.train.anneal_stage!r} must name a mixture "
                         f"stage after the first; stages: {names}")
    k = names.index(cfg.train.anneal_stage)
    sweep_dir = Path(cfg.out_dir) / cfg.name
    base = share_data(cfg, sweep_dir)
    control_stages = [*stages[:k], dataclasses.replace(stages[k], weights=stages[k - 1].weights), *stages[k + 1:]]
    control = with_run(base, sweep_dir, "constant")
    control = dataclasses.replace(control, data=dataclasses.replace(
        control.data, mixture=dataclasses.replace(control.data.mixture, stages=control_stages)))
    shards = shard_dirs(base)
    eval_shards = {"validation": shards["validation"],
                   **{f"{n}/validation": shards[f"{n}/validation"] for n in base.data.sources}}
    runs = run_sweep([with_run(base, sweep_dir, "anneal"), control], eval_shards, eval_batches)
    # The problems are the shared corpus' held-out arithmetic; zero-shot fits the tiny models' context.
    problems = problems or RunDir.at(sweep_dir / SHARED).split_data("test")
    gsm8k = gsm8k or GSM8KConfig(num_fewshot=0, limit=200, max_new_tokens=128)
    out = {}
    for r in runs:
        run = RunDir.of(r.cfg)
        gsm = evaluate(run.root, dataclasses.replace(gsm8k, data=str(problems),
                                                     out_dir=str(run.eval_output("arithmetic"))))
        out[r.cfg.name] = {
            "val_loss": {key: mean_and_stderr(v)[0] for key, v in r.eval_losses.items()},
            "stages": r.report.get("stages"),
            "arithmetic_accuracy": {f: m["exact_match"] for f, m in gsm["metrics"].items()},
            "arithmetic_problems": gsm["num_problems"],
        }
    a, c = out["anneal"], out["constant"]
    out["difference_anneal_minus_constant"] = {
        "val_loss": {key: a["val_loss"][key] - c["val_loss"][key] for key in a["val_loss"]},
        "arithmetic_accuracy": {f: a["arithmetic_accuracy"][f] - c["arithmetic_accuracy"][f]
                                for f in a["arithmetic_accuracy"]},
    }
    out["tokens"] = runs[0].report["train"]["tokens"]
    budgets = cfg.data.mixture.budgeted(cfg.train.max_steps * tokens_per_step(cfg))
    out["stages"] = [{"name": s.name, "tokens": s.tokens} for s in budgets.stages]
    write_json(sweep_dir / "anneal.json", out)
    return out
