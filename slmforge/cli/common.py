"""What every subcommand shares: recipe and override arguments, config loading, ``--dry-run``."""

from __future__ import annotations

import argparse

from slmforge.config import dump_yaml, load_config, merge, parse_overrides, read_yaml


def config_args(p: argparse.ArgumentParser, recipe_positional: bool = False) -> None:
    if recipe_positional:
        p.add_argument("recipe", nargs="?", default=None, help="recipe YAML (e.g. recipes/tiny_cpu.yaml)")
    else:
        p.add_argument("--config", dest="recipe", default=None, help="recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=100 model.d_model=64")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and planned counts, then exit")


def load(args):
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]  # `slmforge run key=value ...` with no recipe
    return load_config(recipe, overrides)


def dry_run(cfg) -> None:
    from slmforge.plan import count_params, flops_per_token

    pc = count_params(cfg.model)
    t = cfg.train
    tokens = t.max_steps * t.batch_size * t.grad_accum * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["train"] * tokens
    print(dump_yaml(cfg))
    print(f"# parameters: {pc.total:,} total, {pc.non_embedding:,} non-embedding")
    print(f"# tokens: {tokens:,}; training FLOPs: {flops:.3e}")


def stage_config(cls, args):
    """A data stage's own config dataclass: defaults < --config YAML (a flat mapping) < key=value overrides."""
    raw = read_yaml(args.recipe)
    return merge(merge(cls(), raw, where=args.recipe or cls.__name__), parse_overrides(args.overrides), "override")
