"""Planning, training and training-science subcommands: plan, info, run, mix, forecast, anneal, train."""

from __future__ import annotations

import json
import math
import os

from slmforge.cli.common import config_args, dry_run, load_args, load_run

MIX, FORECAST = "slmforge.science.mixture_law:MixConfig", "slmforge.science.scaling:ForecastConfig"


def main_recipe(args):
    """The MainConfig of ``args.recipe`` when it is a main-build recipe (``kind: main``), else None."""
    from slmforge.config import load, read_yaml

    recipe = getattr(args, "recipe", None)
    if not (recipe and recipe.endswith((".yaml", ".yml")) and os.path.isfile(recipe)):
        return None
    if read_yaml(recipe).get("kind") != "main":
        return None
    from slmforge.course import MainConfig

    return load(MainConfig, recipe, args.overrides)


def cmd_plan(args) -> None:
    from slmforge.plan import format_plan, format_presets, plan

    if args.presets:
        return print(format_presets())
    main = main_recipe(args)
    if main is not None:
        from slmforge.course import format_main_schedule, main_schedule

        return print(format_main_schedule(main_schedule(main)))
    print(format_plan(plan(load_args(args))))


def cmd_info(args) -> None:
    from slmforge.info import format_info, format_kernels, info, kernels, load_model_config
    from slmforge.model.block import check_model

    if args.config is None and not args.kernels:
        raise ValueError("give a preset (tiny, 10m, ...), a recipe YAML or a run folder (or --kernels)")
    cfg = load_model_config(args.config or "10m", args.overrides)
    check_model(cfg)
    print(format_kernels(kernels(cfg)) if args.kernels else format_info(info(cfg)))


def cmd_train(args) -> None:
    from slmforge.train.distributed import shutdown
    from slmforge.train.loop import train

    cfg = load_run(args)
    if args.dry_run:
        return dry_run(cfg)
    result = train(cfg, resume=args.resume, force=args.force)
    shutdown()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(format_result(result))


def format_result(r) -> str:
    """A finished training run (``RunResult``) in three lines: the work, the final losses, where it is."""
    def loss(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.3f}"

    return (f"trained {r.steps:,} steps, {r.tokens:,} tokens, {r.num_params:,} parameters in {r.seconds:.1f} s "
            f"({r.tokens_per_second:,.0f} tokens/s)\n"
            f"final loss: train {loss(r.train_loss)}, validation {loss(r.val_loss)} "
            f"({loss(r.val_bits_per_byte)} bits/byte)\n"
            f"run folder: {r.run_dir} (try: slmforge generate {r.run_dir} prompt=\"...\")")


def cmd_run(args) -> None:
    from slmforge.pipeline import run

    main = main_recipe(args)
    if main is not None:
        from slmforge.course import format_main_schedule, main_schedule, run_main

        if args.dry_run:
            return print(format_main_schedule(main_schedule(main)))
        results = run_main(main, force=args.force)
        return print(f"report: {results['report']['report_md']}")
    cfg = load_run(args)
    if args.dry_run:
        return dry_run(cfg)
    run(cfg, force=args.force)


def _science_config(args):
    from slmforge.model.block import check_model

    cfg = load_args(args)
    check_model(cfg.base.model)
    return cfg


def cmd_mix(args) -> None:
    from slmforge.science import mix

    result = mix(_science_config(args))
    print(json.dumps({k: result[k] for k in ("best_grid", "predicted_optimum", "plot")}, indent=2))


def cmd_forecast(args) -> None:
    from slmforge.science import forecast

    result = forecast(_science_config(args))
    keys = ("target", "over_seeds", "seed_mean", "recommended", "plot")
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=2))


def cmd_anneal(args) -> None:
    from slmforge.science import anneal_ablation

    print(json.dumps(anneal_ablation(load_run(args))["difference_anneal_minus_constant"], indent=2))


def register(sub) -> None:
    p = sub.add_parser("plan", help="compute-optimal size, FLOPs, time and memory for a budget (with --config "
                       "MAIN_RECIPE: the main build's schedule, stage by stage, on 1, 8 and 64 GPUs)")
    config_args(p, "slmforge.plan:PlanConfig")
    p.add_argument("--presets", action="store_true", help="list the model presets with exact parameter counts")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("info", help="parameters (total, non-embedding, shared) and decoding-state bytes at 4k/16k")
    p.add_argument("config", nargs="?", help="a preset name (tiny, 10m, ..., 1b), a recipe YAML or a run folder")
    config_args(p, "slmforge.config:ModelConfig", recipe=None)
    p.add_argument("--kernels", action="store_true", help="instead: the float32 CPU matmul kernel each path uses on "
                   "this machine for the model's shapes (10m without a config), measured or forced, and why")
    p.set_defaults(fn=cmd_info, config_prefix="model.")

    p = sub.add_parser("run", help="data -> tokenizer -> shards -> train -> eval -> samples -> report")
    config_args(p, "slmforge.config:RunConfig", recipe="positional", dry_run=True)
    p.add_argument("--force", action="store_true", help="on an existing run whose config changed a key that built "
                   "stages depend on: delete their outputs and rebuild them (without it, the run is refused)")
    p.set_defaults(fn=cmd_run)

    for name, fn, cls, what in (
            ("mix", cmd_mix, MIX, "proxy runs at several mixture ratios, a fitted mixture law and its optimum"),
            ("forecast", cmd_forecast, FORECAST, "runs at several scales, a fitted L(N) and the target's loss"),
            ("anneal", cmd_anneal, "slmforge.config:RunConfig", "the same run with and without its anneal mix")):
        p = sub.add_parser(name, help=what)
        config_args(p, cls)
        p.set_defaults(fn=fn)

    p = sub.add_parser("train", help="train on existing token shards (data.shards_dir)")
    config_args(p, "slmforge.config:RunConfig", dry_run=True)
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint that verifies "
                   "(key=value items may follow it, e.g. --resume train.max_steps=2000)")
    p.add_argument("--force", action="store_true", help="on a run folder that already has checkpoints or metrics: "
                   "delete them and train from step 0 (without it, or --resume, the run is refused)")
    p.set_defaults(fn=cmd_train)
    _intermixed(p)


def _intermixed(p) -> None:
    """Let ``key=value`` items come before and after the flags (``--config X a=1 --resume b=2``): argparse fills a
    ``nargs="*"`` positional from one run of arguments only, unless it parses them intermixed."""
    plain, inside = p.parse_known_args, []

    def parse_known_args(args=None, namespace=None):
        if inside:  # parse_known_intermixed_args calls parse_known_args itself
            return plain(args, namespace)
        inside.append(True)
        try:
            return p.parse_known_intermixed_args(args, namespace)
        finally:
            inside.clear()

    p.parse_known_args = parse_known_args
