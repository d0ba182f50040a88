"""Command line: one subcommand per stage. Handlers only load the config and call the API.

Subcommands are registered by group: ``train`` (plan, info, run, mix, forecast, anneal, train), ``data`` (synth,
tokenizer, tokenize, dedup, filter), ``model`` (generate, chat, serve, export, import, eval), ``post`` (sft,
orpo, dpo), ``niah`` (long context: train, run), ``flex`` (FlexOlmo: train, merge, optout, report) and
``compress`` (compress, decompress); ``common``
holds what they share. Every config key is a ``key=value`` item (``slmforge generate RUN prompt="Q: 3" temperature=0``),
and ``slmforge CMD --help`` lists them. Handlers import their stage when they run, so that ``--help`` and a
mistyped key answer without loading torch and every stage.

A user error (a bad key or value, a missing or malformed file) is one line on stderr,
``slmforge CMD: error: ...``, and exit status 2; never a traceback. Code below the CLI raises ValueError (or
OSError, from the file system) for those; any other exception is a bug and keeps its traceback (exit status 1).
A closed pipe (``slmforge ... | head``) ends the command quietly with status 141, as SIGPIPE would.
"""

from __future__ import annotations

import os
import signal
import sys

import yaml

from slmforge.cli import compress, data, flex, model, niah, post, train, vision
from slmforge.cli.common import Parser


def build_parser() -> Parser:
    parser = Parser(prog="slmforge", description="Build small language models end to end.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, data, model, post, niah, flex, compress, vision):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`slmforge plan --presets | head -1`): it has what it wanted. Point stdout at devnull
        # so that the flush at exit does not fail again, and exit quietly as a command killed by SIGPIPE would.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (captured in tests)
            pass
        return 128 + int(signal.SIGPIPE)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help, or a usage error: flush now, so that a closed pipe is seen here
        sys.stdout.flush()
        raise
    try:
        args.fn(args)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (ValueError, OSError, yaml.YAMLError) as exc:
        # A user error or the machine's (a missing file, a full disk). Anything else is a bug in slmforge: its
        # traceback is what a bug report needs, and the exit status is 1.
        print(f"slmforge {args.command}: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
