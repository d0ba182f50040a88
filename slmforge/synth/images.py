"""Simple images with known content: the data of the vision projector (``slmforge vision``).

A scene is one of three kinds, each drawn on a plain background and described by one caption whose words are
the scene's attributes, so a caption can be scored attribute by attribute against the truth (``parse_caption``):

  single  one object: size, colour, shape and position   "a large red circle at the top left."
  count   two to four alike small objects                 "three blue squares."
  pair    two objects, named from the left or top one         "a red circle left of a green square."

Held-out combinations (``HELD_OUT``: colour-shape pairs) never appear in a training image, not even as one object
of a pair, so the test split measures composition, not recall. Scenes are deterministic by seed and images are
real RGB PNG files (``write_split``), with one JSONL manifest line per image.

The ``scenes`` procedural family (``scene_text``) writes such captions as plain text, of every colour-shape pair: a
base model trained on it knows the words a description uses, as the language model behind LLaVA knows English,
and the projector only has to tell it which description the image shows.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slmforge.curate.documents import Document

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.14, "large": 0.30}  # half-width as a fraction of the image side
POSITIONS = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "center": (1, 1),
             "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}
# A pair is always named from its left (or top) object, so one image has one caption: "a red circle left of a blue
# square", never also "a blue square right of a red circle", which no model could tell apart from the pixels.
RELATIONS = ("left of", "above")
COUNTS = {2: "two", 3: "three", 4: "four"}
KINDS = ("single", "count", "pair")
# Colour-shape pairs no training image shows; together they use every colour and every shape.
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square"),
            ("purple", "circle"), ("orange", "triangle"))
BACKGROUND = (245, 245, 240)


@dataclass
class Obj:
    colour: str
    shape: str
    size: str
    x: float  # centre, as a fraction of the image side
    y: float


@dataclass
class Scene:
    kind: str
    objects: list[Obj]
    attrs: dict = field(default_factory=dict)  # attribute name -> the word(s) the caption uses

    def caption(self) -> str:
        return caption_of(self.kind, self.attrs)

    def held_out(self) -> bool:
        return any((o.colour, o.shape) in HELD_OUT for o in self.objects)


def caption_of(kind: str, a: dict) -> str:
    if kind == "single":
        return f"a {a['size']} {a['colour']} {a['shape']} at the {a['position']}."
    if kind == "count":
        return f"{a['count']} {a['colour']} {a['shape']}s."
    return f"{_an(a['colour'])} {a['shape']} {a['relation']} {_an(a['colour2'])} {a['shape2']}."


def _an(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _pair_ok(colour: str, shape: str, split: str) -> bool:
    """Training scenes avoid the held-out pairs; held-out scenes may use any pair."""
    return split != "train" or (colour, shape) not in HELD_OUT


def _colour_shape(rng: random.Random, split: str) -> tuple[str, str]:
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if _pair_ok(colour, shape, split):
            return colour, shape


def sample_scene(rng: random.Random, split: str = "train", kind: str | None = None) -> Scene:
    """One random scene. ``split="train"`` never uses a held-out colour-shape pair."""
    kind = kind or rng.choice(KINDS)
    if kind == "single":
        colour, shape = _colour_shape(rng, split)
        size, position = rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
        col, row = POSITIONS[position]
        jitter = lambda: rng.uniform(-0.04, 0.04)  # noqa: E731
        obj = Obj(colour, shape, size, 0.2 + 0.3 * col + jitter(), 0.2 + 0.3 * row + jitter())
        return Scene(kind, [obj], {"size": size, "colour": colour, "shape": shape, "position": position})
    if kind == "count":
        colour, shape = _colour_shape(rng, split)
        n = rng.choice(list(COUNTS))
        cells = rng.sample([(c, r) for c in range(3) for r in range(3)], n)
        objs = [Obj(colour, shape, "small", 0.2 + 0.3 * c, 0.2 + 0.3 * r) for c, r in cells]
        return Scene(kind, objs, {"count": COUNTS[n], "colour": colour, "shape": shape})
    return _pair(rng, split)


def _pair(rng: random.Random, split: str) -> Scene:
    (c1, s1), (c2, s2) = _colour_shape(rng, split), _colour_shape(rng, split)
    while c2 == c1:
        c2, s2 = _colour_shape(rng, split)
    relation = rng.choice(RELATIONS)
    near, far = rng.uniform(0.22, 0.3), rng.uniform(0.7, 0.78)
    other = rng.uniform(0.3, 0.7)
    first, second = {"left of": ((near, other), (far, other)), "above": ((other, near), (other, far))}[relation]
    objs = [Obj(c1, s1, "small", *first), Obj(c2, s2, "small", *second)]
    return Scene("pair", objs, {"colour": c1, "shape": s1, "relation": relation, "colour2": c2, "shape2": s2})


def draw(scene: Scene, size: int = 64):
    """The scene as a PIL RGB image of ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * size, o.y * size, SIZES[o.size] * size
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif o.shape == "square":
            pen.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        elif o.shape == "triangle":
            pen.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return img


