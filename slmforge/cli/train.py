"""Planning, training and training-science subcommands: plan, info, run, mix, forecast, anneal, train."""

from __future__ import annotations

import json
import os

from slmforge.cli.common import config_args, dry_run, load
from slmforge.config import merge, parse_overrides


def cmd_plan(args) -> None:
    from slmforge.plan import PlanConfig, format_plan, format_presets, plan

    if args.presets:
        print(format_presets())
        return
    print(format_plan(plan(merge(PlanConfig(), parse_overrides(args.overrides), where="plan"))))


def cmd_info(args) -> None:
    from slmforge.info import format_info, info, load_model_config

    print(format_info(info(load_model_config(args.config, args.overrides))))


def cmd_train(args) -> None:
    from slmforge.train.loop import train

    from slmforge.train.distributed import shutdown

    cfg = load(args)
    if args.dry_run:
        return dry_run(cfg)
    result = train(cfg, resume=args.resume)
    shutdown()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(result)


def cmd_run(args) -> None:
    from slmforge.pipeline import run

    cfg = load(args)
    if args.dry_run:
        return dry_run(cfg)
    run(cfg)


def cmd_mix(args) -> None:
    from slmforge.science import MixConfig, load_config, mix

    result = mix(load_config(MixConfig, args.recipe, args.overrides))
    print(json.dumps({k: result[k] for k in ("best_grid", "predicted_optimum", "plot")}, indent=2))


def cmd_forecast(args) -> None:
    from slmforge.science import ForecastConfig, forecast, load_config

    result = forecast(load_config(ForecastConfig, args.recipe, args.overrides))
    print(json.dumps({k: result[k] for k in ("target", "plot")}, indent=2))


def cmd_anneal(args) -> None:
    from slmforge.science import anneal_ablation

    print(json.dumps(anneal_ablation(load(args))["difference_anneal_minus_constant"], indent=2))


def register(sub) -> None:
    p = sub.add_parser("plan", help="compute-optimal size, FLOPs, time and memory for a budget")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. gpu_hours=100 gpu=h100 num_gpus=8")
    p.add_argument("--presets", action="store_true", help="list the model presets with exact parameter counts")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("info", help="parameters (total, non-embedding, shared) and decoding-state bytes at 4k/16k")
    p.add_argument("config", help="a preset name (tiny, 10m, ..., 1b) or a recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model keys, e.g. model.layers=attn,ssm")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("run", help="data -> tokenizer -> shards -> train -> eval -> samples -> report")
    config_args(p, recipe_positional=True)
    p.set_defaults(fn=cmd_run)

    for name, fn, what in (
            ("mix", cmd_mix, "proxy runs at several mixture ratios, a fitted mixture law and its optimum"),
            ("forecast", cmd_forecast, "runs at several scales, a fitted L(N) and the target size's predicted loss"),
            ("anneal", cmd_anneal, "the same run with and without its anneal-stage mix, compared")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--config", dest="recipe", required=True, help=f"recipe YAML (e.g. recipes/{name}_cpu.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. base.train.max_steps=100")
        p.set_defaults(fn=fn)

    p = sub.add_parser("train", help="train on existing token shards (data.shards_dir)")
    config_args(p)
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint")
    p.set_defaults(fn=cmd_train)

