"""Preference pairs: TRL formats, bad records, HH-RLHF, split, round trip, encoding with masks, the resumable loader."""

import gzip
import json

import pytest
import torch

from slmforge.post.prefs import (EncodedPair, Pair, PairLoader, encode_pairs, hh_rlhf_pairs, read_pairs, split_pairs,
                                 write_pairs)
from slmforge.tokens.tokenizer import train_tokenizer
from tests.conftest import SHARED_DATA, needs_data

HH_HELPFUL = SHARED_DATA / "hh-rlhf" / "helpful-base-test.jsonl.gz"
GOOD = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _write_jsonl(path, records):
    """Records as JSON Lines; a str record is written as the line itself."""
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    sentences = [f"The answer to question {i} is {i * 7}. Please explain it step by step." for i in range(60)]
    return train_tokenizer(sentences, 300)


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz"])
def test_read_every_trl_format(tmp_path, name):
    system = {"role": "system", "content": "Be brief."}
    path = _write_jsonl(tmp_path / name, [
        GOOD,  # standard, explicit prompt
        {"prompt": [system, _user("Hi")], "chosen": [_assistant("Hello!")], "rejected": [_assistant("Go away.")]},
        "",  # blank lines are skipped and still counted
        {"messages": [_user("Name a colour")], "chosen": "Blue", "rejected": [_assistant("Seven")], "id": 3},
        {"chosen": [_user("A?"), _assistant("B"), _user("C?"), _assistant("D")],  # implicit prompt
         "rejected": [_user("A?"), _assistant("B"), _user("C?"), _assistant("E")]},
        {"prompt": [_user("A?")], "chosen": [_assistant("B"), _user("C?"), _assistant("D")],  # turns join the prompt
         "rejected": [_assistant("B"), _user("C?"), _assistant("X")], "source": "teacher:9"},
    ])
    assert read_pairs(path) == [
        Pair([_user("What is 2+2?")], "4", "5", f"{name}:1"),
        Pair([system, _user("Hi")], "Hello!", "Go away.", f"{name}:2"),
        Pair([_user("Name a colour")], "Blue", "Seven", f"{name}:4"),
        Pair([_user("A?"), _assistant("B"), _user("C?")], "D", "E", f"{name}:5"),
        Pair([_user("A?"), _assistant("B"), _user("C?")], "D", "X", "teacher:9"),
    ]


BAD_RECORDS = [
    ("{not json", "not JSON"),
    ('["a list"]', "not an object"),
    ({"prompt": "q", "rejected": "r"}, "no 'chosen' side"),
    ({"prompt": "q", "chosen": "c"}, "no 'rejected' side"),
    ({"prompt": "q", "chosen": "  \n", "rejected": "r"}, "empty chosen reply"),
    ({"prompt": "q", "chosen": "c", "rejected": [_assistant(" ")]}, "empty rejected reply"),
    ({"prompt": "q", "chosen": [], "rejected": "r"}, "chosen does not end with an assistant turn"),
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "same reply"),
    ({"prompt": [_user("q"), _assistant("a")], "chosen": "c", "rejected": "r"}, "last turn is 'assistant'"),
    ({"prompt": [], "chosen": "c", "rejected": "r"}, "the prompt is empty"),
    ({"prompt": "  ", "chosen": "c", "rejected": "r"}, "empty prompt"),
    ({"prompt": [{"role": "bot", "content": "q"}], "chosen": "c", "rejected": "r"}, "unknown role 'bot'"),
    ({"messages": [{"role": "user"}], "chosen": "c", "rejected": "r"}, r"messages\[0\] is not a message"),
    ({"prompt": 7, "chosen": "c", "rejected": "r"}, "prompt is a JSON int"),
    ({"chosen": "c", "rejected": "r"}, "no prompt"),
    ({"chosen": [_user("a"), _assistant("c")], "rejected": [_user("b"), _assistant("r")]}, "differ before"),
]


@pytest.mark.parametrize("record, what", BAD_RECORDS)
def test_bad_record_names_file_and_line(tmp_path, record, what):
    path = _write_jsonl(tmp_path / "p.jsonl", [GOOD, record, GOOD])
    with pytest.raises(ValueError, match=rf"^{path}:2: .*{what}.*\(.+\)$") as info:
        read_pairs(path)
    assert "\n" not in str(info.value)


