"""A fixed knowledge base of fictional people: facts a model must memorize, split into disjoint sources.

The knowledge probe of Engram memory (Cheng et al., arXiv 2601.07372) and FlexOlmo (Shi et al., arXiv 2507.07024).
Unlike the procedural ``facts`` family (one invented entity per document, questions answered by its paragraph),
the entities here are fixed by the seed and every question is asked without the paragraph: only a model that
stored the fact during training can answer.

- ``KnowledgeBase(num_entities, num_sources, seed)``: entity i has an invented, unique name and one value for each
  attribute in ``ATTRIBUTES`` (city, job, color, pet, instrument, food), drawn by the seed. Entity i belongs to
  source ``i % num_sources``: sources are disjoint sets of entities, so a source's facts appear in its documents
  only (FlexOlmo trains one expert per source and opts a source out by removing its expert).
- ``.documents(source=None)``: training text, ``num_phrasings`` biographies per entity; biography r states every
  fact with phrasing r of its attribute, in a shuffled order.
- ``.validation_documents(source=None)``: one held-out biography per entity: the same facts, phrasings mixed per
  sentence and a new order (text never seen in training, knowledge that was).
- ``.questions(source=None)``: (prompt, answer) pairs, one per fact. The prompt is the first phrasing cut before
  the value ("Zorava lives in the city of"), the answer the value ("Melith"); score it as " " + answer.
- ``candidates(answer)``: the values of the attribute the answer belongs to (value lists are disjoint, so the
  answer names its attribute): the choices ``eval.facts.fact_accuracy`` ranks, chance = 1 / len(candidates).
"""

from __future__ import annotations

import random

from slmforge.synth.procedural import COLORS, FOODS, INSTRUMENTS, JOBS, KINDS, ONSETS


def _name(rng: random.Random, syllables: int) -> str:
    # Open syllables and a final consonant: Zorava, Melith, Tarnis (procedural's invented names, fixed length).
    return ("".join(rng.choice(ONSETS) + rng.choice("aeiou") for _ in range(syllables)) + rng.choice("nrlsm")).title()


def _cities() -> list[str]:
    rng, out = random.Random(1234), []
    while len(out) < 12:
        city = _name(rng, 2)
        if city not in out:
            out.append(city)
    return out


# attribute -> (values, phrasings); phrasing 0 is the question's, cut at "{v}".
ATTRIBUTES: dict[str, tuple[list[str], list[str]]] = {
    "city": (_cities(), ["{e} lives in the city of {v}.", "The home of {e} is in {v}.",
                         "In the city of {v} lives {e}.", "{e} has a small house in {v}."]),
    "job": (JOBS, ["{e} works as the town {v}.", "Everyone knows {e} as the town {v}.",
                   "The town {v} is {e}.", "For many years {e} has been the town {v}."]),
    "color": (COLORS, ["The favorite color of {e} is {v}.", "{e} likes the color {v} best.",
                       "No color pleases {e} more than {v}.", "Ask {e} and you hear that {v} is the best color."]),
    "pet": (KINDS, ["{e} has a pet {v}.", "At home, {e} takes care of a pet {v}.",
                    "The pet {v} belongs to {e}.", "Every morning {e} feeds the pet {v}."]),
    "instrument": (INSTRUMENTS, ["{e} plays the {v}.", "In the evenings, {e} practices the {v}.",
                                 "The {v} is the instrument of {e}.", "Friends say {e} plays the {v} well."]),
    "food": (FOODS, ["The favorite food of {e} is {v}.", "{e} loves to eat {v}.",
                     "Nothing tastes better to {e} than {v}.", "On holidays {e} always asks for {v}."]),
}
_ATTRIBUTE_OF = {v: a for a, (values, _) in ATTRIBUTES.items() for v in values}
assert len(_ATTRIBUTE_OF) == sum(len(values) for values, _ in ATTRIBUTES.values()), "value lists must be disjoint"


def candidates(answer: str) -> list[str]:
    """Every value of the attribute ``answer`` belongs to (the answer among them)."""
    if answer not in _ATTRIBUTE_OF:
        raise ValueError(f"{answer!r} is not a value of any knowledge-base attribute ({', '.join(ATTRIBUTES)})")
    return ATTRIBUTES[_ATTRIBUTE_OF[answer]][0]


class KnowledgeBase:
    """``num_entities`` fictional people with one value per attribute, split into ``num_sources`` sources."""

    def __init__(self, num_entities: int = 200, num_sources: int = 1, seed: int = 0, num_phrasings: int = 3):
        if not 1 <= num_sources <= num_entities:
            raise ValueError(f"num_sources must be in 1..num_entities ({num_entities}), got {num_sources}")
        if not 1 <= num_phrasings <= 4:
            raise ValueError(f"num_phrasings must be in 1..4, got {num_phrasings}")
        self.num_sources, self.num_phrasings, self.seed = num_sources, num_phrasings, seed
        rng = random.Random(seed)
        taken = set(_ATTRIBUTE_OF)
        self.entities: list[str] = []
        while len(self.entities) < num_entities:
            name = _name(rng, rng.randint(2, 3))
            if name not in taken:
                taken.add(name)
                self.entities.append(name)
        # facts[i]: attribute -> value of entity i
        self.facts = [{a: rng.choice(values) for a, (values, _) in ATTRIBUTES.items()} for _ in self.entities]

    @property
    def sources(self) -> list[int]:
        return list(range(self.num_sources))

    def source_of(self, entity_index: int) -> int:
        return entity_index % self.num_sources

    def _members(self, source: int | None) -> list[int]:
        if source is not None and source not in self.sources:
            raise ValueError(f"source must be one of 0..{self.num_sources - 1}, got {source}")
        return [i for i in range(len(self.entities)) if source is None or self.source_of(i) == source]

    def documents(self, source: int | None = None) -> list[str]:
        """Training biographies of the source's entities (all when None): ``num_phrasings`` per entity."""
        rng = random.Random(f"{self.seed}-train")
        docs = []
        for r in range(self.num_phrasings):
            for i in self._members(source):
                docs.append(self._biography(i, [r] * len(ATTRIBUTES), rng))
        return docs

    def validation_documents(self, source: int | None = None) -> list[str]:
        """One held-out biography per entity: each sentence in a random phrasing, a new order."""
        rng = random.Random(f"{self.seed}-validation")
        return [self._biography(i, [rng.randrange(4) for _ in ATTRIBUTES], rng) for i in self._members(source)]

    def questions(self, source: int | None = None) -> list[tuple[str, str]]:
        """(prompt, answer) for every fact of the source's entities; the answer follows the prompt after a space."""
        out = []
        for i in self._members(source):
            for a, (_, phrasings) in ATTRIBUTES.items():
                prompt = phrasings[0].split("{v}")[0].rstrip().format(e=self.entities[i])
                out.append((prompt, self.facts[i][a]))
        return out

    def _biography(self, i: int, phrasing: list[int], rng: random.Random) -> str:
        sentences = [ATTRIBUTES[a][1][p].format(e=self.entities[i], v=self.facts[i][a])
                     for a, p in zip(ATTRIBUTES, phrasing)]
        rng.shuffle(sentences)
        return " ".join(s[0].upper() + s[1:] for s in sentences)
