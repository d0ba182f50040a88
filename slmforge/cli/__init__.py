"""Command line: one subcommand per stage. Handlers only parse, merge the config and call the API.

Subcommands are registered by group: ``train`` (plan, info, run, mix, forecast, anneal, train), ``data`` (synth, tokenizer, tokenize, dedup,
filter) and ``model`` (generate, chat, serve, export, import, eval); ``common`` holds what they share.
"""

from __future__ import annotations

import argparse
import sys

from slmforge.cli import data, model, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmforge", description="Build small language models end to end.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, data, model):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, OSError) as exc:
        print(f"slmforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
