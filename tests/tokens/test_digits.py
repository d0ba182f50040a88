"""Single-digit number tokens (``split_digits``, issue 19): round trips of every GSM8K problem, no token with two
digits, the fast path equal to HF's encode, the data key reaching the tokenizer stage, and tokenizers trained
before the option (tests/tokens/data/pre_digits_tokenizer.json) encoding exactly as they did."""

import json
import random
import re
from pathlib import Path

import pytest

from slmforge import corpus
from slmforge.config import load_config
from slmforge.curate.documents import Document, write_jsonl
from slmforge.synth.procedural import build_corpus
from slmforge.tokens.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import SHARED_DATA, has_data

GSM8K = [SHARED_DATA / "gsm8k" / "train.jsonl", SHARED_DATA / "gsm8k" / "test.jsonl"]
OLD_TOKENIZER = Path(__file__).parent / "data" / "pre_digits_tokenizer.json"
NUMERIC = [
    "Tom has 12 apples and buys 345 more: 12+345=357.",
    "x 2024, 3.14 and 1,000,000 ½ ٣ 202400",
    " 99 bottles\n100 days <<40/4=10>>10 <|end|>",
    "$1,234.56 is 10% of $12,345.60; -7 + 0.5e3 = 493 (1st, 2nd, 3rd, 4th) 9's 07:30 v2.0.1",
    "12345678901234567890 a1b2c3 '9 9' 1\n2\n\n3 ۱۲۳ ①② Ⅻ ٤٥ 1\u00a02",
]
# Encoded by the tokenizer of slmforge before split_digits existed (tokenizer file above, texts NUMERIC[:3]).
OLD_IDS = [
    [58, 85, 83, 288, 89, 265, 24, 276, 86, 86, 82, 263, 276, 286, 273, 91, 95, 89, 297, 26, 27, 283, 85, 88, 75, 32,
     265, 24, 17, 25, 26, 27, 35, 25, 27, 29, 20],
    [94, 294, 18, 297, 20, 23, 26, 276, 286, 265, 18, 278, 22, 18, 278, 22, 227, 133, 128, 227, 156, 103, 294, 278],
    [227, 31, 31, 273, 85, 90, 90, 82, 263, 205, 23, 278, 227, 74, 71, 95, 89, 279, 26, 22, 21, 26, 35, 23, 22, 271,
     23, 22, 227, 6],
]
DIGIT = re.compile(r"\d")


def _procedural_texts() -> list[str]:
    return [d.text for d in build_corpus(["arithmetic", "sorting"], 400, 0, 0, seed=3)["train"]]


def _random_numeric(n: int, seed: int = 0) -> list[str]:
    """Random strings mixing digits with the characters around the fast path's cuts."""
    alphabet = list("0123456789 .,-+=$%'\n\tab<>") + ["  ", "\n\n", "½", "٣", "\xa0", "<|pad|>", "'s", "1,000"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_procedural_texts() + NUMERIC * 20, vocab_size=400)


def _multi_digit_tokens(tok: Tokenizer, ids) -> list[str]:
    return [s for s in (tok.decode([i], skip_special=False) for i in set(ids)) if len(DIGIT.findall(s)) >= 2]


def test_no_token_holds_two_digits(tok):
    vocab = tok.hf.get_vocab()  # byte-level strings: an ASCII digit is itself
    assert all(len(DIGIT.findall(token)) <= 1 for token in vocab), [t for t in vocab if len(DIGIT.findall(t)) > 1]
    assert [t for t in vocab if re.search("[0-9]", t) and len(t) > 1] == []  # a digit never merges at all
    assert [tok.decode([i]) for i in tok.encode(" 345+12")] == [" ", "3", "4", "5", "+", "1", "2"]
    # The same corpus without the option does learn multi-digit tokens: the check above can fail.
    plain = train_tokenizer(_procedural_texts() + NUMERIC * 20, vocab_size=400, split_digits=False)
    assert _multi_digit_tokens(plain, plain.encode(" ".join(NUMERIC)))


