"""Procedural documents: verifiable generators that need no teacher and no internet.

This is the embedded default corpus (``DataConfig.source = "procedural"``). Families, chosen by name from
``FAMILIES``; each is ``fn(rng: random.Random) -> Document`` (the id is filled in by ``build_corpus``):
  arithmetic  2-4 step word problems in GSM8K's answer format (arXiv:2110.14168): worked steps with calculator
              annotations ``48 / 2 = <<48/2=24>>24`` and a final ``#### 24``. Every problem is re-checked by
              ``verify_arithmetic`` with an ast-based evaluator (integers and + - * / only, never eval()).
  narrative   short simple stories in the style of TinyStories (arXiv:2305.07759)
  facts       an encyclopedic paragraph about an invented entity, then questions the paragraph answers
  sorting     sort, compare, alphabetise and max/min puzzles whose answers are recomputed from the question text

Question-answer documents read ``"Question: ...\\nAnswer: ..."``, lm-eval-harness's gsm8k prompt format.
``build_corpus`` mixes the families evenly into train/validation/test. Items are deduplicated by a key (the
normalised question, the invented entity, or the text) and each unique key goes to the split picked by a
stable hash of it, so no problem lands in two splits, whatever the seed.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from fractions import Fraction
from typing import Callable, NamedTuple

from slmforge.data.documents import Document
from slmforge.registry import lookup

SPLITS = ("train", "validation", "test")


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


FEMALE = _words("Ava, Mia, Lily, Emma, Zoe, Nora, Ella, Grace, Ruby, Chloe, Maya, Sara, Anna, Lucy, Ivy, Hannah, "
                "Olivia, Sophie, Clara, Leah, Alice, Rosa, Julia, Nina, Amara, Priya, Mei, Fatima, Elena, Isla")
MALE = _words("Liam, Noah, Leo, Max, Ben, Sam, Jack, Omar, Ethan, Lucas, Owen, Finn, Theo, Adam, Ravi, Kai, "
              "Hugo, Tom, Eli, Jonah, Marco, Diego, Felix, Oscar, Ivan, Hiro, Malik, Arjun, Luca, Henry")
GOODS = _words("notebooks, pens, apples, books, toy cars, stickers, candles, cupcakes, mugs, plates, shirts, "
               "socks, hats, balloons, markers, oranges, muffins, bracelets, puzzles, kites, bananas, erasers")
THINGS = _words("marbles, stickers, shells, stamps, cards, beads, coins, crayons, buttons, seashells, pebbles")
FOODS = _words("cookies, muffins, cupcakes, rolls, pancakes, brownies, tarts, biscuits")
PLANTS = _words("tomato plants, sunflowers, rose bushes, carrots, cabbages, tulips, pepper plants, lettuces")
VEHICLES = _words("train, bus, truck, car, boat, bicycle rider, van")
INSTRUMENTS = _words("piano, violin, guitar, flute, drums, trumpet, cello")
RELATIVES = _words("grandma, grandpa, aunt, uncle, mom, dad, older sister, older brother")
TREATS = _words("bike, video game, board game, backpack, pair of skates, telescope, scooter, jacket")


class _P(NamedTuple):
    name: str
    he: str
    his: str
    him: str

    @property
    def He(self) -> str:
        return self.he.capitalize()


def _person(rng: random.Random, *exclude: str) -> _P:
    while True:
        female = rng.random() < 0.5
        name = rng.choice(FEMALE if female else MALE)
        if name not in exclude:
            return _P(name, "she", "her", "her") if female else _P(name, "he", "his", "him")


# ---------------------------------------------------------------- arithmetic


class _Retry(Exception):
    """The drawn numbers do not fit the template (e.g. a division is not exact); draw again."""


class _Work:
    """Worked-solution lines: ``@`` in a line becomes ``6 * 4 = <<6*4=24>>24``, GSM8K's calculator annotation."""

    def __init__(self):
        self.lines: list[str] = []

    def step(self, text: str, op: str, *nums: int, money: bool = False) -> int:
        value = nums[0]
        for n in nums[1:]:
            if op == "/":
                assert value % n == 0, (value, n)  # templates choose numbers so divisions are exact
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]
        assert value >= 0, nums
        expr, shown = op.join(map(str, nums)), f" {op} ".join(map(str, nums))
        self.lines.append(text.replace("@", f"{shown} = {'$' if money else ''}<<{expr}={value}>>{value}"))
        return value


