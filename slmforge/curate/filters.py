"""Quality filters (Gopher's heuristics) and n-gram decontamination against evaluation sets.

Quality: the MassiveWeb rules of Gopher (Rae et al. 2021, arXiv 2112.11446, appendix A.1.1 and table A1). Words
are whitespace-separated tokens, lines are the non-blank lines, paragraphs the blocks between blank lines,
and characters are counted inside words. A document is dropped at the first rule it breaks, in this order:
  num_words             in [50, 100000]
  mean_word_length      in [3, 10]
  symbol_word_ratio     max(#"#", #"..." + #"…") / words <= 0.1
  bullet_lines          fraction of lines starting with a bullet <= 0.9
  ellipsis_lines        fraction of lines ending in "..." or "…" <= 0.3
  alpha_words           fraction of words with a letter >= 0.8
  stop_words            occurrences of the, be, to, of, and, that, have, with >= 2
  duplicate_lines / duplicate_paragraphs                 fraction equal to an earlier one <= 0.3
  duplicate_line_chars / duplicate_paragraph_chars       their share of the characters <= 0.2
  top_{2,3,4}gram_chars        characters covered by the most frequent n-gram <= 0.20, 0.18, 0.16
  duplicate_{5..10}gram_chars  characters in words covered by an n-gram seen earlier <= 0.15 .. 0.10

Decontamination: a training document is dropped if it shares any word n-gram (13 by default, GPT-3's rule,
Brown et al. 2020, arXiv 2005.14165, appendix C) with an evaluation item. N-grams are hashed on normalised text
exactly as ``dedup.shingle_hashes`` does (lowercase; a word is a run of ASCII letters, digits or non-ASCII
bytes), all documents of a batch at once; the record names the evaluation item and the n-gram.

Both are steps, ``run(docs, rank, world_size)``, that yield the documents they keep and pass every dropped
one to ``on_drop(doc, record)``. ``filter_corpus`` runs them per shard through ``steps.run_steps``, which writes
kept/, removed/ and reports.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from slmforge.config import TextSplit
from slmforge.curate.dedup import WORD_RE, shingle_hashes
from slmforge.curate.documents import Document, DropStep, read_documents
from slmforge.curate.executor import ExecutorName, executor
from slmforge.curate.steps import DocumentGuard, check_shard, run_steps

# The repository's copy of GSM8K test (../shared/data from the repository root).
GSM8K_TEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl"
BULLETS = ("•", "‣", "⁃", "◦", "▪", "●", "○", "■", "□", "-", "*", "–")
STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
# Whole-text patterns, so that no Python loop runs per word. A word is a maximal run of non-whitespace.
_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")  # a word without a letter
_PUNCT = r"[!-/:-@\[-`{-~]*"  # ASCII punctuation, as str.strip(string.punctuation) removes
_STOP_WORD = re.compile(rf"(?<!\S){_PUNCT}(?:{'|'.join(STOP_WORDS)}){_PUNCT}(?!\S)")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass
class FilterConfig:
    inputs: list[str] = field(default_factory=list)  # files, directories or globs (bad records are skipped)
    out_dir: str = "filtered"
    text_field: str = "text"
    text_split: TextSplit = "file"
    max_doc_bytes: int = 10_000_000  # longer documents are skipped and counted
    quality: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    max_duplicate_lines: float = 0.3
    max_duplicate_paragraphs: float = 0.3
    max_duplicate_line_chars: float = 0.2
    max_duplicate_paragraph_chars: float = 0.2
    max_top_ngram_chars: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])  # [i]: n = 2 + i
    max_duplicate_ngram_chars: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # [i]: n = 5 + i
    decontaminate: bool = True
    eval_paths: list[str] = field(default_factory=lambda: [str(GSM8K_TEST)])  # JSONL/Parquet/text eval sets
    eval_fields: list[str] = field(default_factory=lambda: ["question", "answer"])  # joined into one item text
    decontam_ngram: int = 13
    num_examples: int = 5  # example documents per drop reason in the report
    executor: ExecutorName = "local"  # local: shard after shard here; ray: the shards as Ray tasks (curate/executor.py)
    ray_address: str = ""  # executor=ray: empty starts a local Ray cluster; auto or HOST:PORT joins a running one
    ray_num_cpus: int = 0  # CPUs of a new local Ray cluster; 0 = all


# ---------------------------------------------------------------- quality signals


def _duplicates(items: list[str]) -> tuple[float, float]:
    """(fraction of items equal to an earlier item, those items' share of all characters)."""
    seen: set[str] = set()
    num_dup = dup_chars = 0
    for item in items:
        if item in seen:
            num_dup, dup_chars = num_dup + 1, dup_chars + len(item)
        seen.add(item)
    return num_dup / max(len(items), 1), dup_chars / max(sum(map(len, items)), 1)


def _ngrams(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(n)))


