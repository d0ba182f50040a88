"""Byte-level BPE: exact round trips, fixed special ids, chat template, and the cached fast path vs HF."""

import random

import numpy as np
import pytest

import slmforge.tokens.tokenizer as tokenizer_module
from slmforge.tokens.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from tests.conftest import SHARED_DATA, has_data

TINYSTORIES = SHARED_DATA / "tinystories" / "validation_sample.txt"
BOOKS_DIR = SHARED_DATA / "gutenberg" / "books"

TRICKY = [
    "",
    "hello world",
    " leading space",
    "  two leading spaces and trailing  ",
    "line one\nline two\n\n\nthree blank lines\r\nwindows line\n",
    "\ttabs\tand\vvertical\ffeeds\x0b",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文字符和日本語のテキスト、한국어",
    "café naïve façade — “quotes” ‘single’ …",
    "combining e\u0301 and a\u0308",
    "no\u00a0break\u00a0space and ideographic\u3000space and U+1C \x1c here",
    "controls \x00\x01\x7f and .\x00 punct",
    "don't won't it's we're I'm they'll he'd 'tis rock'n'roll '' 's",
    "numbers 3.14159 1,000,000 x2 2x ½ ² ٣",
    "specials <|user|>hi<|end|><|assistant|> and <|pad|> in text <|eos|>",
    "-- (parenthesis) [brackets] {braces} __under__ a-b-c ...!?",
    "word\nword\n  word\n\tword\n\n",
]


def _corpus() -> str:
    if has_data(TINYSTORIES):
        return TINYSTORIES.read_text(encoding="utf-8")[:200_000]
    from slmforge.synth.procedural import build_corpus  # without ../shared/data: varied enough for 512

    return "\n\n".join(d.text for d in build_corpus(["arithmetic", "narrative", "facts"], 2000, 0, 0, seed=0)["train"])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(_corpus().split("\n\n"), vocab_size=512, path=path)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over an alphabet that stresses the piece boundaries of the fast path."""
    alphabet = list("aZq'9 .,-\n\t\"(") + ["  ", "\n\n", "\r\n", "é", "中", "😀", "\xa0", "\x00", "'s"]
    alphabet += ["<|pad|>", "<|eos|>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_special_tokens_have_fixed_ids(tok):
    assert [tok.token_id(name) for name in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.token_id("<|nope|>")


def test_vocab_size_is_respected(tok):
    assert tok.vocab_size == 512
    small = train_tokenizer(_corpus()[:20_000].split("\n\n"), vocab_size=300)
    assert 263 <= small.vocab_size <= 300
    assert max(max(small.encode(t), default=0) for t in TRICKY) < small.vocab_size
    with pytest.raises(ValueError, match="at least 263"):
        train_tokenizer(["abc"], vocab_size=100)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special=False) == text
    if "<|" not in text:
        assert tok.decode(ids) == text


def test_special_tokens_are_not_split(tok):
    ids = tok.encode("<|user|>hi there<|end|><|assistant|>")
    assert ids[0] == tok.token_id("<|user|>")
    assert ids[-2:] == [tok.token_id("<|end|>"), tok.token_id("<|assistant|>")]
    for name in SPECIAL_TOKENS:
        assert tok.encode(name) == [tok.token_id(name)]
    assert tok.decode(ids) == "hi there"


def test_chat_template(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    text = tok.apply_chat_template(messages)
    assert text == "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|user|>bye<|end|><|assistant|>"
    assert tok.apply_chat_template(messages[1:2], add_generation_prompt=False) == "<|user|>hi<|end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.token_id("<|system|>") and ids[-1] == tok.token_id("<|assistant|>")
    assert ids.count(tok.token_id("<|end|>")) == 4
    with pytest.raises(ValueError, match="chat role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab_size == tok.vocab_size
    assert [loaded.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")


def test_fast_path_matches_reference(tok):
    texts = TRICKY + _random_texts(400) + _corpus()[:30_000].split("\n\n")
    # Hard-wrapped lines, hyphens, dialogue: the piece boundaries of real books.
    books = sorted(BOOKS_DIR.glob("*.txt"))[:5] if has_data(BOOKS_DIR) else []
    texts += [book.read_text(encoding="utf-8")[:20_000] for book in books]
    expected = [tok.encode(t) for t in texts]
    fresh = Tokenizer(tok.hf)
    assert fresh.encode_batch(texts) == expected
    # Second call: pieces come from the warm cache.
    assert fresh.encode_batch(texts[::-1]) == expected[::-1]


def test_fast_path_cache_reset(tok, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_CACHE_MAX_PIECES", 10)
    fresh = Tokenizer(tok.hf)
    texts = _random_texts(50, seed=1)
    for i in range(0, 50, 10):
        assert fresh.encode_batch(texts[i : i + 10]) == [tok.encode(t) for t in texts[i : i + 10]]


def test_encode_flat_appends_id(tok):
    texts = ["a b", "", "hello world"]
    ids, lengths = tok.encode_flat(texts, append_id=tok.eos_id)
    expected = [tok.encode(t) + [tok.eos_id] for t in texts]
    assert lengths.tolist() == [len(e) for e in expected]
    assert ids.tolist() == [i for e in expected for i in e]
    ids, lengths = tok.encode_flat([])
    assert ids.size == 0 and lengths.size == 0
    assert tok.encode_batch([]) == []
    assert isinstance(tok.encode_flat(["x"])[0], np.ndarray)