def test_bad_bytes_and_empty_files(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "\xff", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not JSON"):
        read_pairs(path)
    for content in ("", "\n  \n"):
        path.write_text(content)
        with pytest.raises(ValueError, match=rf"^{path}: no preference pairs"):
            read_pairs(path)
    with pytest.raises(ValueError, match="no such file"):
        read_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(json.dumps(GOOD).encode() * 50)[:40])
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_pairs(tmp_path / "cut.jsonl.gz")


# ---------------------------------------------------------------- HH-RLHF


def _hh(*turns):
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


def test_hh_rlhf_parsing_and_counts(tmp_path):
    shared = [("Human", "Hi there"), ("Assistant", "Hello."), ("Human", "Tell me a fact.")]
    path = _write_jsonl(tmp_path / "helpful-base-test.jsonl.gz", [
        {"chosen": _hh(*shared, ("Assistant", "Water boils at 100 C.")),
         "rejected": _hh(*shared, ("Assistant", "No."))},
        {"chosen": _hh(("Human", "A"), ("Assistant", "x")), "rejected": _hh(("Human", "B"), ("Assistant", "y"))},
        {"chosen": _hh(("Human", "A"), ("Assistant", "same")), "rejected": _hh(("Human", "A"), ("Assistant", "same "))},
        {"chosen": _hh(("Human", "A"), ("Assistant", "")), "rejected": _hh(("Human", "A"), ("Assistant", "y"))},
        {"chosen": _hh(("Human", "Q"), ("Assistant", "good")), "rejected": _hh(("Human", "Q"), ("Assistant", "bad"))},
    ])
    pairs, counts = hh_rlhf_pairs(path)
    assert counts == {"read": 5, "kept": 2, "prefix_mismatch": 1, "identical": 1, "empty": 1}
    assert pairs[0] == Pair([_user("Hi there"), _assistant("Hello."), _user("Tell me a fact.")],
                            "Water boils at 100 C.", "No.", "hh-rlhf/helpful-base-test:1")
    assert pairs[1].source == "hh-rlhf/helpful-base-test:5"
    assert hh_rlhf_pairs(path, limit=1) == ([pairs[0]], {"read": 1, "kept": 1, "prefix_mismatch": 0,
                                                          "identical": 0, "empty": 0})
    _write_jsonl(path, [{"chosen": "Human: no blank lines", "rejected": _hh(("Human", "A"), ("Assistant", "y"))}])
    with pytest.raises(ValueError, match=rf"^{path}:1: chosen is not an HH-RLHF transcript"):
        hh_rlhf_pairs(path)


@needs_data(HH_HELPFUL)
def test_hh_rlhf_helpful_matches_readme_counts():
    pairs, counts = hh_rlhf_pairs(HH_HELPFUL)
    # ../shared/data/README.md: prefixes match in 2,345 of 2,354; 2 of those are identical; 4 have an empty reply.
    assert counts == {"read": 2354, "kept": 2339, "prefix_mismatch": 9, "identical": 2, "empty": 4}
    assert len(pairs) == 2339 and len({p.source for p in pairs}) == 2339
    assert pairs[1].prompt == [  # record 2: a prompt of several turns
        _user("How can I find out what types of butterflies are in my area?"), _assistant("Which location are you in?"),
        _user("I am in Oregon."), pairs[1].prompt[3], _user("Great. What are some common species then?")]
    assert pairs[1].prompt[3]["role"] == "assistant" and pairs[1].source == "hh-rlhf/helpful-base-test:2"
    assert sum(len(p.prompt) > 1 for p in pairs) > 1000
    assert all(p.prompt[-1]["role"] == "user" and p.chosen and p.rejected and p.chosen != p.rejected for p in pairs)
    contents = [m["content"] for p in pairs for m in p.prompt]
    assert not any("\n\nHuman:" in c or "\n\nAssistant:" in c for c in contents)
    first = pairs[0]
    assert first.prompt == [_user("Do you know why turkeys became the official food of thanksgiving?")]
    assert first.chosen.startswith("To be honest, I don’t know anything about that.")


# ---------------------------------------------------------------- split and write


def _pairs(num_prompts, per_prompt=3):
    return [Pair([_user(f"question {i}")], f"good {i}.{j}", f"bad {i}.{j}", f"t:{i}.{j}")
            for i in range(num_prompts) for j in range(per_prompt)]