def _top_ngram_chars(words: list[str], n: int, num_chars: int) -> float:
    """Characters in the occurrences of the most frequent n-gram (ties: the first seen), over all characters."""
    gram, count = max(Counter(_ngrams(words, n)).items(), key=itemgetter(1), default=((), 0))
    return count * sum(map(len, gram)) / num_chars if count > 1 else 0.0


def _duplicate_ngram_chars(words: list[str], lengths: np.ndarray, n: int, num_chars: int) -> float:
    """Characters in words covered by an n-gram occurrence whose n-gram appeared earlier, over all characters."""
    first: dict[tuple[str, ...], int] = {}
    firsts = np.array([first.setdefault(g, i) for i, g in enumerate(_ngrams(words, n))], dtype=np.int64)
    starts = np.flatnonzero(firsts != np.arange(len(firsts)))
    if not len(starts):
        return 0.0
    depth = np.zeros(len(words) + 1, np.int64)
    np.add.at(depth, starts, 1)
    np.add.at(depth, starts + n, -1)
    return float(lengths[np.cumsum(depth[:-1]) > 0].sum()) / num_chars


def basic_signals(text: str, words: list[str]) -> dict[str, float]:
    """Gopher's quality signals, from the text and its whitespace words."""
    num_words = max(len(words), 1)
    lines = [line for line in text.splitlines() if line.strip()]
    num_lines = max(len(lines), 1)
    return dict(
        num_words=len(words),
        mean_word_length=sum(map(len, words)) / num_words,
        symbol_word_ratio=max(text.count("#"), text.count("...") + text.count("…")) / num_words,
        bullet_lines=sum(line.lstrip().startswith(BULLETS) for line in lines) / num_lines,
        ellipsis_lines=sum(line.rstrip().endswith(("...", "…")) for line in lines) / num_lines,
        alpha_words=(len(words) - len(_NO_LETTER_WORD.findall(text))) / num_words,
        # A word that is a stop word once lowercased and stripped of ASCII punctuation.
        stop_words=len(_STOP_WORD.findall(text.lower())),
    )


def repetition_signals(text: str, words: list[str], top_ns=(2, 3, 4), duplicate_ns=range(5, 11)) -> dict[str, float]:
    """Gopher's repetition signals (table A1)."""
    lines = [line for line in text.splitlines() if line.strip()]
    paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]
    out = dict(zip(("duplicate_lines", "duplicate_line_chars"), _duplicates(lines)))
    out.update(zip(("duplicate_paragraphs", "duplicate_paragraph_chars"), _duplicates(paragraphs)))
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    num_chars = max(int(lengths.sum()), 1)
    for n in top_ns:
        out[f"top_{n}gram_chars"] = _top_ngram_chars(words, n, num_chars)
    value = 1.0
    for n in duplicate_ns:
        # An n-gram seen earlier implies its (n-1)-gram prefix was too, so zero stays zero for longer n.
        value = _duplicate_ngram_chars(words, lengths, n, num_chars) if value else 0.0
        out[f"duplicate_{n}gram_chars"] = value
    return out


