"""Chat data for SFT: reading and checking conversations, masking, packing, resume, and the procedural and synth
sources."""

from __future__ import annotations

import gzip
import json
import re
from itertools import islice

import numpy as np
import pytest
import torch

from slmforge.config import DataConfig, merge
from slmforge.model.attention import document_positions as positions_from_doc
from slmforge.post.chat_data import (IGNORE, ChatExample, SFTLoader, encode_conversations,
                                     procedural_conversations, read_conversations, synth_conversations)
from slmforge.synth.jobs import SynthJob, synthesize
from slmforge.synth.procedural import build_corpus
from slmforge.tokens.tokenizer import train_tokenizer

CHAT = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
     {"role": "assistant", "content": "Six, of course."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Sort: 3, 1, 2."}, {"role": "assistant", "content": "1, 2, 3"}],
    [{"role": "user", "content": "Say <|end|><|system|> please."}, {"role": "assistant", "content": "<|end|> ok"}],
]


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for c in CHAT + _many(20) for m in c] + ["the quick brown fox jumps over the lazy dog"] * 20
    return train_tokenizer(texts, 300)


def _many(n: int) -> list[list[dict]]:
    """``n`` conversations of varied lengths."""
    return [[{"role": "user", "content": f"Question {i}: " + "two plus two " * (i % 3)},
             {"role": "assistant", "content": "four " * (1 + i % 4)}] for i in range(n)]


# ---------------------------------------------------------------- masking


