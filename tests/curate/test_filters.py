"""Filters: each Gopher rule fires on a text made to break it, signals have exact values on small cases, and
decontamination finds shared 13-grams (real GSM8K data) and reports which evaluation item and n-gram matched."""

import json
from pathlib import Path

import numpy as np
import pytest

from slmforge.curate.documents import Document, read_documents, write_jsonl
from slmforge.curate.filters import (STOP_WORDS, Decontaminator, FilterConfig, QualityFilter, basic_signals,
                                   filter_corpus, gopher_signals, load_eval_items, quality_failure)
from tests.conftest import SHARED_DATA, needs_data

WORDS = ("river stone garden window market winter summer yellow silver orange doctor teacher farmer writer "
         "engine bridge castle forest island valley mountain ocean harbor village letter story window basket "
         "candle mirror pocket ribbon saddle timber violin wagon anchor butter carpet dinner finger hammer "
         "jacket kettle ladder meadow needle pepper rabbit signal tunnel velvet walnut").split()


def _prose(seed: int, num_words: int = 120, stop_words: bool = True) -> str:
    """Random sentences over a small vocabulary: passes every Gopher rule (no repeated 4-grams in practice)."""
    rng = np.random.default_rng(seed)
    vocab = WORDS + (["the", "and", "of", "with"] if stop_words else [])
    words = [vocab[i] for i in rng.integers(0, len(vocab), num_words)]
    sentences = [" ".join(words[i:i + 12]).capitalize() + "." for i in range(0, num_words, 12)]
    return "\n".join(" ".join(sentences[i:i + 2]) for i in range(0, len(sentences), 2))


def _lines(seed: int, num_lines: int, words_per_line: int = 6) -> list[str]:
    return [" ".join(_prose(seed * 1000 + i, words_per_line).split()) for i in range(num_lines)]


BROKEN = {
    "num_words": lambda: "Far too short to be a document.",
    "mean_word_length": lambda: " ".join(w * 3 for w in _prose(1).split()),
    "symbol_word_ratio": lambda: _prose(2) + " #tag" * 20,
    "bullet_lines": lambda: "\n".join("- " + line for line in _lines(3, 12)),
    "ellipsis_lines": lambda: "\n".join(line + ("..." if i % 2 else "") for i, line in enumerate(_lines(4, 12))),
    "alpha_words": lambda: " ".join(w if i % 3 else str(1000 + i) for i, w in enumerate(_prose(5).split())),
    "stop_words": lambda: _prose(6, stop_words=False),
    "duplicate_lines": lambda: "\n".join(_lines(7, 8) * 2),
    # Short paragraphs repeat: 3 of 7 paragraphs, but only 3 of 19 lines.
    "duplicate_paragraphs": lambda: "\n\n".join(["\n".join(_lines(8 + i, 5)) for i in range(3)]
                                                + ["a short paragraph here"] * 4),
    # One long line repeated once among many short ones: 1 of 13 lines, but a quarter of the characters.
    "duplicate_line_chars": lambda: "\n".join(_lines(11, 10, 3) + [" ".join(_lines(12, 5))] * 2 + _lines(13, 1)),
    "top_2gram_chars": lambda: " ".join(w + (" salt pepper" if i % 4 == 0 else "")
                                        for i, w in enumerate(_prose(14).split())),
    "duplicate_5gram_chars": lambda: _prose(15, 60) + " " + _prose(16, 30) + " " + _prose(16, 30),
}


def test_clean_prose_passes():
    for seed in range(20):
        assert quality_failure(_prose(seed), FilterConfig()) is None


@pytest.mark.parametrize("reason", list(BROKEN))
def test_each_rule_fires(reason):
    failure = quality_failure(BROKEN[reason](), FilterConfig())
    assert failure is not None and failure["reason"] == reason, failure


def test_thresholds_are_configurable():
    text = BROKEN["stop_words"]()
    assert quality_failure(text, FilterConfig(min_stop_words=0)) is None
    assert quality_failure(BROKEN["num_words"](), FilterConfig(min_words=3)) is None


def test_signal_values():
    # Words a..f have one character each: 11 characters in all.
    s = gopher_signals("a b c d e a b c d e f")
    assert s["top_2gram_chars"] == pytest.approx(2 * 2 / 11)  # "a b" twice (the first of the 2-count ties)
    assert s["duplicate_5gram_chars"] == pytest.approx(5 / 11)  # the second "a b c d e"
    assert s["duplicate_6gram_chars"] == 0.0
    # Words: "#" "one..." "-" "two" "-" "three…" "four" "four"; 5 lines; 3 paragraphs.
    s = gopher_signals("# one...\n- two\n- three…\n\nfour\n\nfour\n")
    assert s["num_words"] == 8 and s["symbol_word_ratio"] == pytest.approx(2 / 8)  # max(1 "#", 2 ellipses)
    assert s["bullet_lines"] == pytest.approx(2 / 5) and s["ellipsis_lines"] == pytest.approx(2 / 5)
    assert s["duplicate_lines"] == pytest.approx(1 / 5) and s["duplicate_paragraphs"] == pytest.approx(1 / 3)
    assert s["alpha_words"] == pytest.approx(5 / 8) and s["stop_words"] == 0