def test_split_by_prompt_deterministic():
    pairs = _pairs(40)
    train, val = split_pairs(pairs, 0.25, seed=1)
    assert len(val) == 10 * 3 and len(train) == 30 * 3
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in val}
    assert sorted(train + val, key=pairs.index) == pairs and train == [p for p in pairs if p in train]
    assert split_pairs(pairs, 0.25, seed=1) == (train, val)
    assert split_pairs(pairs, 0.25, seed=2)[1] != val
    assert split_pairs(pairs, 0.0, seed=1) == (pairs, [])
    assert len(split_pairs(_pairs(3), 0.01, seed=0)[1]) == 3  # at least one prompt's pairs go to val
    with pytest.raises(ValueError, match="cannot be split"):
        split_pairs(_pairs(1), 0.2, seed=0)
    with pytest.raises(ValueError, match=r"val_fraction=1: must be in \[0, 1\)"):
        split_pairs(pairs, 1, seed=0)


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_write_read_round_trip(tmp_path, name):
    pairs = _pairs(2) + [Pair([{"role": "system", "content": "Sé breve <|end|>"}, _user("a\nb"), _assistant("c"),
                               _user("d \"quoted\"")], "reply with <|user|> in it ✓", "other", "hh-rlhf/x:3")]
    write_pairs(tmp_path / name, pairs)
    assert read_pairs(tmp_path / name) == pairs
    assert [p.name for p in tmp_path.iterdir()] == [name]  # atomic: no temporary left behind


# ---------------------------------------------------------------- encoding


