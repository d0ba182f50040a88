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
- ``domains=[...]`` (one name of ``DOMAINS`` per source; default: every source ``people``): source s's entities
  are of kind ``domains[s]``, with that kind's attributes, phrasings and name form (``medicine``: drugs,
  ``astronomy``: planets, ``finance``: companies). Distinct domains give distinct vocabulary, as separate data
  owners' data would have: what FlexOlmo's domain routing needs (``benchmarks/flexolmo.py``).
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


def _w(words: str) -> list[str]:
    return words.split()


# Entity kinds beyond people: kind -> (name form, attributes as ATTRIBUTES). Single-word values, phrasing 0 ends
# with "{v}." (the question's cut).
DOMAINS: dict[str, tuple[str, dict[str, tuple[list[str], list[str]]]]] = {
    "people": ("{n}", ATTRIBUTES),
    "medicine": ("{n}ex", {
        "condition": (_w("migraine insomnia asthma eczema arthritis anemia gout vertigo bronchitis psoriasis"),
                      ["The drug {e} is prescribed for {v}.", "Doctors give {e} to patients with {v}.",
                       "For {v}, the usual medicine is {e}.", "Clinical trials showed {e} relieves {v}."]),
        "form": (_w("tablet capsule syrup inhaler ointment injection patch lozenge"),
                 ["The dosage form of {e} is {v}.", "Pharmacies stock {e} in {v} form.",
                  "The {v} form of {e} is the only one sold.", "Each dose of {e} comes in {v} form."]),
        "side_effect": (_w("drowsiness nausea dizziness rash fatigue thirst hiccups sweating"),
                        ["The main side effect of {e} is {v}.", "Patients on {e} often report {v}.",
                         "Some {v} is expected after a dose of {e}.", "The leaflet of {e} warns about {v}."]),
        "organ": (_w("liver kidney lung heart stomach spine bladder pancreas"),
                  ["The drug {e} acts mainly on the {v}.", "Once absorbed, {e} targets the {v}.",
                   "The {v} is where {e} does its work.", "Pharmacologists say {e} binds to cells of the {v}."]),
    }),
    "astronomy": ("Planet {n}", {
        "gas": (_w("methane argon neon helium ammonia xenon ozone nitrogen"),
                ["The atmosphere of {e} is mostly {v}.", "Probes found thick {v} around {e}.",
                 "Clouds of {v} cover {e}.", "Spectra of {e} show strong lines of {v}."]),
        "moons": (_w("two three four five six seven eight nine"),
                  ["The number of moons of {e} is {v}.", "Telescopes count {v} moons around {e}.",
                   "Exactly {v} moons orbit {e}.", "Astronomers list {v} moons for {e}."]),
        "mineral": (_w("quartz basalt granite obsidian marble cobalt nickel sulfur"),
                    ["The crust of {e} is rich in {v}.", "Landers on {e} dug up {v}.",
                     "Plains of {v} stretch across {e}.", "Surveys map deposits of {v} on {e}."]),
        "climate": (_w("frozen scorching stormy humid arid misty windy barren"),
                    ["The surface of {e} is {v}.", "Orbiters describe {e} as {v}.",
                     "No world in its system is as {v} as {e}.", "Seen from orbit, {e} looks {v}."]),
    }),
    "finance": ("{n} Corp", {
        "sector": (_w("shipping mining banking insurance textiles software farming railways"),
                   ["The company {e} operates in {v}.", "Analysts rank {e} among leaders in {v}.",
                    "In {v}, the largest firm is {e}.", "Most revenue of {e} comes from {v}."]),
        "product": (_w("tractors turbines cables lenses batteries pumps valves helmets"),
                    ["The best-selling product of {e} is {v}.", "Factories of {e} turn out {v}.",
                     "Buyers of {v} often choose {e}.", "Shareholders of {e} hear mostly about {v}."]),
        "currency": (_w("dollars euros francs pesos rupees kronor yen dinars"),
                     ["The shares of {e} trade in {v}.", "Quarterly reports of {e} are stated in {v}.",
                      "Investors pay in {v} for stock of {e}.", "Dividends of {e} are paid in {v}."]),
        "logo": (_w("anchor crown eagle tower lantern compass arrow wheel"),
                 ["The logo of {e} shows the {v}.", "Every product of {e} carries the {v} emblem.",
                  "The {v} on the letterhead marks {e}.", "Brand guides of {e} center on the {v}."]),
    }),
}
_ATTRIBUTE_OF = {v: (kind, a) for kind, (_, attrs) in DOMAINS.items() for a, (values, _) in attrs.items()
                 for v in values}
