"""Tools in decoding: the GSM8K calculator (Cobbe et al. 2021, arXiv 2110.14168 section 4).

Worked solutions annotate each step as ``<<4+5+8=17>>17``. With ``tools=calculator``, as soon as a row's new text
ends with ``<<EXPR=`` (EXPR: digits, ``+ - * / ( ) .`` and spaces, at most ``MAX_EXPR_CHARS``), decoding evaluates
EXPR with the procedural corpus's checker (``synth.procedural.safe_eval``: exact Fraction arithmetic on a
whitelisted AST, never Python's ``eval``) and forces the tokens of ``RESULT>>``, one per decoding step through the
normal cached steps, so the KV cache holds exactly what a model that wrote them itself would hold; then the model
goes on (it writes the number again after ``>>``, as the annotations do). An expression that does not parse, uses
anything else (``**``, names, calls), divides by zero or gives more than ``MAX_RESULT_DIGITS`` integer digits is
left to the model: nothing is forced.

RESULT is written as the procedural annotations write theirs: an integer as its digits (``-3`` when negative). Their
results are always integers; a fraction, which they never have, is written as a decimal rounded half-even to at most
``DECIMALS`` places with trailing zeros dropped (``5/2`` -> ``2.5``, ``1/3`` -> ``0.3333``), as GSM8K's own
annotations write non-integral steps.

A tool is a callable ``tool(new_ids) -> ids to force`` (empty: nothing), called on a row's new ids after each token
it decodes; ``force`` puts the queued ids in place of the sampled ones. ``generate.generate_batch``,
``generate.stream_ids`` and ``worker.Worker`` take such a callable; the text-level entry points take the switch
``tools="calculator"`` and build it with ``make_tool``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

from slmforge.synth.procedural import safe_eval

if TYPE_CHECKING:
    import torch

MAX_EXPR_CHARS = 64
MAX_RESULT_DIGITS = 15
DECIMALS = 4
_CALL = re.compile(r"<<([0-9+\-*/(). ]{1,%d})=$" % MAX_EXPR_CHARS)
# Enough trailing tokens to hold "<<" + the longest expression + "=" (every token decodes to at least one byte).
_TAIL_TOKENS = MAX_EXPR_CHARS + 4

Tool = Callable[[list[int]], list[int]]


def calculate(text: str) -> str | None:
    """The result text for a ``text`` that ends with ``<<EXPR=``; None when there is no call or it is left alone."""
    call = _CALL.search(text)
    if call is None:
        return None
    try:
        value = safe_eval(call.group(1), decimals=True)
    except (ValueError, RecursionError, MemoryError):
        return None
    if len(str(abs(int(value)))) > MAX_RESULT_DIGITS:
        return None
    return format_result(value)


def format_result(value: Fraction) -> str:
    """An integer as its digits; otherwise a decimal of at most ``DECIMALS`` places (module docstring)."""
    rounded = round(value, DECIMALS)
    if rounded.denominator == 1:
        return str(int(rounded))
    sign, rounded = "-" if rounded < 0 else "", abs(rounded)
    whole, frac = divmod(rounded.numerator * 10**DECIMALS // rounded.denominator, 10**DECIMALS)
    return f"{sign}{whole}.{frac:0{DECIMALS}d}".rstrip("0")


class Calculator:
    """``tool(new_ids)``: the ids of ``RESULT>>`` when the decoded new text ends with a call it evaluates."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, new_ids: list[int]) -> list[int]:
        if not new_ids:
            return []
        # Only the tail is decoded: a call fits in it, and a cut multi-byte character at its start cannot match.
        result = calculate(self.tokenizer.decode(new_ids[-_TAIL_TOKENS:]))
        return [] if result is None else self.tokenizer.encode(result + ">>")


TOOLS: dict[str, Callable[..., Tool]] = {"calculator": Calculator}


def check_tools(name: str, prefix: str = "") -> None:
    """A one-line ValueError for an unknown tool name (the config key ``tools``)."""
    if name and name not in TOOLS:
        raise ValueError(f"{prefix}tools={name!r}: unknown tool; expected {' or '.join(TOOLS)}, or nothing for none")


def make_tool(name: str, tokenizer) -> Tool | None:
    """The tool called ``name`` ("" = none) for ``tokenizer``."""
    check_tools(name)
    return TOOLS[name](tokenizer) if name else None


def force(nxt: torch.Tensor, queues: list[list[int]]) -> torch.Tensor:
    """Sampled ids (B,) with row r's next queued id (popped from ``queues[r]``) in its place where it has one."""
    if not any(queues):
        return nxt
    nxt = nxt.clone()
    for r, queue in enumerate(queues):
        if queue:
            nxt[r] = queue.pop(0)
    return nxt