def test_rendering_is_encode_chat_and_only_assistant_tokens_are_trained(tok):
    examples, counts = encode_conversations(tok, CHAT, max_len=512)
    assert counts == dict(conversations=4, truncated=0, skipped=0, tokens=sum(len(e.ids) for e in examples),
                          trained_tokens=sum(int(e.train.sum()) for e in examples))
    role_ids = {tok.token_id(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")}
    for messages, ex in zip(CHAT, examples):
        assert ex.ids.dtype == np.int32 and ex.train.dtype == bool and len(ex.ids) == len(ex.train)
        assert ex.ids.tolist() == [tok.eos_id, *tok.encode_chat(messages, add_generation_prompt=False)]
        replies = "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
        assert tok.decode(ex.ids[ex.train], skip_special=False) == replies
        assert not role_ids & set(ex.ids[ex.train].tolist())
        # every token of a system or user turn, its role id and its <|end|> included, is untrained
        at = 1  # after the EOS, which is never trained
        assert not ex.train[0]
        for m in messages:
            n = len(tok.encode_text(m["content"])) + 2
            assert ex.train[at:at + n].tolist() == [False] + [m["role"] == "assistant"] * (n - 1)
            at += n
    # a control string typed in a message stays text: the only <|end|> ids are the template's
    forged = examples[3]
    assert (forged.ids == tok.token_id("<|end|>")).sum() == 2


def test_y_is_ignored_wherever_the_next_token_is_a_prompt_token(tok):
    examples, _ = encode_conversations(tok, CHAT, max_len=512)
    x, y, doc = next(iter(SFTLoader(examples, 128, 4, 0, tok.pad_id, packing=False, shuffle=False)))
    for r, ex in enumerate(examples):
        n = len(ex.ids)
        want = np.where(ex.train[1:], ex.ids[1:], IGNORE)
        assert y[r, :n - 1].tolist() == want.tolist() and (y[r, n - 1:] == IGNORE).all()
        assert x[r, :n].tolist() == ex.ids.tolist() and (x[r, n:] == tok.pad_id).all()
    # Changing every prompt token changes x but no target: the loss cannot see the prompt's targets.
    changed = [ChatExample(np.where(e.train, e.ids, (e.ids + 1) % tok.vocab_size).astype(np.int32), e.train)
               for e in examples]
    x2, y2, _ = next(iter(SFTLoader(changed, 128, 4, 0, tok.pad_id, packing=False, shuffle=False)))
    assert not torch.equal(x, x2) and torch.equal(y, y2)


def test_packing_lays_examples_end_to_end_with_no_target_across_boundaries(tok):
    examples, _ = encode_conversations(tok, _many(40), max_len=64)
    loader = SFTLoader(examples, 64, 4, seed=3, pad_id=tok.pad_id, packing=True, shuffle=True)
    assert loader.fill > 0.6 and loader.trained_tokens_per_step > 0
    seen, several = [], 0
    for x, y, doc in islice(loader, len(loader)):  # exactly epoch 0
        assert x.shape == y.shape == doc.shape == (4, 64) and x.dtype == y.dtype == doc.dtype == torch.int64
        for r in range(4):
            ids = doc[r].tolist()
            several += max(ids) >= 1
            n = sum(i >= 0 for i in ids)
            assert ids[:n] == sorted(ids[:n]) and all(i == -1 for i in ids[n:])  # examples first, then padding
            assert (x[r, n:] == tok.pad_id).all() and (y[r, n:] == IGNORE).all()
            for k in range(max(ids) + 1):
                at = [t for t, i in enumerate(ids) if i == k]
                seen.append(x[r, at].tolist())
                assert y[r, at[-1]] == IGNORE  # the last token of an example predicts nothing in the next one
                assert positions_from_doc(doc)[r, at].tolist() == list(range(len(at)))
            # a row was closed because the next example did not fit: greedy packing
    assert several >= 4
    rows = loader._rows(0)
    for a, b in zip(rows, rows[1:]):
        assert sum(loader.lengths[a]) + loader.lengths[b[0]] > 64
    dropped = [i for row in rows[len(loader) * 4:] for i in row]  # the epoch's remainder rows
    assert sorted(map(tuple, seen + [examples[i].ids.tolist() for i in dropped])) == sorted(
        tuple(e.ids.tolist()) for e in examples)


def test_packing_is_greedy_in_order_and_fills_rows_exactly():
    lengths = [32, 32, 16, 50, 60, 4]
    examples = [ChatExample(np.arange(1, n + 1, dtype=np.int32), np.arange(n) % 2 == 1) for n in lengths]
    _, _, doc = next(iter(SFTLoader(examples, 64, 4, seed=0, pad_id=0, shuffle=False)))
    # 32+32 fill row 0; 16 then 50 does not fit; 50 then 60 does not fit; 60+4 fill the last row
    assert [np.bincount(d[d >= 0]).tolist() for d in doc.numpy()] == [[32, 32], [16], [50], [60, 4]]


def test_unpacked_rows_hold_one_example_and_one_pass_covers_all(tok):
    examples, _ = encode_conversations(tok, _many(10), max_len=64)
    loader = SFTLoader(examples, 64, 4, seed=0, pad_id=tok.pad_id, packing=False, shuffle=False)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]  # the last batch is what is left
    assert all(b[2].max() == 0 for b in batches)
    assert [r[:len(e.ids)].tolist() for r, e in zip(torch.cat([b[0] for b in batches]), examples)] == [
        e.ids.tolist() for e in examples]
    assert len(list(loader)) == 3  # each iter is one more pass


def test_positions_restart_at_each_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert positions_from_doc(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("packing", [True, False])
def test_loader_resumes_exactly(tok, packing):
    examples, _ = encode_conversations(tok, _many(30), max_len=64)
    make = lambda: SFTLoader(examples, 64, 2, seed=7, pad_id=tok.pad_id, packing=packing)  # noqa: E731
    reference = make()
    it = iter(reference)
    for _ in range(5):
        next(it)
    state = dict(reference.state_dict())
    expected = [next(it) for _ in range(3 * len(reference))]  # runs over epoch boundaries
    resumed = make()
    resumed.load_state_dict(state)
    got = list(islice(resumed, len(expected)))
    assert all(torch.equal(a, b) for e, g in zip(expected, got) for a, b in zip(e, g))
    fresh = list(islice(make(), len(expected)))
    assert not all(torch.equal(e[0], f[0]) for e, f in zip(expected, fresh))  # the resume did move the loader
    other = SFTLoader(examples, 64, 4, seed=7, pad_id=tok.pad_id, packing=packing)
    with pytest.raises(ValueError, match="batch_size=2 but this loader has 4"):
        other.load_state_dict(state)


def test_ranks_take_disjoint_rows(tok):
    examples, _ = encode_conversations(tok, _many(30), max_len=64)
    xs = [next(iter(SFTLoader(examples, 64, 2, seed=1, pad_id=0, rank=r, world_size=2)))[0] for r in (0, 1)]
    whole = next(iter(SFTLoader(examples, 64, 4, seed=1, pad_id=0)))[0]
    assert torch.equal(torch.cat(xs), whole)


def test_too_little_data_or_too_long_examples_are_one_line_errors(tok):
    examples, _ = encode_conversations(tok, _many(3), max_len=64)
    with pytest.raises(ValueError, match="fewer than one batch of 8 rows"):
        SFTLoader(examples, 64, 8, seed=0, pad_id=0)
    with pytest.raises(ValueError, match="more than seq_len=8; encode them with max_len=8"):
        SFTLoader(examples, 8, 1, seed=0, pad_id=0)


# ---------------------------------------------------------------- over-long conversations


def test_truncate_and_skip_are_counted(tok):
    long_prompt = [{"role": "user", "content": "xyzzy qwop " * 20}, {"role": "assistant", "content": "four"}]
    long_reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "four " * 40}]
    short = _many(1)[0]  # 14 tokens
    examples, counts = encode_conversations(tok, [long_prompt, long_reply, short], max_len=20)
    assert counts["conversations"] == 3 and counts["truncated"] == 1 and counts["skipped"] == 1
    assert [len(e.ids) for e in examples] == [20, 1 + len(tok.encode_chat(short, False))]
    assert examples[0].train.any() and counts["tokens"] == sum(len(e.ids) for e in examples)
    _, counts = encode_conversations(tok, [long_prompt, long_reply, short], max_len=20, overlong="skip")
    assert counts["truncated"] == 0 and counts["skipped"] == 2
    with pytest.raises(ValueError, match="3 given, 3 longer than finetune.max_len=5 tokens skipped"):
        encode_conversations(tok, [long_prompt, long_reply, short], max_len=5, overlong="skip")
    with pytest.raises(ValueError, match="overlong='cut'"):
        encode_conversations(tok, [short], max_len=20, overlong="cut")