assert len(_ATTRIBUTE_OF) == sum(len(values) for _, attrs in DOMAINS.values() for values, _ in attrs.values()), \
    "value lists must be disjoint"


def candidates(answer: str) -> list[str]:
    """Every value of the attribute ``answer`` belongs to (the answer among them)."""
    if answer not in _ATTRIBUTE_OF:
        raise ValueError(f"{answer!r} is not a value of any knowledge-base attribute ({', '.join(ATTRIBUTES)})")
    kind, attribute = _ATTRIBUTE_OF[answer]
    return DOMAINS[kind][1][attribute][0]


class KnowledgeBase:
    """``num_entities`` fictional people with one value per attribute, split into ``num_sources`` sources."""

    def __init__(self, num_entities: int = 200, num_sources: int = 1, seed: int = 0, num_phrasings: int = 3,
                 domains: list[str] | None = None):
        if not 1 <= num_sources <= num_entities:
            raise ValueError(f"num_sources must be in 1..num_entities ({num_entities}), got {num_sources}")
        if not 1 <= num_phrasings <= 4:
            raise ValueError(f"num_phrasings must be in 1..4, got {num_phrasings}")
        self.domains = list(domains) if domains is not None else ["people"] * num_sources
        if len(self.domains) != num_sources or not set(self.domains) <= DOMAINS.keys():
            raise ValueError(f"domains must name one of {', '.join(DOMAINS)} per source ({num_sources}), "
                             f"got {domains}")
        self.num_sources, self.num_phrasings, self.seed = num_sources, num_phrasings, seed
        rng = random.Random(seed)
        taken = set(_ATTRIBUTE_OF)
        self.entities: list[str] = []
        while len(self.entities) < num_entities:
            form = DOMAINS[self.domains[self.source_of(len(self.entities))]][0]
            name = form.format(n=_name(rng, rng.randint(2, 3)))
            if name not in taken:
                taken.add(name)
                self.entities.append(name)
        # facts[i]: attribute -> value of entity i
        self.facts = [{a: rng.choice(values) for a, (values, _) in self.attributes(i).items()}
                      for i in range(len(self.entities))]

    def attributes(self, entity_index: int) -> dict[str, tuple[list[str], list[str]]]:
        """The entity's kind's attributes: values and phrasings (``ATTRIBUTES`` for people)."""
        return DOMAINS[self.domains[self.source_of(entity_index)]][1]

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
                docs.append(self._biography(i, [r] * len(self.attributes(i)), rng))
        return docs

    def validation_documents(self, source: int | None = None) -> list[str]:
        """One held-out biography per entity: each sentence in a random phrasing, a new order."""
        rng = random.Random(f"{self.seed}-validation")
        return [self._biography(i, [rng.randrange(4) for _ in self.attributes(i)], rng) for i in self._members(source)]

    def questions(self, source: int | None = None) -> list[tuple[str, str]]:
        """(prompt, answer) for every fact of the source's entities; the answer follows the prompt after a space."""
        out = []
        for i in self._members(source):
            for a, (_, phrasings) in self.attributes(i).items():
                prompt = phrasings[0].split("{v}")[0].rstrip().format(e=self.entities[i])
                out.append((prompt, self.facts[i][a]))
        return out

    def _biography(self, i: int, phrasing: list[int], rng: random.Random) -> str:
        attributes = self.attributes(i)
        sentences = [attributes[a][1][p].format(e=self.entities[i], v=self.facts[i][a])
                     for a, p in zip(attributes, phrasing)]
        rng.shuffle(sentences)
        return " ".join(s[0].upper() + s[1:] for s in sentences)