def scenes(num: int, seed: int, split: str) -> list[Scene]:
    """``num`` scenes of a split, deterministic in (seed, split). The test split is half scenes with a held-out
    colour-shape pair, half without, so both are measured."""
    rng = random.Random(f"slmforge.images:{seed}:{split}")
    out = []
    while len(out) < num:
        scene = sample_scene(rng, split)
        if split == "test" and scene.held_out() != (len(out) % 2 == 1):
            continue
        out.append(scene)
    return out


def write_split(folder: str | Path, num: int, seed: int, split: str, size: int = 64) -> Path:
    """Write ``num`` PNG images of a split and ``<split>.jsonl`` (file, caption, kind, attributes, held_out)."""
    from slmforge.runs import atomic_path

    folder = Path(folder)
    (folder / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(scenes(num, seed, split)):
        name = f"{split}/{i:06d}.png"
        draw(scene, size).save(folder / name)
        lines.append(json.dumps({"image": name, "caption": scene.caption(), "kind": scene.kind,
                                 "attrs": scene.attrs, "held_out": scene.held_out(),
                                 "objects": [asdict(o) for o in scene.objects]}))
    manifest = folder / f"{split}.jsonl"
    with atomic_path(manifest) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return manifest


# ---------------------------------------------------------------- scoring

_WORDS = {"size": list(SIZES), "colour": list(COLOURS), "colour2": list(COLOURS), "shape": list(SHAPES),
          "shape2": list(SHAPES), "position": list(POSITIONS), "relation": list(RELATIONS),
          "count": list(COUNTS.values())}


def parse_caption(text: str) -> tuple[str, dict] | None:
    """A caption -> (kind, attributes), or None when it follows no caption form. Inverse of ``caption_of``."""
    words = text.strip().lower().rstrip(".").split()
    if not words:
        return None
    if words[0] in COUNTS.values() and len(words) == 3 and words[2].endswith("s"):
        return "count", {"count": words[0], "colour": words[1], "shape": words[2][:-1]}
    joined = " ".join(words)
    if " at the " in joined and len(words) >= 6 and words[0] == "a":
        return "single", {"size": words[1], "colour": words[2], "shape": words[3],
                          "position": joined.split(" at the ", 1)[1]}
    for relation in RELATIONS:
        head, sep, tail = joined.partition(f" {relation} ")
        h, t = head.split(), tail.split()
        if sep and len(h) == 3 and len(t) == 3 and h[0] in ("a", "an") and t[0] in ("a", "an"):
            return "pair", {"colour": h[1], "shape": h[2], "relation": relation, "colour2": t[1], "shape2": t[2]}
    return None


def score_caption(text: str, kind: str, attrs: dict) -> dict[str, bool]:
    """Per attribute of the truth: did the caption name it? A caption of the wrong form names none."""
    parsed = parse_caption(text)
    got = parsed[1] if parsed and parsed[0] == kind else {}
    return {name: got.get(name) == value for name, value in attrs.items()}


# ---------------------------------------------------------------- the text family


def scene_text(rng: random.Random) -> Document:
    """A procedural document of captions (``data.families: [scenes]``): the words of descriptions, no images.

    Every colour-shape pair appears, held-out ones included: the language model knows the phrase "red triangle" as
    a language model knows English. What is held out is an image of a red triangle with its caption, which is what
    the projector learns from; the text says nothing about which images show one.
    """
    lines = [sample_scene(rng, "any").caption() for _ in range(rng.randint(3, 6))]
    text = "\n".join(f"Picture {i + 1}: {line}" for i, line in enumerate(lines))
    return Document("", text, {"family": "scenes"})
