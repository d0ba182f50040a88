"""GSM8K accuracy by difficulty (issue 19): by number of steps, by largest operand, and right answers reached
through a wrong step. Computed from the records of ``eval/gsm8k.py`` (question, gold solution, generation, and
each metric's ``correct``), so a resumed or old samples.jsonl gives the same section.

- steps: the ``<<expr=result>>`` annotations of the gold solution (GSM8K's calculator annotations; the procedural
  generator writes one per step).
- largest operand: the largest number written in digits in the question (``1,200`` is 1200, ``2.5`` is 2.5),
  bucketed ``<10``, ``<100``, ``<1000``, ``>=1000``; a question without one is ``none``.
- a wrong step: a generated ``<<a=b>>`` whose ``a`` evaluates (``synth.procedural.safe_eval``, never ``eval``) to
  a value ``b`` does not show: ``b`` is not a number, or differs from it by more than the rounding of ``b``'s own
  decimals (``10/3=3.33`` is right, ``10/3=3`` is not). An ``a`` that does not evaluate is not checked.
  ``right_with_wrong_step`` counts the problems whose strict-match answer is right while the greedy generation
  holds a wrong step. With ``tools=calculator`` decoding writes every result, so no step is wrong by construction.
"""

from __future__ import annotations

import re
from fractions import Fraction

from slmforge.synth.procedural import safe_eval

ANNOTATION = re.compile(r"<<([^<>]*?)>>")
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
OPERAND_BUCKETS = ((10, "<10"), (100, "<100"), (1000, "<1000"))
FINAL = "strict-match"  # the answer that counts as "the final answer" for right_with_wrong_step


def num_steps(solution: str) -> int:
    """The number of ``<<...>>`` annotations in a (gold) solution."""
    return len(ANNOTATION.findall(solution))


def largest_operand(question: str) -> Fraction | None:
    """The largest number written in digits in ``question`` (commas as thousands separators); None if none."""
    values = [Fraction(n.replace(",", "")) for n in NUMBER.findall(question)]
    return max(values) if values else None


def operand_bucket(question: str) -> str:
    value = largest_operand(question)
    if value is None:
        return "none"
    return next((name for bound, name in OPERAND_BUCKETS if value < bound), f">={OPERAND_BUCKETS[-1][0]}")


def _shown(text: str) -> tuple[Fraction, int] | None:
    """A result as written (``1,000``, ``$5``, ``2.50``) and its number of decimals; None if not a number."""
    text = text.strip().replace(",", "").lstrip("$")
    if not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", text):
        return None
    return Fraction(text), len(text.split(".")[1]) if "." in text else 0


def check_steps(generation: str) -> tuple[int, list[str]]:
    """(how many ``<<a=b>>`` of ``generation`` could be checked, the wrong ones as written)."""
    checked, wrong = 0, []
    for body in ANNOTATION.findall(generation):
        if "=" not in body:
            continue
        expr, _, result = body.rpartition("=")
        try:
            value = safe_eval(expr.replace(",", ""), decimals=True)
        except (ValueError, ArithmeticError, RecursionError):
            continue
        checked += 1
        shown = _shown(result)
        if shown is None or abs(value - shown[0]) > (Fraction(1, 2 * 10 ** shown[1]) if shown[1] else 0):
            wrong.append(f"<<{body}>>")
    return checked, wrong


def _accuracy(records: list[dict], keys: list[str]) -> dict:
    return {"n": len(records), **{k: sum(r[k]["correct"] for r in records) / len(records) for k in keys}}


def strata(records: list[dict], keys: list[str]) -> dict:
    """The ``strata`` section of summary.json: accuracy under each metric ``key`` by stratum, and the step check."""
    by_steps: dict[int, list[dict]] = {}
    by_operand: dict[str, list[dict]] = {}
    generated = checked = wrong = right_with_wrong = right = 0
    for r in records:
        by_steps.setdefault(num_steps(r["gold"]), []).append(r)
        by_operand.setdefault(operand_bucket(r["question"]), []).append(r)
        n_checked, bad = check_steps(r["generation"])
        generated += num_steps(r["generation"])
        checked, wrong = checked + n_checked, wrong + len(bad)
        if r.get(FINAL, {}).get("correct"):
            right += 1
            right_with_wrong += bool(bad)
    order = [name for _, name in OPERAND_BUCKETS] + [f">={OPERAND_BUCKETS[-1][0]}", "none"]
    return {
        "by_steps": {str(s): _accuracy(by_steps[s], keys) for s in sorted(by_steps)},
        "by_largest_operand": {b: _accuracy(by_operand[b], keys) for b in order if b in by_operand},
        "steps": {"generated": generated, "checked": checked, "wrong": wrong},
        "right_with_wrong_step": {"filter": FINAL, "count": right_with_wrong, "of_correct": right,
                                  "rate": right_with_wrong / right if right else None},
    }


def format_strata(section: dict) -> list[str]:
    """The CLI's short table of ``strata(...)``: one line per stratum, a column per metric."""
    rows = [*section["by_steps"].values(), *section["by_largest_operand"].values()]
    keys = [k for k in (rows[0] if rows else {}) if k != "n"]
    width = max([len(k) for k in keys] + [8])
    lines = [f"{'stratum':<18}{'n':>6}" + "".join(f"{k:>{width + 2}}" for k in keys)]
    for title, group in (("steps", section["by_steps"]), ("largest operand", section["by_largest_operand"])):
        for name, row in group.items():
            label = f"{title.split()[-1]} {name}"
            lines.append(f"{label:<18}{row['n']:>6}" + "".join(f"{row[k]:>{width + 2}.3f}" for k in keys))
    s, rw = section["steps"], section["right_with_wrong_step"]
    lines.append(f"generated steps: {s['generated']}, checked {s['checked']}, wrong {s['wrong']}; final answer "
                 f"right ({rw['filter']}) with a wrong step: {rw['count']} of {rw['of_correct']}")
    return lines
