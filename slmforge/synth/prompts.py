"""Prompt templates as data, and the parsers and checks that turn a teacher's answer into fields or a reject.

A template is a small YAML file (``templates/*.yaml``; a job names one of these or gives its own path):
  seed          "grid" (the job's topics x audiences x styles; placeholders {topic} {audience} {style}) or
                "documents" (the job's inputs; placeholders {passage} {doc_id})
  system, user  the chat messages, ``str.format`` strings over the seed's placeholders
  parser        "section" (free text), "fields" (``Label: value`` blocks, in order) or "gsm8k" (fields
                question and solution, the solution ending in ``#### N``)
  fields        the labels, lowercase, for "fields" and "gsm8k"
  procedural    which offline answer ``teacher.PROCEDURAL_ANSWERS`` gives (section, qa, exercise, gsm8k)
  min_words, max_words, max_field_words   length checks on the whole answer and on single fields
  text          the training text, a format string over the fields, the seed and {raw}

Checks, in order (the first failure is the reject reason): the answer was cut off at max_tokens; it opens
with a chatty preamble ("Sure, here is ..."); its length in words; a field is missing or empty or too long;
for gsm8k the answer check.

Math answer check (``check_math``). We ask the teacher for GSM8K calculator annotations and re-evaluate each
``<<expr=result>>`` with an exact rational evaluator (an ast walk over numbers and + - * /, never ``eval``);
every one must hold, the number written after it must match, and the single final ``#### N`` must equal the
last annotation. ``math_check="strict"`` adds ``procedural.verify_arithmetic``'s rule that each number an
expression uses comes from the question, an earlier step or a few implied constants. This catches slips in
arithmetic and a final answer that does not follow from the steps, at the cost of one sample; it cannot catch
a well-computed step of a wrong plan. Agreement across k samples would, at k times the cost: not done here.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import yaml

from slmforge.config import merge
from slmforge.synth.procedural import safe_eval, verify_arithmetic
from slmforge.registry import lookup

TEMPLATE_DIR = Path(__file__).parent / "templates"
SEED_PLACEHOLDERS = {"grid": ("topic", "audience", "style"), "documents": ("passage", "doc_id")}
MATH_CHECKS = ("annotations", "strict", "none")
_PREAMBLE = re.compile(r"^\W*(sure|certainly|of course|here is|here's|as an ai|i cannot|i can't|i'm sorry)\b", re.I)
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>\s*\$?(-?[\d,]*\.?\d+)?")
_FINAL = re.compile(r"^####\s*\$?(-?[\d,]*\.?\d+)\s*$", re.M)


@dataclass
class Template:
    name: str = ""
    description: str = ""
    seed: str = "grid"
    parser: str = "section"
    procedural: str = "section"
    fields: list[str] = field(default_factory=list)
    system: str = ""
    user: str = ""
    text: str = "{raw}"
    min_words: int = 1
    max_words: int = 100_000
    max_field_words: dict = field(default_factory=dict)


class Reject(Exception):
    """The answer fails a check; the message is the reason recorded in rejects.jsonl."""


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def _placeholders(fmt: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{where}: bad format string ({exc}); write {{{{ and }}}} for literal braces") from None


def load_template(name_or_path: str) -> Template:
    """A template by name (``templates/NAME.yaml``) or from a YAML path; placeholders are checked here."""
    path = Path(name_or_path)
    if not name_or_path.endswith((".yaml", ".yml")):
        path = TEMPLATE_DIR / f"{lookup({n: n for n in template_names()}, name_or_path, 'template')}.yaml"
    if not path.is_file():
        raise ValueError(f"template file {path} not found; built-in templates: {', '.join(template_names())}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    t = merge(Template(name=path.stem), raw, where=str(path))
    allowed = lookup(SEED_PLACEHOLDERS, t.seed, f"{path}: seed kind")
    lookup(PARSERS, t.parser, f"{path}: parser")
    if t.parser == "gsm8k":
        t.fields = ["question", "solution"]
    for key, fmt, names in (("system", t.system, allowed), ("user", t.user, allowed),
                            ("text", t.text, (*allowed, *t.fields, "raw"))):
        unknown = _placeholders(fmt, f"{path}: {key}") - set(names)
        if unknown:
            raise ValueError(f"{path}: {key} uses unknown placeholder(s) {sorted(unknown)}; "
                             f"available: {', '.join(names)}")
    if not t.user.strip():
        raise ValueError(f"{path}: user prompt is empty")
    return t


def render_messages(t: Template, seed: dict) -> list[dict]:
    messages = [{"role": "system", "content": t.system.format(**seed).strip()}] if t.system.strip() else []
    return messages + [{"role": "user", "content": t.user.format(**seed).strip()}]


# ---------------------------------------------------------------- parsers


def parse_section(raw: str, t: Template) -> dict:
    lines = raw.strip().splitlines()
    title = lines[0].lstrip("#").strip() if lines and lines[0].startswith("#") else ""
    return {"title": title, "body": raw.strip()}


def parse_fields(raw: str, t: Template) -> dict:
    """``Label: value`` blocks in the template's order; a value runs until the next label."""
    labels = "|".join(re.escape(f) for f in t.fields)
    marks = list(re.finditer(rf"^[ \t]*[*_#]*({labels})[*_]*[ \t]*:[*_]*[ \t]*", raw, flags=re.I | re.M))
    found: dict[str, str] = {}
    for k, m in enumerate(marks):
        key = m.group(1).lower()
        if key not in found:
            end = marks[k + 1].start() if k + 1 < len(marks) else len(raw)
            found[key] = raw[m.end():end].strip()
    for name in t.fields:
        if not found.get(name):
            raise Reject(f"missing or empty field '{name.capitalize()}:'")
    first: dict[str, int] = {}
    for m in marks:
        first.setdefault(m.group(1).lower(), m.start())
    if [first[f] for f in t.fields] != sorted(first[f] for f in t.fields):
        raise Reject(f"fields out of order; expected {', '.join(t.fields)}")
    return {name: found[name] for name in t.fields}


