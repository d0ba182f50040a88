"""Needle-in-a-haystack samples (``synth/niah.py``): exact lengths, the needle where the generator says, any corpus."""

import json
import re

import pytest

from slmforge.config import load
from slmforge.synth.niah import Haystack, NiahConfig, make_sample, stream
from slmforge.tokens.tokenizer import Tokenizer, train_tokenizer
from slmforge.synth.procedural import build_corpus


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    corpus = build_corpus(["narrative", "facts"], 300, 0, 0, seed=3)["train"]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer((d.text for d in corpus), 400, path)
    return Tokenizer.load(path)


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    """A haystack the generator never saw: plain-text essays and a JSONL of documents."""
    folder = tmp_path_factory.mktemp("essays")
    text = ("Cities grow where rivers meet the sea. Trade brings people, and people bring ideas! Some ideas last "
            "for centuries; others fade within a year. Why do some endure? Perhaps because they are useful. ") * 40
    (folder / "a.txt").write_text(text)
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": f"Essay {i}. " + text[: 500 + 37 * i]}) + "\n"
                                            for i in range(5)))
    return folder


NEEDLE_START = {"passkey": "The pass key is {answer}.", "kv": "The secret number of the ", "odd": "[config] "}


@pytest.mark.parametrize("kind", list(NEEDLE_START))
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_needle_at_the_requested_depth_within_one_sentence(tok, kind, depth):
    h = Haystack(["procedural"], tok)
    s = make_sample(h, NiahConfig(kinds=[kind]), 600, depth, f"t:{kind}")
    assert len(s.prompt) == 600 and s.ids[0] == tok.eos_id
    after = tok.decode(s.ids[s.needle_start :]).lstrip()
    assert after.startswith(NEEDLE_START[kind].format(answer=s.answer_texts[-1]))
    before = tok.decode(s.ids[1 : s.needle_start])
    # The tokens before the needle are the haystack's (one needle): the depth the sample reports is theirs.
    assert s.needle_start - 1 == round(s.depth * s.haystack_tokens)
    if s.needle_start > 1:
        assert before.rstrip()[-1] in ".!?"  # at a sentence boundary
    # The nearest boundary: the requested point lies in the sentence just before or just after the needle.
    sentences = [" " + x for x in re.split(r"(?<=[.!?])\s+", before.strip() + " " + after) if x]
    around = [len(tok.encode(x)) for x in sentences]
    assert abs((s.needle_start - 1) - depth * s.haystack_tokens) <= max(around)
    assert tok.decode(s.ids[slice(*s.answers[-1])]).strip() == s.answer_texts[-1]


def test_multi_needles_ask_the_one_at_depth(tok):
    h = Haystack(["procedural"], tok)
    s = make_sample(h, NiahConfig(kinds=["multi"], num_needles=4), 800, 0.5, "m")
    text = tok.decode(s.ids[s.needle_start :]).lstrip()
    key = text[len("The secret number of the "):].split(" ")[0]
    assert text.startswith(f"The secret number of the {key} is {s.answer_texts[-1]}.")
    assert tok.decode(s.prompt).endswith(f"The secret number of the {key} is")
    assert tok.decode(s.ids).count("The secret number of the ") == 4 + 1  # four needles and the answer's lead-in


def test_deterministic_by_seed_and_key(tok):
    h = Haystack(["procedural"], tok)
    cfg = NiahConfig()
    a, b = make_sample(h, cfg, 400, 0.5, "k"), make_sample(h, cfg, 400, 0.5, "k")
    assert a.ids == b.ids
    assert make_sample(h, NiahConfig(seed=1), 400, 0.5, "k").ids != a.ids
    assert make_sample(h, cfg, 400, 0.5, "other").ids != a.ids


def test_any_length_and_several_questions(tok):
    h = Haystack(["procedural"], tok)
    cfg = NiahConfig(kinds=["multi"], num_needles=5, questions=3)
    for length in (300, 2048):
        s = make_sample(h, cfg, length, 0.25, "q")
        assert len(s.prompt) == length and len(s.answers) == 3 and len(set(s.answer_texts)) == 3
        for (start, end), answer in zip(s.answers, s.answer_texts):
            assert tok.decode(s.ids[start:end]).strip() == answer


def test_any_haystack_source(tok, essays):
    for sources in ([str(essays / "a.txt")], [str(essays / "b.jsonl")], ["procedural", str(essays / "*")]):
        h = Haystack(sources, tok)
        s = make_sample(h, NiahConfig(kinds=["passkey"]), 500, 0.5, "e")
        assert len(s.prompt) == 500
        if sources[0] != "procedural":
            assert "rivers meet the sea" in tok.decode(s.ids)
    samples = stream(Haystack(["procedural"], tok), NiahConfig(), [256, 512])
    assert [len(next(samples).prompt) for _ in range(4)] == [256, 512, 256, 512]


def test_bad_inputs_are_one_line_errors(tok, essays, tmp_path):
    with pytest.raises(ValueError, match="needle kind.*passkey"):
        load(NiahConfig, None, ["kinds=[passkee]"])
    with pytest.raises(ValueError, match="too short.*give a length above"):
        make_sample(Haystack(["procedural"], tok), NiahConfig(kinds=["multi"]), 40, 0.5, "x")
    with pytest.raises(ValueError, match=r"depth=1.5"):
        make_sample(Haystack(["procedural"], tok), NiahConfig(), 300, 1.5, "x")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no text read"):
        Haystack([str(tmp_path / "empty.jsonl")], tok)