def _shopping(rng):
    p, (a, b) = _person(rng), rng.sample(GOODS, 2)
    qa, pa, qb, pb = rng.randint(2, 9), rng.randint(1, 20), rng.randint(2, 9), rng.randint(1, 20)
    w = _Work()
    x = w.step(f"The {a} cost @.", "*", qa, pa, money=True)
    y = w.step(f"The {b} cost @.", "*", qb, pb, money=True)
    total = w.step(f"Altogether {p.he} spends @.", "+", x, y, money=True)
    q = f"{p.name} buys {qa} {a} for ${pa} each and {qb} {b} for ${pb} each."
    if rng.random() < 0.5:
        return q + f" How much does {p.he} spend in total?", w, qa * pa + qb * pb
    bill = rng.choice([b for b in (50, 100, 200, 500) if b > total][:2])
    w.step(f"{p.He} gets @ in change.", "-", bill, total, money=True)
    return q + f" {p.He} pays with a ${bill} bill. How much change does {p.he} get?", w, bill - qa * pa - qb * pb


def _sharing(rng):
    p, obj = _person(rng), rng.choice(THINGS)
    f = _person(rng, p.name).name
    packs, size, m = rng.randint(2, 9), rng.randint(4, 25), rng.randint(2, 8)
    k = (packs * size) % m + m * rng.randint(0, 3)
    if not 0 < k < packs * size - m:
        raise _Retry
    w = _Work()
    total = w.step(f"{p.name} has @ {obj}.", "*", packs, size)
    rest = w.step(f"After giving some to {f}, {p.he} has @ {obj} left.", "-", total, k)
    w.step(f"Each friend gets @ {obj}.", "/", rest, m)
    q = (f"{p.name} buys {packs} packs of {obj} with {size} {obj} in each pack. {p.He} gives {k} {obj} to {f} "
         f"and shares the rest equally among {m} friends. How many {obj} does each friend get?")
    return q, w, (packs * size - k) // m


def _reading(rng):
    p = _person(rng)
    r1, d1, r2, d2 = rng.randint(5, 40), rng.randint(2, 9), rng.randint(5, 40), rng.randint(2, 9)
    pages = r1 * d1 + r2 * d2 + rng.randint(5, 150)
    w = _Work()
    x = w.step(f"First {p.he} reads @ pages.", "*", r1, d1)
    y = w.step(f"Then {p.he} reads @ pages.", "*", r2, d2)
    read = w.step(f"So far {p.he} has read @ pages.", "+", x, y)
    w.step(f"{p.He} still has @ pages to read.", "-", pages, read)
    q = (f"{p.name} is reading a {pages}-page book. {p.He} reads {r1} pages a day for {d1} days and then {r2} "
         f"pages a day for {d2} days. How many pages does {p.he} still have to read?")
    return q, w, pages - r1 * d1 - r2 * d2


def _travel(rng):
    what, unit = rng.choice(VEHICLES), rng.choice(["miles", "kilometers"])
    v1, t1, v2, t2 = rng.randint(10, 90), rng.randint(2, 6), rng.randint(10, 90), rng.randint(2, 6)
    w = _Work()
    x = w.step(f"In the first part it goes @ {unit}.", "*", v1, t1)
    y = w.step(f"In the second part it goes @ {unit}.", "*", v2, t2)
    w.step(f"In total it travels @ {unit}.", "+", x, y)
    q = (f"A {what} travels at {v1} {unit} per hour for {t1} hours, then at {v2} {unit} per hour for {t2} "
         f"hours. How many {unit} does it travel in total?")
    return q, w, v1 * t1 + v2 * t2


def _ages(rng):
    a, b, c = _person(rng), None, None
    b = _person(rng, a.name)
    c = _person(rng, a.name, b.name)
    k, bage, x, y = rng.randint(2, 5), rng.randint(3, 15), rng.randint(1, 12), rng.randint(2, 20)
    w = _Work()
    aage = w.step(f"{a.name} is @ years old.", "*", bage, k)
    if aage <= x:
        raise _Retry
    cage = w.step(f"{c.name} is @ years old.", "-", aage, x)
    q = (f"{a.name} is {k} times as old as {b.name}, who is {bage} years old. {c.name} is {x} years younger "
         f"than {a.name}.")
    if rng.random() < 0.5:
        w.step(f"In {y} years, {c.name} will be @ years old.", "+", cage, y)
        return q + f" How old will {c.name} be in {y} years?", w, bage * k - x + y
    w.step("Together they are @ years old.", "+", bage, aage, cage)
    return q + " What is the sum of their ages?", w, bage + bage * k + bage * k - x


