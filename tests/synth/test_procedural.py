"""Procedural corpus: determinism, disjoint splits, verified arithmetic in GSM8K format, checked sorting."""

import hashlib
import random
import re

import pytest

from slmforge.config import DataConfig
from slmforge.synth.procedural import (FAMILIES, TOPIC_ITEMS, arithmetic, build_corpus, check_sorting, safe_eval,
                                       sorting, topic_items, verify_arithmetic)

# lm-eval-harness gsm8k's answer extraction ("strict-match").
GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
ALL = DataConfig().families  # the default corpus's families (``scenes``, the vision captions, is opt-in)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(ALL, num_train=2000, num_val=200, num_test=200, seed=7)


def test_sizes_ids_and_even_mix(corpus):
    assert {s: len(d) for s, d in corpus.items()} == {"train": 2000, "validation": 200, "test": 200}
    for split, docs in corpus.items():
        counts = {f: sum(d.meta["family"] == f for d in docs) for f in ALL}
        assert counts == dict.fromkeys(ALL, len(docs) // 4)
        ids = [d.id for d in docs]
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(rf"({'|'.join(ALL)})-{split}-\d{{6}}", i) for i in ids)
    # Shuffled: the families are interleaved, not in blocks.
    assert len({d.meta["family"] for d in corpus["train"][:20]}) > 1


def test_deterministic_by_seed(corpus):
    again = build_corpus(ALL, num_train=2000, num_val=200, num_test=200, seed=7)
    other = build_corpus(ALL, num_train=2000, num_val=200, num_test=200, seed=8)
    for split in corpus:
        assert [(d.id, d.text, d.meta) for d in again[split]] == [(d.id, d.text, d.meta) for d in corpus[split]]
        assert [d.text for d in other[split]] != [d.text for d in corpus[split]]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def test_splits_share_no_problem(corpus):
    def keys(split):
        return {_norm(d.meta.get("question") or d.meta.get("entity") or d.text) for d in corpus[split]}

    train, val, test = keys("train"), keys("validation"), keys("test")
    assert len(train) == 2000 and len(val) == 200 and len(test) == 200
    assert not (train & val) and not (train & test) and not (val & test)
    texts = [_norm(d.text) for docs in corpus.values() for d in docs]
    assert len(set(texts)) == len(texts)


def test_arithmetic_verifies_and_matches_gsm8k_format(corpus):
    docs = [d for docs in corpus.values() for d in docs if d.meta["family"] == "arithmetic"]
    num_steps = set()
    for d in docs:
        question, solution, answer = d.meta["question"], d.meta["solution"], d.meta["answer"]
        assert d.text == f"Question: {question}\nAnswer: {solution}"
        assert GSM8K_ANSWER.findall(d.text) == [answer]
        assert verify_arithmetic(question, solution) == int(answer) >= 0
        # Every annotation re-evaluates, independently of the verifier, to the number written after it.
        for expr, result in re.findall(r"<<([^=]+)=(\d+)>>", solution):
            assert safe_eval(expr) == int(result) and f">>{result}" in solution
        num_steps.add(solution.count("<<"))
    assert num_steps == {2, 3, 4}
    # Varied templates: many distinct question openings.
    assert len({" ".join(d.meta["question"].split()[1:4]) for d in docs}) > 30


VERIFY_Q = "Tom has 3 bags with 4 apples each. He eats 2. How many are left?"
VERIFY_OK = "He has 3 * 4 = <<3*4=12>>12 apples.\nHe has 12 - 2 = <<12-2=10>>10 left.\n#### 10"


def test_verifier_accepts_gsm8k_style_solution():
    assert verify_arithmetic(VERIFY_Q, VERIFY_OK) == 10


@pytest.mark.parametrize("old, new", [
    ("<<3*4=12>>12", "<<3*4=13>>13"),  # wrong result
    (">>10 left", ">>11 left"),  # number shown after the annotation differs
    ("#### 10", "#### 11"),  # final answer differs from the chain
    ("\n#### 10", ""),  # no final line
    ("12-2=10>>10 left.\n#### 10", "12-9=3>>3 left.\n#### 3"),  # 9 appears nowhere before
    ("<<3*4=12>>", "<<3*4=12"),  # broken annotation
], ids=["wrong-result", "shown-differs", "final-differs", "no-final", "unknown-number", "malformed"])
def test_verifier_rejects_wrong_solutions(old, new):
    assert old in VERIFY_OK
    with pytest.raises(ValueError):
        verify_arithmetic(VERIFY_Q, VERIFY_OK.replace(old, new))


@pytest.mark.parametrize("expr", ["__import__('os')", "2**10", "3 % 2", "1.5*2", "x+1", "4/0"])
def test_safe_eval_refuses_non_arithmetic(expr):
    with pytest.raises(ValueError):
        safe_eval(expr)


