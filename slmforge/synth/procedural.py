"""Procedural documents: verifiable generators that need no teacher and no internet.

This is the embedded default corpus (``DataConfig.source = "procedural"``). Families, chosen by name from
``FAMILIES``; each is ``fn(rng: random.Random) -> Document`` (the id is filled in by ``build_corpus``):
  arithmetic  2-4 step word problems in GSM8K's answer format (arXiv:2110.14168): worked steps with calculator
              annotations ``48 / 2 = <<48/2=24>>24`` and a final ``#### 24``. Every problem is re-checked by
              ``verify_arithmetic`` with an ast-based evaluator (integers and + - * / only, never eval()).
              ``arithmetic(rng, topic)`` sets a problem in a topic ("In a bakery, Ava buys 3 cupcakes ..."): the
              offline teacher's answer to a job's topic.
  narrative   short simple stories in the style of TinyStories (arXiv:2305.07759)
  facts       an encyclopedic paragraph about an invented entity, then questions the paragraph answers
  sorting     sort, compare, alphabetise and max/min puzzles whose answers are recomputed from the question text
  scenes      captions of simple images (``synth/images.py``), as text: the words the vision projector's captions use

Question-answer documents read ``"Question: ...\\nAnswer: ..."``, lm-eval-harness's gsm8k prompt format.
``build_corpus`` mixes the families evenly into train/validation/test. Items are deduplicated by a key (the
normalised question, the invented entity, or the text) and each unique key goes to the split picked by a
stable hash of it, so no problem lands in two splits, whatever the seed.

long: about 600 lines, past the 400-line target: most of it is vocabularies and sentence templates, data that
reads best beside the code that fills it. Split it per family (synth/arithmetic.py, ...) if it grows.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import random
import re
from fractions import Fraction
from typing import Callable, NamedTuple

from slmforge.curate.documents import Document
from slmforge.registry import lookup
from slmforge.synth.images import scene_text

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
            # Templates choose numbers so divisions are exact and nothing goes negative.
            assert op != "/" or value % n == 0, (value, n)
            value = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}[op](value, n)
        assert value >= 0, nums
        expr, shown = op.join(map(str, nums)), f" {op} ".join(map(str, nums))
        self.lines.append(text.replace("@", f"{shown} = {'$' if money else ''}<<{expr}={value}>>{value}"))
        return value


def _shopping(rng, w, items=None):
    p, (a, b) = _person(rng), rng.sample(items or GOODS, 2)
    qa, pa, qb, pb = rng.randint(2, 9), rng.randint(1, 20), rng.randint(2, 9), rng.randint(1, 20)
    x = w.step(f"The {a} cost @.", "*", qa, pa, money=True)
    y = w.step(f"The {b} cost @.", "*", qb, pb, money=True)
    total = w.step(f"Altogether {p.he} spends @.", "+", x, y, money=True)
    q = f"{p.name} buys {qa} {a} for ${pa} each and {qb} {b} for ${pb} each."
    if rng.random() < 0.5:
        return q + f" How much does {p.he} spend in total?", qa * pa + qb * pb
    bill = rng.choice([note for note in (50, 100, 200, 500) if note > total][:2])
    w.step(f"{p.He} gets @ in change.", "-", bill, total, money=True)
    return q + f" {p.He} pays with a ${bill} bill. How much change does {p.he} get?", bill - qa * pa - qb * pb


def _sharing(rng, w, items=None):
    p, obj = _person(rng), rng.choice(items or THINGS)
    f = _person(rng, p.name).name
    packs, size, m = rng.randint(2, 9), rng.randint(4, 25), rng.randint(2, 8)
    k = (packs * size) % m + m * rng.randint(0, 3)
    if not 0 < k < packs * size - m:
        raise _Retry
    total = w.step(f"{p.name} has @ {obj}.", "*", packs, size)
    rest = w.step(f"After giving some to {f}, {p.he} has @ {obj} left.", "-", total, k)
    w.step(f"Each friend gets @ {obj}.", "/", rest, m)
    q = (f"{p.name} buys {packs} packs of {obj} with {size} {obj} in each pack. {p.He} gives {k} {obj} to {f} "
         f"and shares the rest equally among {m} friends. How many {obj} does each friend get?")
    return q, (packs * size - k) // m


def _reading(rng, w):
    p = _person(rng)
    r1, d1, r2, d2 = rng.randint(5, 40), rng.randint(2, 9), rng.randint(5, 40), rng.randint(2, 9)
    pages = r1 * d1 + r2 * d2 + rng.randint(5, 150)
    x = w.step(f"First {p.he} reads @ pages.", "*", r1, d1)
    y = w.step(f"Then {p.he} reads @ pages.", "*", r2, d2)
    read = w.step(f"So far {p.he} has read @ pages.", "+", x, y)
    w.step(f"{p.He} still has @ pages to read.", "-", pages, read)
    q = (f"{p.name} is reading a {pages}-page book. {p.He} reads {r1} pages a day for {d1} days and then {r2} "
         f"pages a day for {d2} days. How many pages does {p.he} still have to read?")
    return q, pages - r1 * d1 - r2 * d2


def _travel(rng, w):
    what, unit = rng.choice(VEHICLES), rng.choice(["miles", "kilometers"])
    v1, t1, v2, t2 = rng.randint(10, 90), rng.randint(2, 6), rng.randint(10, 90), rng.randint(2, 6)
    x = w.step(f"In the first part it goes @ {unit}.", "*", v1, t1)
    y = w.step(f"In the second part it goes @ {unit}.", "*", v2, t2)
    w.step(f"In total it travels @ {unit}.", "+", x, y)
    q = (f"A {what} travels at {v1} {unit} per hour for {t1} hours, then at {v2} {unit} per hour for {t2} "
         f"hours. How many {unit} does it travel in total?")
    return q, v1 * t1 + v2 * t2


def _ages(rng, w):
    a = _person(rng)
    b = _person(rng, a.name)
    c = _person(rng, a.name, b.name)
    k, bage, x, y = rng.randint(2, 5), rng.randint(3, 15), rng.randint(1, 12), rng.randint(2, 20)
    aage = w.step(f"{a.name} is @ years old.", "*", bage, k)
    if aage <= x:
        raise _Retry
    cage = w.step(f"{c.name} is @ years old.", "-", aage, x)
    q = (f"{a.name} is {k} times as old as {b.name}, who is {bage} years old. {c.name} is {x} years younger "
         f"than {a.name}.")
    if rng.random() < 0.5:
        w.step(f"In {y} years, {c.name} will be @ years old.", "+", cage, y)
        return q + f" How old will {c.name} be in {y} years?", bage * k - x + y
    w.step("Together they are @ years old.", "+", bage, aage, cage)
    return q + " What is the sum of their ages?", bage + bage * k + bage * k - x


def _savings(rng, w):
    p, treat, rel = _person(rng), rng.choice(TREATS), rng.choice(RELATIVES)
    s, weeks, g = rng.randint(3, 30), rng.randint(2, 12), rng.randint(5, 60)
    saved = w.step(f"{p.He} saves @.", "*", s, weeks, money=True)
    if s * weeks % 2 == 0 and rng.random() < 0.5:
        spend, answer = "half of the money", s * weeks // 2 + g
        left = w.step(f"{p.He} spends half, so {p.he} has @ left.", "/", saved, 2, money=True)
    else:
        t = rng.randint(s * weeks // 4, s * weeks - 1)
        spend, answer = f"${t}", s * weeks - t + g
        left = w.step(f"After buying the {treat}, {p.he} has @.", "-", saved, t, money=True)
    w.step(f"Now {p.he} has @.", "+", left, g, money=True)
    return (f"{p.name} saves ${s} every week for {weeks} weeks. Then {p.he} spends {spend} on a {treat} and gets "
            f"${g} from {p.his} {rel}. How much money does {p.he} have now?"), answer


def _baking(rng, w):
    p, food = _person(rng), rng.choice(FOODS)
    b, c, k = rng.randint(2, 6), rng.randint(6, 24), rng.randint(2, 8)
    e = (b * c) % k + k * rng.randint(0, 2)
    if not 0 < e <= b * c - k:
        raise _Retry
    total = w.step(f"{p.He} bakes @ {food}.", "*", b, c)
    rest = w.step(f"After eating some, {p.he} has @ {food} left.", "-", total, e)
    w.step(f"{p.He} fills @ boxes.", "/", rest, k)
    q = (f"{p.name} bakes {b} trays of {food} with {c} {food} on each tray. {p.He} eats {e} of them and packs the "
         f"rest into boxes of {k}. How many boxes does {p.he} fill?")
    return q, (b * c - e) // k


def _wages(rng, w):
    p, h, hours = _person(rng), rng.randint(8, 30), [rng.randint(2, 9) for _ in range(3)]
    worked = w.step(f"{p.He} works @ hours.", "+", *hours)
    pay = w.step(f"{p.He} earns @ for those hours.", "*", worked, h, money=True)
    q = (f"{p.name} earns ${h} an hour. {p.He} works {hours[0]} hours on Monday, {hours[1]} hours on Tuesday and "
         f"{hours[2]} hours on Wednesday.")
    if rng.random() < 0.5:
        return q + f" How much does {p.he} earn in these three days?", sum(hours) * h
    bonus = rng.randint(5, 50)
    w.step(f"With the bonus {p.he} gets @.", "+", pay, bonus, money=True)
    return q + f" {p.He} also gets a ${bonus} bonus. How much does {p.he} get in total?", sum(hours) * h + bonus


def _more(rng, w, items=None):
    a, obj = _person(rng), rng.choice(items or THINGS)
    b = _person(rng, a.name)
    c = _person(rng, a.name, b.name)
    x, k = rng.randint(3, 30), rng.randint(2, 5)
    d = rng.randint(1, min(10, x * k - 1))
    bn = w.step(f"{b.name} has @ {obj}.", "*", x, k)
    cn = w.step(f"{c.name} has @ {obj}.", "-", bn, d)
    w.step(f"Altogether they have @ {obj}.", "+", x, bn, cn)
    q = (f"{a.name} has {x} {obj}. {b.name} has {k} times as many {obj} as {a.name}, and {c.name} has {d} fewer "
         f"{obj} than {b.name}. How many {obj} do the three of them have altogether?")
    return q, x + 2 * x * k - d


def _practice(rng, w):
    p, inst = _person(rng), rng.choice(INSTRUMENTS)
    m, weeks = rng.choice([10, 12, 15, 20, 30, 40, 45, 60, 90]), rng.randint(1, 12)
    if m * weeks % 60:
        raise _Retry
    week = w.step(f"Each week {p.he} practices @ minutes.", "*", m, 7)
    total = w.step(f"In {weeks} weeks that is @ minutes.", "*", week, weeks)
    w.step(f"That is @ hours.", "/", total, 60)
    q = (f"{p.name} practices the {inst} for {m} minutes every day. How many hours does {p.he} practice in "
         f"{weeks} weeks?")
    return q, m * 7 * weeks // 60


def _fraction(rng, w, items=None):
    p, obj = _person(rng), rng.choice(items or THINGS)
    f = _person(rng, p.name).name
    d, word = rng.choice([(2, "half"), (3, "third"), (4, "quarter"), (5, "fifth")])
    t, more = d * rng.randint(2, 20), rng.randint(1, 30)
    given = w.step(f"{p.He} gives {f} @ {obj}.", "/", t, d)
    kept = w.step(f"{p.He} keeps @ {obj}.", "-", t, given)
    w.step(f"After buying more, {p.he} has @ {obj}.", "+", kept, more)
    q = (f"{p.name} had {t} {obj}. {p.He} gave a {word} of them to {f} and then bought {more} more. How many "
         f"{obj} does {p.he} have now?")
    return q, t - t // d + more


ARITHMETIC_TEMPLATES = [_shopping, _sharing, _reading, _travel, _ages, _savings, _baking, _wages,
                        _more, _practice, _fraction]
# A problem set in a topic (the offline teacher's job topics): one of the templates about items, the items taken
# from the first TOPIC_ITEMS key the topic contains (else the generic lists), the question opening with the topic.
TOPIC_TEMPLATES = [_shopping, _sharing, _more, _fraction]
TOPIC_ITEMS = {
    "bak": _words("cupcakes, muffins, croissants, cookies, pies, bagels, rolls, buns, doughnuts, loaves"),
    "garden": _words("tulips, seed packets, tomato plants, flower pots, sunflowers, bulbs, carrots, roses"),
    "toy": _words("toy cars, puzzles, kites, dolls, yo-yos, board games, teddy bears, marbles, balloons"),
    "school": _words("pencils, notebooks, erasers, rulers, sandwiches, juice boxes, postcards, stickers"),
    "bus": _words("bus tickets, travel passes, snacks, maps, postcards, bottles of water"),
    "librar": _words("books, magazines, bookmarks, comics, picture books, maps, library cards"),
    "football": _words("footballs, tickets, jerseys, scarves, water bottles, cones, team badges"),
    "farm": _words("eggs, apples, pumpkins, carrots, potatoes, bales of hay, jars of honey, pears"),
}


def topic_items(topic: str) -> list[str] | None:
    """The items of the first TOPIC_ITEMS key found in ``topic`` ("a bakery" -> cupcakes, ...), else None."""
    return next((items for key, items in TOPIC_ITEMS.items() if key in topic.lower()), None)
# Numbers a solution may use without them appearing in the question: half/third/quarter/fifth, days in a
# week, minutes in an hour.
IMPLIED_NUMBERS = {2, 3, 4, 5, 7, 60}
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>(-?\d+)")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expr: str, decimals: bool = False) -> Fraction:
    """Evaluate integers (with ``decimals``, decimal numbers too) combined with + - * /, unary minus and
    parentheses, exactly; anything else raises ValueError."""

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError(f"division by zero in {expr!r}")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) in ((int, float) if decimals else (int,)):
            return Fraction(str(node.value))
        raise ValueError(f"unsupported expression {expr!r}: expected {'numbers' if decimals else 'integers'} "
                         f"and + - * / only")

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


def arithmetic(rng: random.Random, topic: str = "") -> Document:
    """A verified GSM8K-style problem; with ``topic``, one set in it (see TOPIC_TEMPLATES)."""
    while True:
        template, work = rng.choice(TOPIC_TEMPLATES if topic else ARITHMETIC_TEMPLATES), _Work()
        try:
            if topic:
                question, answer = template(rng, work, topic_items(topic))
                question = f"In {topic}, {question}"
            else:
                question, answer = template(rng, work)
            break
        except _Retry:
            pass
    solution = "\n".join(work.lines + [f"#### {answer}"])
    # The template computed ``answer`` directly; the annotation chain must reach the same number.
    if verify_arithmetic(question, solution) != answer:
        raise AssertionError(f"{template.__name__}: worked steps do not reach {answer}: {solution}")
    meta = {"family": "arithmetic", "question": question, "solution": solution, "answer": str(answer)}
    return Document("", f"Question: {question}\nAnswer: {solution}", meta)


# ---------------------------------------------------------------- narrative

KINDS = _words("puppy, kitten, bunny, bear cub, fox, duck, mouse, frog, bird, owl, turtle, squirrel, "
               "lamb, pig, hedgehog, baby dragon")
ADJECTIVES = _words("little, kind, brave, curious, happy, shy, silly, clever, gentle, cheerful, playful, tiny, "
                    "sleepy, friendly, busy, small")
PLACES = _words("park, garden, beach, forest, farm, lake, hill, market, meadow, library, zoo, pond, playground")
HOBBIES = _words("play with {his} ball, draw pictures, sing songs, look at the stars, build towers with blocks, "
                 "jump in puddles, read books, pick flowers, dance in the sun, ride {his} bike, fly {his} kite, "
                 "collect shiny rocks, watch the clouds, bake cakes, splash in the water, play hide and seek")
TOYS = _words("red ball, blue kite, teddy bear, toy boat, shiny rock, yellow hat, little drum, storybook, green "
              "balloon, wooden car, pink scarf, toy robot, paper crown, striped sock, silver bell")
OPENINGS = ["Once upon a time, there was a {adj} {kind} named {name}.", "{name} was a {adj} {kind}.",
            "There once lived a {adj} {kind} called {name}.", "In a quiet town, there was a {adj} {kind} named {name}."]
GOINGS = ["One day, {name} went to the {place}.", "One sunny morning, {name} went to the {place} with {his} {toy}.",
          "One afternoon, {name} and {his} mom walked to the {place}.", "Today, {name} wanted to visit the {place}."]
# Each problem: (what goes wrong, how it feels, how it is resolved) with interchangeable phrasings.
PROBLEMS = [
    (["{name} could not find {his} {toy} anywhere.", "Oh no! {name} lost {his} {toy} at the {place}."],
     ["{He} felt very sad.", "{He} started to cry."],
     ["{friend} the {fkind} helped {him} look, and they found the {toy} under a bush.",
      "Then {name} saw the {toy} behind a big tree. {He} was so glad!"]),
    (["The wind blew {his} {toy} high up into a tree.", "{His} {toy} got stuck on a tall branch."],
     ["{name} could not reach it.", "{He} did not know what to do."],
     ["{friend} the {fkind} climbed up and brought it back down.", "A kind old man used a long stick to get it."]),
    (["Suddenly, dark clouds came and it began to rain.", "Then a big storm came, and the sky turned gray."],
     ["{name} was cold and wet.", "{He} was a little scared."],
     ["{name} and {friend} the {fkind} hid under a big tree until the sun came out again.",
      "{His} mom came with an umbrella and took {him} home for warm soup."]),
    (["{friend} the {fkind} was sitting alone and looked sad.", "{name} saw that {friend} the {fkind} was crying."],
     ["{name} wanted to help {his} friend.", "{name} felt sad too."],
     ["{name} shared {his} {toy} with {friend}, and soon they were both smiling.",
      "{name} told a funny joke, and {friend} started to laugh."]),
    (["{name} dropped {his} {toy} in the mud.", "{His} {toy} fell into a big puddle and got very dirty."],
     ["{He} felt very upset.", "Tears filled {his} eyes."],
     ["{His} dad helped {him} wash it until it was clean again.",
      "{friend} the {fkind} helped {him} clean it with some water."]),
    (["{name} heard a loud noise behind a bush.", "Something big moved in the dark near the {place}."],
     ["{He} felt scared.", "{His} heart beat fast."],
     ["It was only {friend} the {fkind}, who wanted to play.", "{name} took a deep breath and looked. It was a "
      "little {fkind} named {friend}, and it was scared too."]),
    (["{name} wanted to climb to the top of the hill, but it was very steep.",
      "{name} tried to build a tall tower, but it kept falling down."],
     ["{He} wanted to give up.", "{He} felt tired."],
     ["{name} did not give up. Step by step, {he} did it.", "{friend} the {fkind} helped {him}, and they did it "
      "together."]),
]
ENDINGS = ["{name} was very happy.", "It was the best day ever.", "That night, {name} went to bed with a big smile.",
           "{name} smiled all the way home."]
# Endings that need the friend to be in the story already.
FRIEND_ENDINGS = ["They laughed and played until the sun went down.", "{name} hugged {friend} and said thank you.",
                  "From that day on, {name} and {friend} were best friends.",
                  "{name} learned that friends make everything better.",
                  "{name} learned that it is good to ask for help."]


def narrative(rng: random.Random) -> Document:
    p = _person(rng)
    f = _person(rng, p.name)
    v = dict(name=p.name, he=p.he, his=p.his, him=p.him, He=p.He, His=p.his.capitalize(), friend=f.name,
             kind=rng.choice(KINDS + 4 * ["girl" if p.he == "she" else "boy"]), adj=rng.choice(ADJECTIVES),
             place=rng.choice(PLACES), toy=rng.choice(TOYS), fkind=rng.choice(KINDS))
    trouble, feeling, fix = rng.choice(PROBLEMS)
    # 4-8 sentences: opening, problem, resolution and an ending always; a hobby, an outing, a feeling and a
    # second ending sometimes.
    story = [rng.choice(OPENINGS)]
    if rng.random() < 0.7:
        story.append(rng.choice(["{He} loved to ", "Every day, {he} liked to ", "{His} favorite thing was to "])
                     + rng.choice(HOBBIES) + ".")
    if rng.random() < 0.7:
        story.append(rng.choice(GOINGS))
    story.append(rng.choice(trouble))
    if rng.random() < 0.7:
        story.append(rng.choice(feeling))
    story.append(rng.choice(fix))
    endings = ENDINGS + (FRIEND_ENDINGS if any("{friend}" in s for s in story) else [])
    text = " ".join(s.format(**v) for s in story + rng.sample(endings, rng.randint(1, 2)))
    return Document("", text, {"family": "narrative"})


# ---------------------------------------------------------------- facts

ONSETS = _words("b, br, d, dr, f, g, k, kr, l, m, n, p, r, s, st, t, th, v, z")
CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m", "nd"]
COLORS = _words("red, blue, green, yellow, purple, orange, white, black, pink, gray, brown, silver, golden")
FEATURES = _words("crystal caves, singing winds, purple oceans, floating islands, glowing forests, giant volcanoes, "
                  "ice rings, silver deserts, tall blue trees, endless storms")
JOBS = _words("baker, painter, sailor, inventor, teacher, gardener, clockmaker, doctor, musician, explorer, "
              "astronomer, builder, poet, mapmaker")
INVENTIONS = _words("singing kettle, folding boat, wind clock, glass umbrella, cloud map, moon lamp, paper bridge, "
                    "sand telescope, rain harp, snow oven, walking chair, star compass")
THEMES = _words("lanterns, kites, apples, music, boats, bread, flowers, candles, masks, honey, cheese, dancing")
ANIMAL_FOODS = _words("berries, seeds, small fish, leaves, insects, mushrooms, roots, snails, moss, fruit, nuts")
SOUNDS = _words("humming, clicking, whistling, purring, chirping, buzzing, squeaking, rumbling, singing")
HABITATS = _words("forests, mountains, swamps, deserts, grasslands, caves, rivers, islands")


def _invented(rng: random.Random, lo: int = 2, hi: int = 3) -> str:
    # Open syllables and one final consonant keep invented names pronounceable: Zorava, Melith, Tarnis.
    syllables = "".join(rng.choice(ONSETS) + rng.choice("aeiou") for _ in range(rng.randint(lo, hi)))
    return (syllables + rng.choice(CODAS)).capitalize()


def _an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# Each entity kind returns (name, intro, other facts), a fact being (sentence, question, answer quoted from it).
def _planet(rng):
    e, star, color, feature = _invented(rng), _invented(rng), rng.choice(COLORS), rng.choice(FEATURES)
    moons, hours, days = rng.randint(2, 14), rng.randint(10, 60), rng.randint(100, 900)
    return e, (f"{e} is a planet that orbits the star {star}.", f"Which star does {e} orbit?", star), [
        (f"It has {moons} moons.", f"How many moons does {e} have?", str(moons)),
        (f"The sky on {e} is {color}.", f"What color is the sky on {e}?", color),
        (f"A day on {e} lasts {hours} hours.", f"How long is a day on {e}?", f"{hours} hours"),
        (f"One year there lasts {days} days.", f"How many days does a year on {e} last?", str(days)),
        (f"{e} is famous for its {feature}.", f"What is {e} famous for?", f"Its {feature}")]


def _town(rng):
    e, region, river, mayor = _invented(rng), _invented(rng), _invented(rng, 1, 2), _person(rng).name
    year, pop, theme = rng.randint(1100, 1950), rng.randint(8, 600) * 100, rng.choice(THEMES)
    season = rng.choice(["spring", "summer", "autumn", "winter"])
    return e, (f"{e} is a small town in the valley of {region}.", f"Where is {e}?", f"In the valley of {region}"), [
        (f"It was founded in {year}.", f"When was {e} founded?", f"In {year}"),
        (f"About {pop} people live there.", f"How many people live in {e}?", f"About {pop}"),
        (f"The town lies on the {river} River.", f"Which river does {e} lie on?", f"The {river} River"),
        (f"Every {season}, {e} holds a festival of {theme}.", f"What festival does {e} hold every {season}?",
         f"A festival of {theme}"),
        (f"Its mayor is {mayor} {_invented(rng)}.", f"What is the first name of the mayor of {e}?", mayor)]


def _animal(rng):
    e, region, cover = _invented(rng).lower(), _invented(rng), rng.choice(["fur", "feathers", "scales"])
    legs, years, color = rng.choice([2, 4, 6, 8]), rng.randint(3, 80), rng.choice(COLORS)
    food, sound, where = rng.choice(ANIMAL_FOODS), rng.choice(SOUNDS), rng.choice(HABITATS)
    return e, (f"The {e} is an animal that lives in the {where} of {region}.", f"Where does the {e} live?",
               f"In the {where} of {region}"), [
        (f"It has {legs} legs.", f"How many legs does the {e} have?", str(legs)),
        (f"Its {cover} {'is' if cover == 'fur' else 'are'} {color}.", f"What color is the {e}'s {cover}?", color),
        (f"It eats mostly {food}.", f"What does the {e} mostly eat?", food),
        (f"The {e} can live for up to {years} years.", f"How long can the {e} live?", f"Up to {years} years"),
        (f"When it is happy, it makes {_an(sound)} sound.", f"What sound does the {e} make when it is happy?",
         f"{_an(sound)} sound")]


def _inventor(rng):
    p, town, city, pet = _person(rng), _invented(rng), _invented(rng), _invented(rng, 1, 2)
    e, job, invention = f"{p.name} {_invented(rng)}", rng.choice(JOBS), rng.choice(INVENTIONS)
    year, age = rng.randint(1500, 1950), rng.randint(40, 99)
    return e, (f"{e} was {_an(job)} born in the town of {town} in {year}.", f"Where was {e} born?",
               f"In the town of {town}"), [
        (f"{p.He} is best known for inventing the {invention}.", f"What is {e} best known for?",
         f"Inventing the {invention}"),
        (f"{p.He} had a pet {rng.choice(KINDS)} called {pet}.", f"What was the name of {e}'s pet?", pet),
        (f"{p.He} lived to the age of {age}.", f"How old was {e} at the end of {p.his} life?", str(age)),
        (f"For many years, {p.he} worked in the city of {city}.", f"In which city did {e} work?", city)]


def facts(rng: random.Random) -> Document:
    kind = rng.choice([_planet, _town, _animal, _inventor])
    entity, intro, others = kind(rng)
    chosen = rng.sample(others, rng.randint(3, len(others)))
    paragraph = " ".join(s for s, _, _ in [intro] + chosen)
    qa = [[q, a] for _, q, a in rng.sample([intro] + chosen, rng.randint(2, 4))]  # lists: meta stays JSON-equal
    for _, a in qa:
        # Answers must follow from the paragraph: each one is quoted from it.
        assert a.lower() in paragraph.lower(), (a, paragraph)
    text = paragraph + "\n\n" + "\n".join(f"Question: {q}\nAnswer: {a[0].upper() + a[1:]}." for q, a in qa)
    return Document("", text, {"family": "facts", "entity": entity, "kind": kind.__name__[1:], "qa": qa})


# ---------------------------------------------------------------- sorting

SORT_WORDS = _words("apple, banana, cherry, grape, lemon, mango, melon, pear, plum, peach, river, mountain, forest, "
                    "desert, ocean, island, valley, castle, bridge, tower, garden, window, pencil, candle, ladder, "
                    "rocket, dragon, tiger, zebra, rabbit, turtle, eagle, whale, otter, violin, guitar, piano, drum, "
                    "basket, bottle, button, carpet, jacket, kettle, lantern, mirror, needle, pillow, saddle, teapot, "
                    "wagon, yogurt, igloo, umbrella, anchor, feather, hammer, orange, quilt, nest, map, sock, kite")
CONTAINERS = _words("box, bag, basket, crate, suitcase, bucket, parcel, sack, chest")
# (verb, unit, "bigger of two, biggest, smaller of two, smallest", value range)
MEASURES = [("weighs", "kilograms", "heavier, the heaviest, lighter, the lightest", 1, 99),
            ("is", "years old", "older, the oldest, younger, the youngest", 5, 95),
            ("is", "centimeters tall", "taller, the tallest, shorter, the shortest", 90, 200),
            ("has", "points", "more points, the most points, fewer points, the fewest points", 0, 60)]


def _join(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


def _compare(rng: random.Random) -> tuple[str, str]:
    """Which of 2-4 boxes is heavier/the heaviest, or which person is older/the tallest/...: (question, answer)."""
    k, big = rng.randint(2, 4), rng.random() < 0.5
    verb, unit, words, lo, hi = rng.choice(MEASURES)
    if verb == "weighs":
        box = rng.choice(CONTAINERS)
        names, ask = [f"the {c} {box}" for c in rng.sample(COLORS, k)], f"Which {box} is"
    else:
        names, ask = rng.sample(FEMALE + MALE, k), f"Who {verb}"
    values = rng.sample(range(lo, hi), k)
    word = _words(words)[(k > 2) + 2 * (not big)]
    best = names[values.index(max(values) if big else min(values))]
    question = _join([f"{n} {verb} {v} {unit}" for n, v in zip(names, values)]) + f". {ask} {word}?"
    return question[0].upper() + question[1:], best[0].upper() + best[1:]


def check_sorting(question: str, answer: str) -> bool:
    """Re-derive a sorting answer from the question text alone and compare."""
    if question.startswith(("Sort", "Put", "What is")):
        items = question.split(": ", 1)[1].rstrip(".?").split(", ")
        if question.startswith("Put"):
            return answer == ", ".join(sorted(items))
        nums = sorted(map(int, items), reverse="from largest" in question or "the largest" in question)
        return answer == (", ".join(map(str, nums)) if question.startswith("Sort") else str(nums[0]))
    facts_, ask = question.rsplit(". ", 1)
    pairs = re.findall(r"(?:^|, | and )(.+?) (?:weighs|is|has) (\d+)", facts_)
    big = any(w in ask for w in ("heav", "old", "tall", "more", "most"))
    return answer.lower() == (max if big else min)(pairs, key=lambda nv: int(nv[1]))[0].lower()


def sorting(rng: random.Random) -> Document:
    kind = rng.choice(["numbers", "words", "extreme", "compare"])
    if kind == "numbers":
        nums, desc = rng.sample(range(1, rng.choice([50, 100, 1000])), rng.randint(3, 7)), rng.random() < 0.5
        order = "largest to smallest" if desc else "smallest to largest"
        question = f"Sort these numbers from {order}: {', '.join(map(str, nums))}."
        answer = ", ".join(map(str, sorted(nums, reverse=desc)))
    elif kind == "words":
        words = rng.sample(SORT_WORDS, rng.randint(3, 6))
        question, answer = f"Put these words in alphabetical order: {', '.join(words)}.", ", ".join(sorted(words))
    elif kind == "extreme":
        nums, big = rng.sample(range(1, 1000), rng.randint(3, 8)), rng.random() < 0.5
        question = f"What is the {'largest' if big else 'smallest'} number in this list: {', '.join(map(str, nums))}?"
        answer = str(max(nums) if big else min(nums))
    else:
        question, answer = _compare(rng)
    # Re-derive the answer from the rendered question, so a template slip cannot ship a wrong answer.
    assert check_sorting(question, answer), (question, answer)
    meta = {"family": "sorting", "kind": kind, "question": question, "answer": answer}
    return Document("", f"Question: {question}\nAnswer: {answer}", meta)


# ---------------------------------------------------------------- corpus

FAMILIES: dict[str, Callable[[random.Random], Document]] = {
    "arithmetic": arithmetic, "narrative": narrative, "facts": facts, "sorting": sorting, "scenes": scene_text}


def _key(doc: Document) -> str:
    """What makes two items the same problem: the question, else the invented entity, else the text."""
    raw = doc.meta.get("question") or doc.meta.get("entity") or doc.text
    return " ".join(re.sub(r"[^a-z0-9]+", " ", raw.lower()).split())


def _split_of(key: str, quota: dict[str, int]) -> str:
    """A stable hash of the key, cut in proportion to the split sizes: one key always lands in one split."""
    u = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    total, edge = sum(quota.values()), 0.0
    for split in SPLITS:
        edge += quota[split] / total
        if u < edge:
            return split
    return max(quota, key=quota.get)


def build_corpus(families: list[str], num_train: int, num_val: int, num_test: int,
                 seed: int) -> dict[str, list[Document]]:
    """Generate ``{"train", "validation", "test"}`` documents, families mixed evenly, no item in two splits.

    Deterministic in ``seed``. Raises ValueError if a family cannot produce enough unique items.
    """
    families = list(dict.fromkeys(families))  # a repeated name would only draw duplicates
    if not families:
        raise ValueError("build_corpus needs at least one family; choose from: " + ", ".join(FAMILIES))
    makers = [lookup(FAMILIES, name, "procedural family") for name in families]
    wanted = dict(zip(SPLITS, (num_train, num_val, num_test)))
    out: dict[str, list[Document]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for i, (name, make) in enumerate(zip(families, makers)):
        # Even mix: each family gets an equal share of every split, the first families take the remainder.
        quota = {s: n // len(families) + (i < n % len(families)) for s, n in wanted.items()}
        need, counts = sum(quota.values()), dict.fromkeys(SPLITS, 0)
        rng = random.Random(f"slmforge.procedural:{seed}:{name}")
        tries = 0
        while sum(counts.values()) < need:
            tries += 1
            if tries > 20 * need + 1000:
                raise ValueError(f"procedural family {name!r} produced only {sum(counts.values())} unique items "
                                 f"in {tries - 1} tries, but {need} are needed ({quota}); ask for fewer documents")
            doc = make(rng)
            key = _key(doc)
            if key in seen:
                continue
            seen.add(key)
            split = _split_of(key, quota)
            if counts[split] < quota[split]:
                doc.id = f"{name}-{split}-{counts[split]:06d}"
                counts[split] += 1
                out[split].append(doc)
    for split, docs in out.items():
        random.Random(f"slmforge.procedural:{seed}:shuffle:{split}").shuffle(docs)
    return out
