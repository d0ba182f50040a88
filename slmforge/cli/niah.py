"""Long-context subcommands: ``niah train RUN`` (NIAH training into a new run folder) and ``niah run RECIPE``
(base run -> NIAH stages -> the recall grid). ``eval niah`` lives with the other evaluations (``cli/model.py``)."""

from __future__ import annotations

import dataclasses

from slmforge.cli.common import config_args, dry_run, load_args, run_flags


def cmd_niah_train(args) -> None:
    from slmforge.cli.train import format_result
    from slmforge.config import dump_yaml
    from slmforge.post.niah import niah_config, niah_train

    cfg, ncfg = niah_config(args.run_dir, args.overrides)
    if args.dry_run:
        print(dump_yaml(ncfg))
        return dry_run(cfg)
    print(format_result(niah_train(cfg, ncfg, args.run_dir, resume=args.resume, force=args.force)))


def cmd_niah_run(args) -> None:
    from slmforge.config import load
    from slmforge.eval.niah import NiahEvalConfig, evaluate
    from slmforge.pipeline import run
    from slmforge.post.niah import niah_chain, stage_overrides

    recipe = load_args(args)
    base = dataclasses.replace(recipe.base, name=recipe.name, out_dir=recipe.out_dir)
    run(base)
    last = niah_chain(base.run_dir, recipe.stages)
    print_grid(evaluate(last, load(NiahEvalConfig, None, stage_overrides(recipe.eval))))


def print_grid(result: dict) -> None:
    for length, row in result["lengths"].items():
        print(f"{int(length):>7,} tokens: recall {row['recall']:.1%} (lowest depth {row['min_recall']:.1%}), "
              f"{row['seconds_per_sample']:.2f} s/sample, {row['peak_mb']:,.0f} MB peak, "
              f"{row['state_mb']:,.1f} MB decoding state")


def register(sub) -> None:
    group = sub.add_parser("niah", help="long context: needle-in-a-haystack training (train, run)")
    kinds = group.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("train", help="train a run on needle-in-a-haystack samples into <RUN>_niah",
                         description="NIAH keys (lengths, length_steps, tokens_per_step, lm_weight, init, haystack, "
                         "kinds, ...) and any run key (train.max_steps=..., model.attn.rope_scaling=yarn, name=...).")
    p.add_argument("run_dir", help="the trained run folder to start from (init=scratch: its model and tokenizer)")
    run_flags(p)
    config_args(p, "slmforge.post.niah:NiahTrainConfig", recipe=None, dry_run=True)
    p.set_defaults(fn=cmd_niah_train)
    p = kinds.add_parser("run", help="a NIAH recipe: base run, NIAH stages, the recall grid",
                         description="Train the recipe's base run (`slmforge run`), its NIAH stages each from the "
                         "one before, then score the last with `eval niah`; finished parts are skipped.")
    config_args(p, "slmforge.post.niah:NiahRecipe", recipe="positional")
    p.set_defaults(fn=cmd_niah_run)