def _savings(rng):
    p, treat, rel = _person(rng), rng.choice(TREATS), rng.choice(RELATIVES)
    s, weeks, g = rng.randint(3, 30), rng.randint(2, 12), rng.randint(5, 60)
    w = _Work()
    saved = w.step(f"{p.He} saves @.", "*", s, weeks, money=True)
    q = f"{p.name} saves ${s} every week for {weeks} weeks."
    if saved % 2 == 0 and rng.random() < 0.5:
        left = w.step(f"{p.He} spends half, so {p.he} has @ left.", "/", saved, 2, money=True)
        spent_q = f" Then {p.he} spends half of the money on a {treat}"
    else:
        t = rng.randint(1, saved - 1)
        left = w.step(f"After buying the {treat}, {p.he} has @.", "-", saved, t, money=True)
        spent_q, saved = f" Then {p.he} spends ${t} on a {treat}", saved - t
    w.step(f"Now {p.he} has @.", "+", left, g, money=True)
    q += spent_q + f" and gets ${g} from {p.his} {rel}. How much money does {p.he} have now?"
    return q, w, left + g


def _baking(rng):
    p, food = _person(rng), rng.choice(FOODS)
    b, c, k = rng.randint(2, 6), rng.randint(6, 24), rng.randint(2, 8)
    e = (b * c) % k + k * rng.randint(0, 2)
    if not 0 < e <= b * c - k:
        raise _Retry
    w = _Work()
    total = w.step(f"{p.He} bakes @ {food}.", "*", b, c)
    rest = w.step(f"After eating some, {p.he} has @ {food} left.", "-", total, e)
    w.step(f"{p.He} fills @ boxes.", "/", rest, k)
    q = (f"{p.name} bakes {b} trays of {food} with {c} {food} on each tray. {p.He} eats {e} of them and packs the "
         f"rest into boxes of {k}. How many boxes does {p.he} fill?")
    return q, w, (b * c - e) // k


def _garden(rng):
    p, plant = _person(rng), rng.choice(PLANTS)
    r1, n1, r2, n2 = rng.randint(2, 12), rng.randint(3, 15), rng.randint(2, 8), rng.randint(3, 15)
    d = rng.randint(1, 20)
    w = _Work()
    x = w.step(f"At first there are @ {plant}.", "*", r1, n1)
    y = w.step(f"{p.name} adds @ {plant}.", "*", r2, n2)
    t = w.step(f"Then there are @ {plant}.", "+", x, y)
    w.step(f"After the rabbits, @ {plant} are left.", "-", t, d)
    q = (f"A garden has {r1} rows of {plant} with {n1} in each row. {p.name} plants {r2} more rows with {n2} in "
         f"each row. Then rabbits eat {d} of the {plant}. How many {plant} are left in the garden?")
    return q, w, r1 * n1 + r2 * n2 - d


def _wages(rng):
    p, h, hours = _person(rng), rng.randint(8, 30), [rng.randint(2, 9) for _ in range(3)]
    w = _Work()
    worked = w.step(f"{p.He} works @ hours.", "+", *hours)
    pay = w.step(f"{p.He} earns @ for those hours.", "*", worked, h, money=True)
    q = (f"{p.name} earns ${h} an hour. {p.He} works {hours[0]} hours on Monday, {hours[1]} hours on Tuesday and "
         f"{hours[2]} hours on Wednesday.")
    if rng.random() < 0.5:
        return q + f" How much does {p.he} earn in these three days?", w, sum(hours) * h
    bonus = rng.randint(5, 50)
    w.step(f"With the bonus {p.he} gets @.", "+", pay, bonus, money=True)
    return q + f" {p.He} also gets a ${bonus} bonus. How much does {p.he} get in total?", w, sum(hours) * h + bonus


def _compare(rng):
    a, obj = _person(rng), rng.choice(THINGS)
    b = _person(rng, a.name)
    c = _person(rng, a.name, b.name)
    x, k, d = rng.randint(3, 30), rng.randint(2, 5), rng.randint(1, 10)
    w = _Work()
    bn = w.step(f"{b.name} has @ {obj}.", "*", x, k)
    cn = w.step(f"{c.name} has @ {obj}.", "-", bn, d)
    w.step(f"Altogether they have @ {obj}.", "+", x, bn, cn)
    q = (f"{a.name} has {x} {obj}. {b.name} has {k} times as many {obj} as {a.name}, and {c.name} has {d} fewer "
         f"{obj} than {b.name}. How many {obj} do the three of them have altogether?")
    return q, w, x + 2 * x * k - d


def _practice(rng):
    p, inst = _person(rng), rng.choice(INSTRUMENTS)
    m, weeks = rng.choice([10, 12, 15, 20, 30, 40, 45, 60, 90]), rng.randint(1, 12)
    if m * weeks % 60:
        raise _Retry
    w = _Work()
    week = w.step(f"Each week {p.he} practices @ minutes.", "*", m, 7)
    total = w.step(f"In {weeks} weeks that is @ minutes.", "*", week, weeks)
    w.step(f"That is @ hours.", "/", total, 60)
    q = (f"{p.name} practices the {inst} for {m} minutes every day. How many hours does {p.he} practice in "
         f"{weeks} weeks?")
    return q, w, m * 7 * weeks // 60