@pytest.mark.parametrize("split_digits", [True, False])
def test_fast_path_equals_hf_on_numbers(tok, split_digits):
    tok = tok if split_digits else train_tokenizer(_procedural_texts(), vocab_size=400, split_digits=False)
    texts = NUMERIC + _random_numeric(500) + _procedural_texts()[:300]
    expected = [tok.encode(t) for t in texts]
    fresh = Tokenizer(tok.hf)
    assert fresh.encode_batch(texts) == expected
    assert fresh.encode_batch(texts[::-1]) == expected[::-1]  # warm cache
    for text, ids in zip(texts, expected):
        assert tok.decode(ids, skip_special=False) == text


def test_gsm8k_round_trips_byte_exactly():
    if not all(has_data(p) for p in GSM8K):
        pytest.skip(f"GSM8K not present under {SHARED_DATA / 'gsm8k'}")
    rows = [json.loads(line) for p in GSM8K for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) > 8000
    texts = [row[key] for row in rows for key in ("question", "answer")]
    tok = train_tokenizer(texts[::4], vocab_size=1024)  # trained on a quarter, applied to every problem
    expected = [tok.encode(t) for t in texts]
    assert Tokenizer(tok.hf).encode_batch(texts) == expected
    bad = [t for t, ids in zip(texts, expected) if tok.decode(ids, skip_special=False) != t]
    assert bad == []
    all_ids = {i for ids in expected for i in ids}
    assert _multi_digit_tokens(tok, all_ids) == []
    digits = sum(len(DIGIT.findall(t)) for t in texts)
    assert sum(1 for ids in expected for i in ids if DIGIT.search(tok.decode([i]))) == digits  # one token each


def test_old_tokenizer_file_unchanged():
    assert json.loads(OLD_TOKENIZER.read_text())["pre_tokenizer"]["type"] == "ByteLevel"
    old = Tokenizer.load(OLD_TOKENIZER)
    assert [old.encode(t) for t in NUMERIC[:3]] == OLD_IDS
    assert old.encode_batch(NUMERIC[:3]) == OLD_IDS
    assert "Ġ2024" in old.hf.get_vocab() and old.decode([294]) == " 2024"  # its multi-digit tokens still work
    texts = NUMERIC + _random_numeric(200, seed=1)
    assert Tokenizer(old.hf).encode_batch(texts) == [old.encode(t) for t in texts]


@pytest.mark.parametrize("split_digits", [True, False])
def test_tokenizer_stage_reads_the_data_key(tmp_path, split_digits):
    cfg = load_config(None, [f"out_dir={tmp_path}", "name=run", "model.vocab_size=300",
                             f"data.split_digits={str(split_digits).lower()}"])
    assert load_config(None, [f"out_dir={tmp_path}"]).data.split_digits is True  # on by default
    docs = build_corpus(["arithmetic"], 100, 0, 0, seed=0)["train"]
    docs += [Document(id=f"n{i}", text="In 2024 we sold 100 cars; 2024 * 100 = 202400.") for i in range(50)]
    write_jsonl(cfg.run_dir / "data" / "train.jsonl", docs)
    tok = Tokenizer.load(corpus.build_tokenizer(cfg))
    pre = json.loads(tok.hf.to_str())["pre_tokenizer"]
    assert pre["type"] == ("Sequence" if split_digits else "ByteLevel")
    assert bool(_multi_digit_tokens(tok, tok.encode(" 2024 100 202400"))) is not split_digits


def test_split_digits_is_not_a_source_key(tmp_path):
    cfg = load_config(None, [f"out_dir={tmp_path}"])
    cfg.data.sources = {"math": {"split_digits": False}}
    with pytest.raises(ValueError, match="data.sources.math"):
        corpus.source_configs(cfg)