def parse_gsm8k(raw: str, t: Template) -> dict:
    fields = parse_fields(raw, t)
    finals = _FINAL.findall(fields["solution"])
    if len(finals) != 1 or not _FINAL.search(fields["solution"].splitlines()[-1]):
        raise Reject("the solution must end with exactly one line '#### N'")
    return dict(fields, answer=finals[0].replace(",", ""))


PARSERS = {"section": parse_section, "fields": parse_fields, "gsm8k": parse_gsm8k}


# ---------------------------------------------------------------- math check

def exact_eval(expr: str) -> Fraction:
    """Evaluate decimal numbers (thousands separators allowed) with + - * / and parentheses exactly; anything
    else raises ValueError."""
    return safe_eval(expr.replace(",", ""), decimals=True)


def check_math(question: str, solution: str, answer: str, mode: str = "annotations") -> None:
    """Raise Reject unless the worked solution checks (see the module docstring); ``mode`` in MATH_CHECKS."""
    if mode == "none":
        return
    if mode == "strict":
        try:
            verify_arithmetic(question, re.sub(r"^####\s*", "#### ", solution.strip(), flags=re.M))
        except ValueError as exc:
            raise Reject(f"math check: {exc}") from None
        return
    steps = _ANNOTATION.findall(solution)
    if not steps or len(steps) != solution.count("<<"):
        raise Reject("math check: no well-formed <<expr=result>> annotations to check")
    for expr, result, shown in steps:
        try:
            value, claimed = exact_eval(expr), exact_eval(result)
        except ValueError as exc:
            raise Reject(f"math check: <<{expr}={result}>>: {exc}") from None
        if value != claimed or (shown and exact_eval(shown) != claimed):
            raise Reject(f"math check: <<{expr}={result}>>{shown} is wrong: {expr} = {float(value):g}")
    if exact_eval(answer) != exact_eval(steps[-1][1]):
        raise Reject(f"math check: final answer {answer} differs from the last step's {steps[-1][1]}")


def parse_answer(raw: str, t: Template, finish_reason: str | None = None, math_check: str = "annotations") -> dict:
    """Fields of a teacher's answer, checked as the module docstring says; raises Reject with the reason."""
    if finish_reason == "length":
        raise Reject("cut off at max_tokens (finish_reason=length)")
    if _PREAMBLE.match(raw):
        raise Reject(f"chatty preamble: {raw.strip()[:40]!r}")
    num_words = len(raw.split())
    if not t.min_words <= num_words <= t.max_words:
        raise Reject(f"{num_words} words, outside [{t.min_words}, {t.max_words}]")
    fields = PARSERS[t.parser](raw, t)
    for name, limit in t.max_field_words.items():
        if len(fields.get(name, "").split()) > limit:
            raise Reject(f"field '{name}' has {len(fields[name].split())} words, more than {limit}")
    if t.parser == "gsm8k":
        check_math(fields["question"], fields["solution"], fields["answer"], math_check)
    return fields


def training_text(t: Template, fields: dict, seed: dict, raw: str) -> str:
    return t.text.format(**seed, **fields, raw=raw.strip())
