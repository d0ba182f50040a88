"""What every subcommand shares: one convention for its config, its ``--help`` key list, ``--dry-run``.

A subcommand's config is a dataclass, filled by ``config.load``: defaults < ``--config`` YAML (or a positional
recipe) < ``key=value`` items. Flags are only for what is not config (``--dry-run``, ``--resume``, ``--presets``,
the job-array plumbing). ``--help`` lists every key with its default and the trailing ``# comment`` of its
field in the dataclass source (``config.describe``).
The flags of earlier versions (``--max-new-tokens 5``) still work for the small CLI configs, hidden, each turned
into its ``key=value`` with a note on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path

from slmforge.config import RunConfig, describe, dump_yaml, load

ALIAS = "alias:"  # argparse dest prefix of a deprecated flag


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose ``--help`` ends with its config keys; the config class is imported only then,
    so that building the parser (every call of ``slmforge``) does not load torch and every stage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        spec = self.get_default("config_cls")
        if spec is not None and self.epilog is None:
            prefix = self.get_default("config_prefix") or ""
            self.epilog = (f"keys (key=value, shown with its default; (a | b) lists the choices):\n"
                           f"{describe(config_class(spec), prefix)}")
            if any(action.dest == "dry_run" for action in self._actions):
                self.epilog += "\n\n--dry-run prints the resolved config (defaults < preset < recipe < key=value)."
        return super().format_help()


def config_class(spec):
    """A config dataclass, or ``"module:Name"`` naming one (imported when first needed)."""
    if isinstance(spec, str):
        module, name = spec.split(":")
        return getattr(importlib.import_module(module), name)
    return spec


def config_args(p: argparse.ArgumentParser, cls, recipe: str | None = "flag", dry_run: bool = False,
                aliases: bool = False, overrides: bool = True) -> None:
    """Arguments of a subcommand configured by ``cls``: the recipe (``--config`` flag, ``positional`` or None),
    ``key=value`` items (unless the subcommand takes its own positional items), optionally ``--dry-run`` and the
    deprecated flags of ``cls``'s fields."""
    if recipe == "positional":
        p.add_argument("recipe", nargs="?", default=None, help="recipe YAML (e.g. recipes/tiny_cpu.yaml)")
    elif recipe == "flag":
        p.add_argument("--config", dest="recipe", default=None, help="YAML file of keys (a top-level mapping)")
    if overrides:
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config keys, listed below")
    if dry_run:
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and planned counts, then exit")
    if aliases:
        _add_aliases(p, cls)
    p.set_defaults(config_cls=cls)


def run_flags(p: argparse.ArgumentParser, dry_run: bool = False) -> None:
    """``--resume`` and ``--force`` of a subcommand that writes a new run folder from a trained run (and
    ``--dry-run``)."""
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest valid checkpoint")
    p.add_argument("--force", action="store_true", help="start the run folder over (deletes its checkpoints)")
    if dry_run:
        p.add_argument("--dry-run", action="store_true", help="print the resolved config, then exit")


def _add_aliases(p: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        repeat = typing.get_origin(hints[f.name]) is list
        p.add_argument("--" + f.name.replace("_", "-"), dest=ALIAS + f.name, default=None,
                       action="append" if repeat else "store", help=argparse.SUPPRESS)


def _alias_overrides(args) -> list[str]:
    out = []
    for dest, value in vars(args).items():
        if dest.startswith(ALIAS) and value is not None:
            key = dest[len(ALIAS):]
            print(f"slmforge {args.command}: note: --{key.replace('_', '-')} is deprecated; write {key}=...",
                  file=sys.stderr)
            out.append(f"{key}={json.dumps(value) if isinstance(value, list) else value}")
    return out


def load_args(args, overrides: list[str] | None = None):
    """The subcommand's config from its recipe, its ``key=value`` items (or ``overrides``) and deprecated flags."""
    recipe = getattr(args, "recipe", None)
    items = list(args.overrides if overrides is None else overrides)
    if recipe and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, items = None, [recipe, *items]  # `slmforge run key=value ...` with no recipe
    if recipe and not Path(recipe).is_file():
        raise ValueError(f"{recipe}: no such file (give a YAML file of keys, or key=value items; "
                         f"--help lists the keys)")
    return load(config_class(args.config_cls), recipe, items + _alias_overrides(args))


def load_run(args) -> RunConfig:
    """A RunConfig, with mixer and FFN names checked now: a typo stops here, before any data is built."""
    from slmforge.model.block import check_model  # torch: only for the subcommands that build a model

    cfg = load_args(args)
    check_model(cfg.model)
    return cfg


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """(files, overrides): ``key=value`` items that are not existing files are overrides."""
    overrides = [a for a in items if "=" in a and not Path(a).exists()]
    return [a for a in items if a not in overrides], overrides


def dry_run(cfg) -> None:
    from slmforge.plan import count_params, flops_per_token

    pc = count_params(cfg.model)
    t = cfg.train
    tokens = t.max_steps * t.batch_size * t.grad_accum * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["train"] * tokens
    print(dump_yaml(cfg))
    print(f"# parameters: {pc.total:,} total, {pc.non_embedding:,} non-embedding")
    print(f"# tokens: {tokens:,}; training FLOPs: {flops:.3e}")