def test_sorting_answers_recomputed(corpus):
    docs = [d for docs in corpus.values() for d in docs if d.meta["family"] == "sorting"]
    assert {d.meta["kind"] for d in docs} == {"numbers", "words", "extreme", "compare"}
    for d in docs:
        q, a = d.meta["question"], d.meta["answer"]
        assert d.text == f"Question: {q}\nAnswer: {a}" and check_sorting(q, a)
        if d.meta["kind"] == "numbers":
            listed = [int(n) for n in q.split(": ")[1].rstrip(".").split(", ")]
            assert [int(n) for n in a.split(", ")] == sorted(listed, reverse=q.startswith("Sort these numbers from l"))
    assert not check_sorting("Sort these numbers from smallest to largest: 3, 1, 2.", "3, 2, 1")
    assert not check_sorting("Mia is 9 years old and Leo is 7 years old. Who is older?", "Leo")
    assert check_sorting("Mia is 9 years old and Leo is 7 years old. Who is older?", "Mia")


def test_facts_answers_come_from_paragraph_and_narratives_are_stories(corpus):
    docs = [d for docs in corpus.values() for d in docs]
    for d in (d for d in docs if d.meta["family"] == "facts"):
        paragraph = d.text.split("\n\n")[0].lower()
        assert 2 <= len(d.meta["qa"]) <= 4 and d.meta["entity"].lower() in paragraph
        assert all(a.lower() in paragraph for _, a in d.meta["qa"])
    stories = [d.text for d in docs if d.meta["family"] == "narrative"]
    lengths = [len(re.findall(r"[.!?](?= |$)", s)) for s in stories]
    assert min(lengths) >= 4 and max(lengths) <= 10
    assert len({s.split(".")[0] for s in stories}) > len(stories) // 2


def test_each_family_alone_and_unknown_family():
    for family in ALL:
        out = build_corpus([family], num_train=30, num_val=5, num_test=5, seed=1)
        assert {d.meta["family"] for split in out.values() for d in split} == {family}
    with pytest.raises(ValueError, match="unknown procedural family 'arithmetc'.*arithmetic"):
        build_corpus(["arithmetc"], 10, 1, 1, seed=0)


def test_not_enough_unique_items_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(FAMILIES, "tiny", lambda rng: sorting(random.Random(rng.randint(0, 4))))
    with pytest.raises(ValueError, match="family 'tiny' produced only .* unique items"):
        build_corpus(["tiny"], num_train=50, num_val=5, num_test=5, seed=0)


def test_generation_draws_each_document_about_once(monkeypatch):
    """Generation cost is linear in the documents asked for: few draws are thrown away as duplicates or for a
    full split (a count, not a clock; the speed itself is benchmarks/' business)."""
    calls = dict.fromkeys(ALL, 0)

    def counting(name, make):
        def draw(rng):
            calls[name] += 1
            return make(rng)
        return draw

    for name in ALL:
        monkeypatch.setitem(FAMILIES, name, counting(name, FAMILIES[name]))
    out = build_corpus(ALL, num_train=8000, num_val=100, num_test=100, seed=3)
    assert [len(out[s]) for s in ("train", "validation", "test")] == [8000, 100, 100]
    need = 8200 // len(ALL)
    # Measured: 1.01x to 1.17x the documents kept per family; 1.25x leaves room, a retry loop gone wrong does not fit.
    assert all(need <= n <= 1.25 * need for n in calls.values()), calls


def test_corpus_round_trips_through_parquet(corpus, tmp_path):
    from slmforge.curate.documents import read_documents, write_documents

    write_documents(tmp_path / "val.parquet", corpus["validation"])
    back = list(read_documents(tmp_path / "val.parquet"))
    assert [(d.id, d.text, d.meta) for d in back] == [(d.id, d.text, d.meta) for d in corpus["validation"]]


def test_default_corpus_is_pinned():
    # The default demo's corpus, byte for byte (a topic for the offline teacher must not change it).
    c = build_corpus(ALL, num_train=400, num_val=40, num_test=40, seed=1234)
    text = "".join(d.id + d.text for docs in c.values() for d in docs)
    assert hashlib.sha1(text.encode()).hexdigest() == "d6e2beba79c67ad35e0525d18aea4982bef82a62"


@pytest.mark.parametrize("topic, items", [("a bakery", TOPIC_ITEMS["bak"]), ("a toy shop", TOPIC_ITEMS["toy"]),
                                          ("the water cycle", None)])
def test_arithmetic_set_in_a_topic(topic, items):
    assert topic_items(topic) == items
    rng = random.Random(3)
    for _ in range(40):
        doc = arithmetic(rng, topic)
        question = doc.meta["question"]
        assert question.startswith(f"In {topic}, ")
        assert verify_arithmetic(question, doc.meta["solution"]) == int(doc.meta["answer"])
        if items:
            assert any(item in question for item in items), question