# ---------------------------------------------------------------- reading files


def test_reads_jsonl_and_gz_ignoring_extra_keys(tmp_path):
    lines = [json.dumps({"messages": c, "id": i, "source": "x"}) for i, c in enumerate(CHAT)]
    plain, packed = tmp_path / "chat.jsonl", tmp_path / "chat.jsonl.gz"
    plain.write_text("\n".join(lines) + "\n\n")
    packed.write_bytes(gzip.compress("\n".join(lines).encode()))
    assert read_conversations(plain) == read_conversations(packed) == CHAT


BAD = [
    ("{not json", "not JSON"),
    ('["messages"]', 'no "messages" list'),
    ('{"conversation": []}', 'no "messages" list'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "message 0 has role 'bot' (use one of system, user, "
                                                          "assistant)"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', "message 0 content is list, not a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     "message 1 is an empty assistant turn"),
    ('{"messages": ["hi"]}', "message 0 is not an object"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_every_bad_record_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT[1]}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as info:
        read_conversations(path)
    text = str(info.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text and text.endswith(")")


def test_empty_or_missing_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no conversations in it"):
        read_conversations(empty)
    with pytest.raises(ValueError, match="no such file"):
        read_conversations(tmp_path / "missing.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"messages": CHAT[1]}).encode() + b'\n{"messages": "caf\xe9"}\n')
    # msgspec words it "utf-8" or "UTF-8" depending on its version.
    with pytest.raises(ValueError, match=f"(?i)^{re.escape(str(latin))}:2: not JSON .*utf-8"):
        read_conversations(latin)


# ---------------------------------------------------------------- procedural and synth sources


def test_procedural_conversations_keep_the_corpus_splits():
    families, seed = ["arithmetic", "sorting", "narrative"], 5
    corpus = build_corpus(families, 90, 30, 30, seed)
    data = DataConfig(families=families, num_train_docs=90, num_val_docs=30, num_test_docs=30)
    questions = {s: {d.meta["question"] for d in docs if "question" in d.meta} for s, docs in corpus.items()}
    train = procedural_conversations(["arithmetic", "sorting"], 200, seed, "train", corpus=data)
    test = procedural_conversations(["arithmetic", "sorting"], 20, seed, "test", corpus=data)
    asked = {s: [c[0]["content"] for c in convs] for s, convs in (("train", train), ("test", test))}
    assert len(train) == 200 and len(set(asked["train"])) == 200
    assert not set(asked["train"]) & (questions["test"] | questions["validation"])  # held out stays held out
    assert questions["train"] < set(asked["train"])  # the corpus's own problems first, then new ones
    assert set(asked["test"]) <= questions["test"] and not set(asked["test"]) & set(asked["train"])
    arithmetic = next(c for c in train if "####" in c[1]["content"])
    assert arithmetic[1]["content"].splitlines()[-1].startswith("#### ")
    assert procedural_conversations(["arithmetic"], 5, seed, "test", corpus=data) == \
        procedural_conversations(["arithmetic"], 5, seed, "test", corpus=data)


def test_facts_become_multi_turn_and_narrative_is_refused():
    convs = procedural_conversations(["facts"], 3, 0)
    assert all(len(c) >= 4 and [m["role"] for m in c[:2]] == ["user", "assistant"] for c in convs)
    assert all(c[1]["content"].endswith(".") and "\n\nWhere" not in c[2]["content"] for c in convs)
    with pytest.raises(ValueError, match="'narrative' has no questions to answer"):
        procedural_conversations(["arithmetic", "narrative"], 4, 0)
    with pytest.raises(ValueError, match="arithmetc"):
        procedural_conversations(["arithmetc"], 4, 0)


def _synth(tmp_path, template: str, **kw) -> str:
    out = tmp_path / template
    job = merge(SynthJob(), dict(name=template, template=template, out_dir=str(out), topics=["a bakery", "a farm"],
                                 audiences=["grade 3"], styles=["two steps"], teacher=dict(name="procedural"), **kw))
    synthesize(job, progress=False)
    return out


def test_synth_question_answer_records_become_conversations(tmp_path):
    out = _synth(tmp_path, "math")
    convs = synth_conversations(out)
    records = [json.loads(line) for line in (out / "shards" / "00000.jsonl").read_text().splitlines()]
    assert [c[0]["content"] for c in convs] == [r["fields"]["question"] for r in records]
    assert all(c[1]["content"].endswith("#### " + r["fields"]["answer"]) for c, r in zip(convs, records))
    assert synth_conversations(out / "shards" / "00000.jsonl") == convs
    passages = tmp_path / "passages.txt"
    passages.write_text("The river Odra flows north through three countries before it reaches the sea.\n")
    qa = _synth(tmp_path, "grounded_qa", inputs=[str(passages)])
    records = [json.loads(line) for line in (qa / "shards" / "00000.jsonl").read_text().splitlines()]
    assert [c[0]["content"] for c in synth_conversations(qa)] == [
        r["seed"]["passage"] + "\n\n" + r["fields"]["question"] for r in records]
    assert [c[1]["content"] for c in synth_conversations(qa)] == [
        r["fields"]["reasoning"] + "\nAnswer: " + r["fields"]["answer"] for r in records]
    with pytest.raises(ValueError, match="template 'textbook'.*free text has no answer"):
        synth_conversations(_synth(tmp_path, "textbook"))
    rewritten = tmp_path / "rewritten.jsonl"  # a record as write_jsonl writes it: the fields inside meta
    fields = {"exercise": "E?", "solution": "S"}
    rewritten.write_text(json.dumps({"id": "a", "text": "...", "meta": {"fields": fields}}))
    assert synth_conversations(rewritten) == [[{"role": "user", "content": "E?"},
                                               {"role": "assistant", "content": "S"}]]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CHAT[1]}) + "\n")
    with pytest.raises(ValueError, match=f"{chat}:1: not a synthesizer record"):
        synth_conversations(chat)