def gopher_signals(text: str) -> dict[str, float]:
    """Every Gopher quality and repetition signal of one text."""
    words = text.split()
    return dict(basic_signals(text, words), **repetition_signals(text, words))


def _rules(cfg: FilterConfig) -> tuple[list, list]:
    """(basic rules, repetition rules) as (signal, lowest allowed, highest allowed), in checking order."""
    inf = float("inf")
    basic = [("num_words", cfg.min_words, cfg.max_words),
             ("mean_word_length", cfg.min_mean_word_length, cfg.max_mean_word_length),
             ("symbol_word_ratio", -inf, cfg.max_symbol_word_ratio), ("bullet_lines", -inf, cfg.max_bullet_lines),
             ("ellipsis_lines", -inf, cfg.max_ellipsis_lines), ("alpha_words", cfg.min_alpha_words, inf),
             ("stop_words", cfg.min_stop_words, inf)]
    repetition = [("duplicate_lines", -inf, cfg.max_duplicate_lines),
                  ("duplicate_paragraphs", -inf, cfg.max_duplicate_paragraphs),
                  ("duplicate_line_chars", -inf, cfg.max_duplicate_line_chars),
                  ("duplicate_paragraph_chars", -inf, cfg.max_duplicate_paragraph_chars)]
    repetition += [(f"top_{2 + i}gram_chars", -inf, x) for i, x in enumerate(cfg.max_top_ngram_chars)]
    repetition += [(f"duplicate_{5 + i}gram_chars", -inf, x) for i, x in enumerate(cfg.max_duplicate_ngram_chars)]
    return basic, repetition


def _broken(signals: dict[str, float], rules: list) -> dict | None:
    for name, low, high in rules:
        value = signals[name]
        if not low <= value <= high:
            allowed = (f">= {low}" if high == float("inf") else f"<= {high}" if low == -float("inf")
                       else f"in [{low}, {high}]")
            return {"reason": name, "value": round(float(value), 4), "allowed": allowed}
    return None


def quality_failure(text: str, cfg: FilterConfig) -> dict | None:
    """The first Gopher rule ``text`` breaks, as {"reason", "value", "allowed"}, or None if it passes all."""
    basic, repetition = _rules(cfg)
    words = text.split()
    failure = _broken(basic_signals(text, words), basic)
    if failure is None:
        top_ns = range(2, 2 + len(cfg.max_top_ngram_chars))
        duplicate_ns = range(5, 5 + len(cfg.max_duplicate_ngram_chars))
        failure = _broken(repetition_signals(text, words, top_ns, duplicate_ns), repetition)
    return failure


OnDrop = Callable[[Document, dict], None]


class QualityFilter(DropStep):
    """Step: yields the documents that pass every Gopher rule; ``on_drop`` gets the others with the rule broken."""

    def __init__(self, cfg: FilterConfig, on_drop: OnDrop | None = None):
        self.cfg, self.on_drop = cfg, on_drop

    def why_dropped(self, doc: Document) -> dict | None:
        return quality_failure(doc.text, self.cfg)


# ---------------------------------------------------------------- decontamination


def load_eval_items(paths: list[str], fields: list[str]) -> list[tuple[str, str]]:
    """(id, text) per evaluation item: the ``fields`` of each record joined by newlines."""
    items = []
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"evaluation set {path} not found; set eval_paths=... or decontaminate=false")
        for doc in read_documents(path, text_field=fields[0]):
            missing = [f for f in fields[1:] if f not in doc.meta]
            if missing:
                raise ValueError(f"{path}: record {doc.id} has no field {missing[0]!r}; eval_fields={fields}")
            items.append((doc.id, "\n".join([doc.text] + [str(doc.meta[f]) for f in fields[1:]])))
    return items