def test_encode_masks_everything_but_the_replies(tokenizer):
    pairs = [Pair([{"role": "system", "content": "Explain."}, _user("What is question 3?")],
                  "The answer is 21.", "Please step.", "t:1"),
             Pair([_user("Why?")], "Because it is.", "No.", "t:2")]
    encoded, counts = encode_pairs(tokenizer, pairs, max_len=64)
    assert counts == {"pairs": 2, "truncated": 0, "skipped": 0}
    end = tokenizer.token_id("<|end|>")
    # EOS first, as every document in pre-training and every chat prompt at inference starts
    assert encoded[0] == EncodedPair([tokenizer.eos_id, *tokenizer.encode_chat(pairs[0].prompt)],
                                     tokenizer.encode_text("The answer is 21.") + [end],
                                     tokenizer.encode_text("Please step.") + [end])
    tokens, targets, index = next(iter(PairLoader(encoded, 2, seed=0, pad_id=tokenizer.pad_id, shuffle=False)))
    assert index.tolist() == [0, 1] and tokens.dtype == targets.dtype == index.dtype == torch.int64
    for row, (pair, reply) in enumerate([(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]):
        kept = targets[row][targets[row] != -100]
        assert tokenizer.decode(kept.tolist(), skip_special=False) == getattr(pairs[pair], reply) + "<|end|>"
        prompt_len = len(encoded[pair].prompt)
        positions = (targets[row] != -100).nonzero().flatten().tolist()
        assert positions == list(range(prompt_len - 1, prompt_len - 1 + len(kept)))
        assert torch.equal(targets[row, positions], tokens[row, [p + 1 for p in positions]])


def test_encode_truncates_or_skips_overlong(tokenizer):
    long_prompt = [_user(" ".join(f"question {i}" for i in range(40)))]
    long_reply = " ".join(f"step {i}." for i in range(40))
    pairs = [Pair(long_prompt, "The answer is 7.", "No.", "a"), Pair([_user("Why?")], long_reply, "No.", "b"),
             Pair([_user("Why?")], "Yes.", "No.", "c")]
    end, assistant = tokenizer.token_id("<|end|>"), tokenizer.token_id("<|assistant|>")
    encoded, counts = encode_pairs(tokenizer, pairs, max_len=32)
    assert counts == {"pairs": 3, "truncated": 2, "skipped": 0}
    full = [tokenizer.eos_id, *tokenizer.encode_chat(long_prompt)]
    chosen = tokenizer.encode_text("The answer is 7.") + [end]
    # a long prompt keeps its last tokens and the whole short reply
    assert encoded[0].prompt == full[-(32 - len(chosen)):] and encoded[0].chosen == chosen
    # a long reply keeps its start; the short prompt stays whole
    whole = [tokenizer.eos_id, *tokenizer.encode_chat([_user("Why?")])]
    assert encoded[1].prompt == whole
    assert encoded[1].chosen == (tokenizer.encode_text(long_reply) + [end])[:32 - len(whole)]
    assert encoded[1].rejected == tokenizer.encode_text("No.") + [end]
    for e in encoded:
        assert len(e.prompt) + max(len(e.chosen), len(e.rejected)) <= 32 and e.prompt[-1] == assistant
    both = [Pair(long_prompt, long_reply, "No.", "d")]
    e = encode_pairs(tokenizer, both, max_len=32)[0][0]
    assert len(e.chosen) == 16 and len(e.prompt) == 16  # max_len // 2 reserved for the reply
    assert encode_pairs(tokenizer, pairs, max_len=32, overlong="skip")[1] == {"pairs": 1, "truncated": 0, "skipped": 2}
    with pytest.raises(ValueError, match=r"all 2 preference pairs are longer than finetune.max_len=32"):
        encode_pairs(tokenizer, pairs[:2], max_len=32, overlong="skip")
    with pytest.raises(ValueError, match="overlong='cut'"):
        encode_pairs(tokenizer, pairs, max_len=32, overlong="cut")


# ---------------------------------------------------------------- loader


def _encoded(n):
    """Pairs with distinct lengths and token values: pair i's prompt is (i+1) tokens of 1000+i."""
    return [EncodedPair([1000 + i] * (i % 4 + 1), [2000 + i] * (i % 3 + 1), [3000 + i] * (i % 5 + 2)) for i in range(n)]


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_loader_row_layout():
    pairs = _encoded(5)
    tokens, targets, index = next(iter(PairLoader(pairs, 3, seed=4, pad_id=0)))
    assert tokens.shape == targets.shape and tokens.shape[0] == 6 and index.shape == (3,)
    rows = [(pairs[i].prompt, pairs[i].chosen) for i in index] + [(pairs[i].prompt, pairs[i].rejected) for i in index]
    assert tokens.shape[1] == max(len(p) + len(r) for p, r in rows)
    for row, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        assert tokens[row, :n].tolist() == prompt + reply and (tokens[row, n:] == 0).all()
        assert targets[row].tolist() == [-100] * (len(prompt) - 1) + reply + [-100] * (tokens.shape[1] - n + 1)


def test_loader_epochs_and_ranks():
    pairs = _encoded(10)
    loader = PairLoader(pairs, 4, seed=0, pad_id=0)
    epochs = [torch.cat([b[2] for b in _take(iter(loader), 3)]).tolist() for _ in range(2)]
    assert [sorted(e) for e in epochs] == [list(range(10))] * 2 and epochs[0] != epochs[1]  # reshuffled
    in_order = PairLoader(pairs, 4, seed=0, pad_id=0, shuffle=False)
    assert [b[2].tolist() for b in in_order] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    ranks = [torch.cat([b[2] for b in _take(iter(PairLoader(pairs, 2, 0, 0, rank=r, world_size=3)), 2)]).tolist()
             for r in range(3)]
    assert all(len(r) == 3 for r in ranks) and len(set(sum(ranks, []))) == 9  # disjoint, same count per rank


@pytest.mark.parametrize("taken", [0, 2, 3, 7])
def test_loader_resumes_exactly(taken):
    pairs = _encoded(11)
    loader = PairLoader(pairs, 4, seed=3, pad_id=0)
    it = iter(loader)
    _take(it, taken)
    state = loader.state_dict()
    expected = _take(it, 8)  # crosses epoch boundaries (3 batches per epoch)
    restored = PairLoader(pairs, 4, seed=3, pad_id=0)
    restored.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    got = _take(iter(restored), 8)
    assert all(torch.equal(a, b) for x, y in zip(expected, got) for a, b in zip(x, y))
    fresh = _take(iter(PairLoader(pairs, 4, seed=3, pad_id=0)), 8)
    assert taken == 0 or not all(torch.equal(x[2], y[2]) for x, y in zip(expected, fresh))
    with pytest.raises(ValueError, match="num_pairs 11 -> 10"):
        PairLoader(pairs[:10], 4, seed=3, pad_id=0).load_state_dict(state)
