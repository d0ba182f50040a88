"""Needle-in-a-haystack samples: a haystack of any corpus, needles at controlled depths, questions after it.

Kamradt's needle test and its passkey form (Mohtashami & Jaggi 2023, arXiv 2305.16300), with RULER's needle kinds
(Hsieh et al. 2024, arXiv 2404.06654):

  passkey  "The pass key is 48213. Remember it. 48213 is the pass key." -> "What is the pass key? ... is" 48213
  kv       one key-value fact: "The secret number of the zorvath is 4821." -> "The secret number of the zorvath is"
  multi    ``num_needles`` such facts with distinct keys at random sentence boundaries; one (or ``questions``) asked
  odd      a needle phrased unlike any prose haystack: "[config] vault_code = 4821 ;;"

A sample is token ids: EOS, the haystack (whole sentences of the corpus, each tokenized on its own with a leading
space, so lengths are exact; the first cut from the front to fit), the needles inserted at sentence boundaries, then "\\nQuestion: ... Answer: ... is"
and the answer " 48213" for each question. ``length`` counts the tokens a model reads before its last answer (the
context length). The asked needle goes to the sentence boundary nearest
``depth`` x haystack tokens, and ``Sample.depth`` is the share of haystack tokens before it (within one sentence
of the request). The haystack source does not matter: "procedural" (the stories and facts of
``synth/procedural.py``) or any files ``read_documents`` reads (.txt, .md, JSONL ``{"text"}``, Parquet: books,
WikiText, essays). Everything is a function of (seed, key): a sample is rebuilt, not stored; ``stream`` yields
them endlessly.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterator

from slmforge.config import check_min
from slmforge.curate.documents import read_documents
from slmforge.registry import lookup
from slmforge.synth.procedural import facts, narrative

PROCEDURAL = "procedural"
MAX_HAYSTACK_CHARS = 64_000_000  # documents read from the haystack files; the rest are never used
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_ONSETS = "b br d dr f g k kr l m n p r s st t th v z".split()
_VOWELS = "a e i o u ai ea".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m"]


def _passkey(rng: random.Random, value: str) -> tuple[str, str]:
    return f"The pass key is {value}. Remember it. {value} is the pass key.", "What is the pass key? The pass key is"


def _kv(rng: random.Random, value: str, key: str = "") -> tuple[str, str]:
    return f"The secret number of the {key} is {value}.", f"The secret number of the {key} is"


def _odd(rng: random.Random, value: str) -> tuple[str, str]:
    name = rng.choice(["vault_code", "access_pin", "door_token", "unlock_id"])
    return f"[config] {name} = {value} ;;", f"What is {name} in the config? {name} ="


KINDS = {"passkey": _passkey, "kv": _kv, "multi": _kv, "odd": _odd}


@dataclass
class NiahConfig:
    """What the samples are made of (the ``niah`` training and ``eval niah`` share these keys)."""

    haystack: list[str] = field(default_factory=lambda: [PROCEDURAL])  # "procedural" and/or text files or globs
    text_field: str = "text"  # the text field of JSONL/Parquet haystack files
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # needle kinds drawn from (passkey kv multi odd)
    num_needles: int = 4  # multi: key-value needles placed, one of them asked at the requested depth
    digits: int = 5  # digits of every answer number
    questions: int = 1  # questions asked after the haystack (multi; training: more answers per sample)
    seed: int = 0

    def validate(self, prefix: str = "") -> None:
        check_min(self, prefix, 1, "num_needles digits questions")
        if not self.haystack:
            raise ValueError(f"{prefix}haystack is empty: give 'procedural' or text/JSONL files")
        if not self.kinds:
            raise ValueError(f"{prefix}kinds is empty: choose from {', '.join(KINDS)}")
        for kind in self.kinds:
            try:
                lookup(KINDS, kind, "needle kind")
            except ValueError as exc:
                raise ValueError(f"{prefix}kinds: {exc}") from None


@dataclass
class Sample:
    ids: list[int]  # EOS, haystack with needles, then each question followed by its answer
    answers: list[tuple[int, int]]  # (start, end) of each answer in ids; the last is the one at ``depth``
    answer_texts: list[str]  # the answers as text ("48213"), in the order asked
    kind: str
    depth: float  # haystack tokens before the asked needle / haystack tokens
    needle_start: int  # index in ids of the asked needle's first token
    haystack_tokens: int

    @property
    def prompt(self) -> list[int]:
        """What a model reads before its last answer: ``length`` tokens."""
        return self.ids[: self.answers[-1][0]]


class Haystack:
    """Sentences as token ids from any corpus, read once and tokenized one document at a time when first used."""

    def __init__(self, sources: list[str], tokenizer, text_field: str = "text"):
        self.tokenizer = tokenizer
        self.procedural = PROCEDURAL in sources
        files = [s for s in sources if s != PROCEDURAL]
        self.docs: list[str] = []
        if files:
            try:
                self._read(files, text_field)
            except ValueError as exc:
                raise ValueError(f"haystack: {exc}") from None
            if not self.docs:
                raise ValueError(f"haystack={files}: no text read; give text or JSONL files with a "
                                 f"{text_field!r} field")
        self._cache: dict[int, list[list[int]]] = {}

    def _read(self, files: list[str], text_field: str) -> None:
        chars = 0
        for doc in read_documents(files, text_field=text_field, text_split="chunk", chunk_chars=4000):
            self.docs.append(doc.text)
            chars += len(doc.text)
            if chars >= MAX_HAYSTACK_CHARS:
                return

    def sentences(self, rng: random.Random) -> Iterator[list[int]]:
        """Endless sentences (token ids) from a document ``rng`` picks on, documents in corpus order (procedural
        documents alternate with the files' when both are given)."""
        start = rng.randrange(len(self.docs)) if self.docs else 0
        for i in range(10**12):
            if self.procedural and (not self.docs or i % 2):
                text = (narrative if rng.random() < 0.7 else facts)(random.Random(rng.random())).text
                yield from self._encode(text)
            else:
                index = (start + i // (1 + self.procedural)) % len(self.docs)
                if index not in self._cache:
                    if len(self._cache) > 4096:
                        self._cache.clear()
                    self._cache[index] = self._encode(self.docs[index])
                yield from self._cache[index]

    def _encode(self, text: str) -> list[list[int]]:
        parts = [" " + " ".join(s.split()) for s in _SENTENCE.split(text) if s.strip()]
        return [ids for ids in self.tokenizer.encode_batch(parts) if ids]


def make_sample(haystack: Haystack, cfg: NiahConfig, length: int, depth: float, key: str) -> Sample:
    """The sample ``key`` (any string; with ``cfg.seed`` it fixes every draw) of ``length`` context tokens with the
    asked needle at ``depth`` (0 = first, 1 = last in the haystack)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth={depth}: expected a fraction in [0, 1]")
    tok = haystack.tokenizer
    rng = random.Random(f"slmforge.niah:{cfg.seed}:{key}")
    kind = rng.choice(cfg.kinds)
    needles = _needles(rng, kind, cfg)  # [(needle, question, answer)], the asked ones first
    asked = needles[: min(cfg.questions, len(needles))][::-1]  # the depth-controlled needle is asked last
    needle_ids = [tok.encode(" " + n) for n, _, _ in needles]
    qa_ids = [(tok.encode("\nQuestion: " + q), tok.encode(" " + a)) for _, q, a in asked]
    fixed = 1 + sum(map(len, needle_ids)) + sum(len(q) + len(a) for q, a in qa_ids) - len(qa_ids[-1][1])
    budget = length - fixed
    if budget < 1:
        raise ValueError(f"length={length}: too short for the needles and questions ({fixed} tokens); give a "
                         f"length above {fixed}")
    sentences = _fill(haystack.sentences(rng), budget)
    bounds = [0]
    for s in sentences:
        bounds.append(bounds[-1] + len(s))
    # The asked needle at the boundary nearest the requested depth; the others at random boundaries.
    at = min(range(len(bounds)), key=lambda j: abs(bounds[j] - depth * budget))
    places = {0: at, **{k: rng.randrange(len(bounds)) for k in range(1, len(needles))}}
    ids, needle_start = [tok.eos_id], 0
    for j in range(len(sentences) + 1):
        for k in sorted(k for k, p in places.items() if p == j):
            if k == 0:
                needle_start = len(ids)
            ids += needle_ids[k]
        if j < len(sentences):
            ids += sentences[j]
    spans = []
    for q, a in qa_ids:
        ids += q
        spans.append((len(ids), len(ids) + len(a)))
        ids += a
    return Sample(ids, spans, [a for _, _, a in asked], kind, bounds[at] / budget, needle_start, budget)


def _needles(rng: random.Random, kind: str, cfg: NiahConfig) -> list[tuple[str, str, str]]:
    count = cfg.num_needles if kind == "multi" else 1
    values = [str(rng.randrange(10 ** (cfg.digits - 1), 10**cfg.digits)) for _ in range(count)]
    if kind in ("kv", "multi"):
        keys: list[str] = []
        while len(keys) < count:
            word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + rng.choice(_CODAS)
            keys += [word] * (word not in keys)
        return [(*_kv(rng, v, k), v) for v, k in zip(values, keys)]
    return [(*KINDS[kind](rng, v), v) for v in values]


def _fill(sentences: Iterator[list[int]], budget: int) -> list[list[int]]:
    """Whole sentences filling ``budget`` tokens exactly, the first ones cut from the front (a window that starts
    mid-sentence and ends at a sentence end, so that every needle boundary after the first is a sentence end)."""
    out, total = [], 0
    for s in sentences:
        out.append(s)
        total += len(s)
        if total >= budget:
            break
    excess = total - budget
    while excess:
        cut = min(excess, len(out[0]))
        out[0], excess = out[0][cut:], excess - cut
        if not out[0]:
            out.pop(0)
    return out


def stream(haystack: Haystack, cfg: NiahConfig, lengths: list[int], depths: list[float] | None = None,
           prefix: str = "stream") -> Iterator[Sample]:
    """Endless samples cycling through ``lengths``, at ``depths`` in turn (None: a uniform random depth each)."""
    rng = random.Random(f"slmforge.niah.depths:{cfg.seed}:{prefix}")
    for i in range(10**12):
        depth = depths[i % len(depths)] if depths else rng.random()
        yield make_sample(haystack, cfg, lengths[i % len(lengths)], depth, f"{prefix}:{i}")