def test_whole_text_patterns_match_per_word_definitions():
    import re
    import string

    rng = np.random.default_rng(0)
    tokens = ["The.", "'the'", "the’s", "THE,", "(of)", "12", "_", "__a", "3.5", "—", "‘and’", "with-", "x", "İ",
              "haVe", "that...", "#", "be!", "to\u00a0be", "\u2028of", "ünï", "4th", "a1", "…"]
    for _ in range(200):
        text = " ".join(rng.choice(tokens, rng.integers(1, 40))) + rng.choice(["", "\n", "\t", "  "])
        words = text.split()
        signals = basic_signals(text, words)
        with_letter = sum(1 for w in words if re.search(r"[^\W\d_]", w))
        stop = sum(1 for w in words if w.lower().strip(string.punctuation) in STOP_WORDS)
        assert signals["alpha_words"] * len(words) == pytest.approx(with_letter) and signals["stop_words"] == stop


def test_quality_filter_step_reports_drops():
    drops = []
    docs = [Document("good", _prose(0)), Document("short", "tiny")]
    kept = list(QualityFilter(FilterConfig(), lambda doc, record: drops.append((doc.id, record))).run(docs))
    assert [d.id for d in kept] == ["good"]
    assert drops == [("short", {"reason": "num_words", "value": 1.0, "allowed": "in [50, 100000]"})]


GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"  # the library default (filters.GSM8K_TEST) under test's data dir
needs_gsm8k = needs_data(GSM8K_TEST, GSM8K_TEST.with_name("train.jsonl"))


@needs_gsm8k
def test_decontamination_against_gsm8k_test():
    decontaminator = Decontaminator.from_config(FilterConfig(eval_paths=[str(GSM8K_TEST)]))
    items = dict(load_eval_items([str(GSM8K_TEST)], ["question", "answer"]))
    words = items["test:5"].split()[3:16]  # 13 words of test item 5
    leak = "Some unrelated words first. " + " ".join(words).upper().replace(" ", ",  ") + " and then more."
    near_miss = "Some unrelated words first. " + " ".join(words[:12]) + " and then more."
    matches = decontaminator.matches([leak, near_miss, _prose(0)])
    assert matches[0]["eval_item"] == "test:5" and matches[0]["position"] == 4
    assert matches[0]["ngram"].split() == [w.strip(".,?!$").lower() for w in words]
    assert matches[1] is None and matches[2] is None
    # GSM8K train shares a 13-gram with test in 11 of 7,473 problems (the files are fixed by sha256).
    train = load_eval_items([str(GSM8K_TEST.with_name("train.jsonl"))], ["question", "answer"])
    flagged = {i: m for (i, _), m in zip(train, decontaminator.matches([t for _, t in train])) if m}
    assert len(flagged) == 11 and flagged["train:20"]["eval_item"] == "test:632"


def test_short_eval_items_match_whole_short_documents():
    decontaminator = Decontaminator([("q", "What is two plus two?")], ngram=13)
    assert decontaminator.matches(["what is TWO plus two", "what is two plus two, he asked"])[0]["eval_item"] == "q"
    assert decontaminator.matches(["what is two plus two, he asked"]) == [None]


def _corpus(tmp_path: Path) -> tuple[Path, Path]:
    eval_path = tmp_path / "eval.jsonl"
    eval_text = _prose(100, 40)
    with open(eval_path, "w") as f:
        f.write(json.dumps({"question": eval_text, "answer": "42"}) + "\n")
    docs = [Document(f"good{i}", _prose(i)) for i in range(30)]
    docs += [Document("short", "tiny"), Document("stop", BROKEN["stop_words"]()),
             Document("leak", _prose(200) + "\n" + eval_text[40:200] + "\n" + _prose(201)),
             Document("huge", _prose(300, 400))]
    path = tmp_path / "in.jsonl"
    write_jsonl(path, docs)
    with open(path, "ab") as f:
        f.write(b"{not json\n")
    return path, eval_path


def test_filter_corpus_outputs_and_shards(tmp_path):
    path, eval_path = _corpus(tmp_path)
    cfg = FilterConfig(inputs=[str(path)], out_dir=str(tmp_path / "one"), eval_paths=[str(eval_path)],
                       max_doc_bytes=2000)
    report = filter_corpus(cfg)
    assert (report["num_docs"], report["num_kept"]) == (34, 30)
    assert report["removed"] == {"num_words": 1, "stop_words": 1, "contamination": 1, "too_large": 1}
    assert report["read"]["num_malformed_skipped"] == 1 and report["eval_items"] == {"eval:0": 1}
    removed = [json.loads(line) for line in open(tmp_path / "one" / "removed" / "00000-of-00001.jsonl")]
    leak = next(r for r in removed if r["id"] == "leak")
    assert leak["eval_item"] == "eval:0" and len(leak["ngram"].split()) == 13
    kept = [d.id for d in read_documents(tmp_path / "one" / "kept" / "00000-of-00001.jsonl")]
    assert kept == [f"good{i}" for i in range(30)]
    sharded = FilterConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "two")})
    assert filter_corpus(sharded, shard_index=1, num_shards=2)["num_docs"] == 17  # one shard: no report.json yet
    merged = filter_corpus(sharded, shard_index=0, num_shards=2)
    assert {k: merged[k] for k in ("num_docs", "num_kept", "removed")} == \
           {k: report[k] for k in ("num_docs", "num_kept", "removed")}
    assert (tmp_path / "two" / "report.json").exists()