def _teams(rng):
    c, s, k = rng.randint(2, 8), rng.randint(15, 32), rng.randint(3, 8)
    a = (c * s) % k + k * rng.randint(0, 2)
    if not 0 < a <= c * s - k:
        raise _Retry
    w = _Work()
    total = w.step("The school has @ students.", "*", c, s)
    here = w.step("Today @ students are present.", "-", total, a)
    w.step("The teacher makes @ teams.", "/", here, k)
    q = (f"A school has {c} classes with {s} students in each class. {a} students are absent today. The teacher "
         f"puts the other students into teams of {k}. How many teams are there?")
    return q, w, (c * s - a) // k


def _fraction(rng):
    p, obj = _person(rng), rng.choice(THINGS)
    f = _person(rng, p.name).name
    d, word = rng.choice([(2, "half"), (3, "third"), (4, "quarter"), (5, "fifth")])
    t, more = d * rng.randint(2, 20), rng.randint(1, 30)
    w = _Work()
    given = w.step(f"{p.He} gives {f} @ {obj}.", "/", t, d)
    kept = w.step(f"{p.He} keeps @ {obj}.", "-", t, given)
    w.step(f"After buying more, {p.he} has @ {obj}.", "+", kept, more)
    q = (f"{p.name} had {t} {obj}. {p.He} gave a {word} of them to {f} and then bought {more} more. How many "
         f"{obj} does {p.he} have now?")
    return q, w, t - t // d + more


ARITHMETIC_TEMPLATES = [_shopping, _sharing, _reading, _travel, _ages, _savings, _baking, _garden, _wages,
                        _compare, _practice, _teams, _fraction]
# Numbers a solution may use without them appearing in the question: half/third/quarter/fifth, days in a
# week, minutes in an hour.
IMPLIED_NUMBERS = {2, 3, 4, 5, 7, 60}
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>(-?\d+)")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def safe_eval(expr: str) -> Fraction:
    """Evaluate integers combined with + - * / and parentheses, exactly; anything else raises ValueError."""

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError(f"division by zero in {expr!r}")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"unsupported expression {expr!r}: expected integers and + - * / only")

    try:
        return ev(ast.parse(expr.strip(), mode="eval").body)
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from None


def verify_arithmetic(question: str, solution: str) -> int:
    """Re-check a GSM8K-style solution and return its final answer; raise ValueError on any inconsistency.

    Every ``<<expr=result>>`` must evaluate to its result, the number shown after it must match, every number
    an expression uses must come from the question, an earlier step or ``IMPLIED_NUMBERS``, and the single
    final ``#### N`` line must equal the last step's result.
    """
    known = {int(n) for n in re.findall(r"\d+", question)} | IMPLIED_NUMBERS
    steps = _ANNOTATION.findall(solution)
    if not steps or len(steps) != solution.count("<<"):
        raise ValueError(f"malformed calculator annotations in solution: {solution!r}")
    value = None
    for expr, result, shown in steps:
        value = safe_eval(expr)
        if value.denominator != 1 or value != int(result) or result != shown:
            raise ValueError(f"annotation <<{expr}={result}>>{shown} is wrong: {expr} = {value}")
        unknown = {int(n) for n in re.findall(r"\d+", expr)} - known
        if unknown:
            raise ValueError(f"step {expr!r} uses {sorted(unknown)}, found neither in the question nor earlier")
        known.add(int(value))
    finals = re.findall(r"^#### (-?\d+)$", solution, flags=re.M)
    if len(finals) != 1 or not solution.endswith(f"#### {finals[0]}") or int(finals[0]) != value:
        raise ValueError(f"final '#### N' line missing or not equal to the last step ({value}): {solution!r}")
    return int(value)


def arithmetic(rng: random.Random) -> Document:
    while True:
        template = rng.choice(ARITHMETIC_TEMPLATES)
        try:
            question, work, answer = template(rng)
            break
        except _Retry:
            continue
    solution = "\n".join(work.lines + [f"#### {answer}"])
    # The template computed ``answer`` directly; the annotation chain must reach the same number.
    if verify_arithmetic(question, solution) != answer:
        raise AssertionError(f"{template.__name__}: worked steps do not reach {answer}: {solution}")
    meta = {"family": "arithmetic", "question": question, "solution": solution, "answer": str(answer)}
    return Document("", f"Question: {question}\nAnswer: {solution}", meta)