class Decontaminator:
    """Step: drops documents that share a word n-gram with an evaluation item (see the module docstring)."""

    def __init__(self, items: list[tuple[str, str]], ngram: int = 13, on_drop: OnDrop | None = None,
                 batch_docs: int = 1000):
        self.items, self.ngram, self.on_drop, self.batch_docs = items, ngram, on_drop, batch_docs
        sh = shingle_hashes([text for _, text in items], ngram)
        counts = np.diff(sh.offsets)
        order = np.argsort(sh.hashes, kind="stable")
        self.keys = sh.hashes[order]  # (num_eval_ngrams,) sorted uint64
        self.item = np.repeat(np.arange(len(items)), counts)[order]  # the item each key came from
        self.position = (np.arange(len(sh.hashes)) - np.repeat(sh.offsets[:-1], counts))[order]  # its first word

    @classmethod
    def from_config(cls, cfg: FilterConfig, on_drop: OnDrop | None = None) -> "Decontaminator":
        return cls(load_eval_items(cfg.eval_paths, cfg.eval_fields), cfg.decontam_ngram, on_drop)

    def matches(self, texts: list[str]) -> list[dict | None]:
        """Per text, None or {"eval_item", "ngram", "position" (word index in the text), "num_matches"}."""
        out: list[dict | None] = [None] * len(texts)
        if not len(self.keys):
            return out
        sh = shingle_hashes(texts, self.ngram)
        at = np.minimum(np.searchsorted(self.keys, sh.hashes), len(self.keys) - 1)
        hits = np.flatnonzero(self.keys[at] == sh.hashes)
        doc = np.searchsorted(sh.offsets, hits, side="right") - 1
        num_matches = np.bincount(doc, minlength=len(texts))
        first = np.r_[True, doc[1:] != doc[:-1]] if len(hits) else np.zeros(0, bool)
        for h, d in zip(hits[first].tolist(), doc[first].tolist()):
            item, position = int(self.item[at[h]]), int(self.position[at[h]])
            words = WORD_RE.findall(self.items[item][1].lower().encode("utf-8"))[position:position + self.ngram]
            out[d] = {"eval_item": self.items[item][0], "ngram": b" ".join(words).decode("utf-8", "replace"),
                      "position": int(h - sh.offsets[d]), "num_matches": int(num_matches[d])}
        return out

    def run(self, docs: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= self.batch_docs:
                yield from self._clean(batch)
                batch = []
        yield from self._clean(batch)

    def _clean(self, batch: list[Document]) -> Iterator[Document]:
        for doc, match in zip(batch, self.matches([d.text for d in batch]) if batch else []):
            if match is None:
                yield doc
            elif self.on_drop:
                self.on_drop(doc, {"reason": "contamination", **match})


# ---------------------------------------------------------------- running over shards


def filter_corpus(cfg: FilterConfig, shard_index: int | None = None, num_shards: int | None = None) -> dict:
    """Quality-filter and decontaminate ``cfg.inputs`` into ``cfg.out_dir``; return the report.

    Writes kept/RANK-of-WORLD.jsonl, removed/RANK-of-WORLD.jsonl (id, reason and details per dropped
    document) and reports/RANK-of-WORLD.json per shard, and report.json once every shard's report exists.
    ``shard_index=None`` runs every shard: in turn, or with ``cfg.executor="ray"`` as Ray tasks, with the same
    outputs (``num_shards=None``: 1, or under Ray one shard per CPU of the cluster); a job array runs one shard
    index per task.
    """
    if not cfg.inputs:
        raise ValueError("filter: inputs is empty; set inputs=PATH[,PATH...] (files, directories or globs)")
    check_shard("filter", shard_index, num_shards or 1)
    steps = [DocumentGuard(cfg.max_doc_bytes)]
    if cfg.quality:
        steps.append(QualityFilter(cfg))
    if cfg.decontaminate:
        steps.append(Decontaminator.from_config(cfg))
    with executor(cfg, "filter", shard_index) as ex:
        return run_steps(steps, cfg.inputs, cfg.out_dir, shard_index, num_shards or ex.num_cpus, cfg.text_field,
                         cfg.text_split, cfg.num_examples, label="filter", config=asdict(cfg), save=cfg,
                         map_shards=ex.map)
