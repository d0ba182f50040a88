"""On-policy verified preference pairs: the verifier's choices, determinism by seed, exact resume, bad input."""

import json

import pytest

from slmforge.eval import gsm8k
from slmforge.post import prefs, verified

PROBLEMS = [{"question": f"q{i}", "answer": "7", "solution": f"step {i}\n#### 7"} for i in range(5)]
# Per problem, the k=3 answers a stub sampler returns, and what the verifier must make of them.
SCRIPTED = {
    "q0": ["#### 5", "so\n#### 7", "#### 7."],  # chosen: the first correct; rejected: the first wrong
    "q1": ["#### 7", "#### 7", "ok #### 7"],  # all correct: no pair
    "q2": ["The answer is 7", "#### 8", ""],  # none correct ("the answer is 7" has no #### line): the reference
    "q3": ["", "  ", "#### 7"],  # the only wrong answers are empty: no pair
    "q4": ["#### $7", "#### 7,0", "ok\n#### 7."],  # strict-match takes no "$"; "7,0" is 70; "7." is 7
}


def stub_sampler(calls: list):
    def sample(model, tokenizer, questions, k, temperature, max_new_tokens, generator, batch_size):
        calls.append(list(questions))
        return [SCRIPTED[q][:k] for q in questions]

    return sample


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_follow_the_verifier(loaded, tmp_path, monkeypatch):
    model, tok = loaded
    calls = []
    monkeypatch.setattr(verified, "sample_answers", stub_sampler(calls))
    out = tmp_path / "pairs.jsonl"
    counts = verified.verified_pairs(model, tok, PROBLEMS, k=3, temperature=1.0, max_new_tokens=8, seed=0,
                                     out_path=out, batch_size=6, progress=False)
    assert calls == [["q0", "q1"], ["q2", "q3"], ["q4"]]  # chunks of batch_size // k problems
    assert counts == {"problems": 5, "pairs": 3, "chosen_from_sample": 2, "chosen_from_reference": 1,
                      "all_correct": 1, "only_empty_wrong": 1, "sample_accuracy": pytest.approx(7 / 15)}
    pairs = read(out)
    assert [(p["problem"], p["chosen_from"]) for p in pairs] == [(0, "sample"), (2, "reference"), (4, "sample")]
    assert pairs[0] == {"prompt": [{"role": "user", "content": "q0"}],
                        "chosen": [{"role": "assistant", "content": "so\n#### 7"}],
                        "rejected": [{"role": "assistant", "content": "#### 5"}], "problem": 0,
                        "chosen_from": "sample"}
    assert pairs[1]["chosen"][0]["content"] == "step 2\n#### 7"
    assert pairs[1]["rejected"][0]["content"] == "The answer is 7"
    assert (pairs[2]["chosen"][0]["content"], pairs[2]["rejected"][0]["content"]) == ("ok\n#### 7.", "#### $7")
    assert not out.with_name("pairs.jsonl.partial").exists()
    # post.prefs reads them back as they were made.
    read_back = [(p.prompt, p.chosen, p.rejected) for p in prefs.read_pairs(out)]
    assert read_back == [(p["prompt"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]


def test_no_pair_is_an_error(loaded, tmp_path, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(verified, "sample_answers", stub_sampler([]))
    with pytest.raises(ValueError, match="no pair from 2 problems.*'all_correct': 1, 'only_empty_wrong': 1"):
        verified.verified_pairs(model, tok, [PROBLEMS[1], PROBLEMS[3]], k=3, temperature=1.0, max_new_tokens=8,
                                seed=0, out_path=tmp_path / "p.jsonl", progress=False)
    assert not (tmp_path / "p.jsonl").exists()


def test_bad_settings_are_one_line_errors(loaded, tmp_path):
    model, tok = loaded
    kw = dict(max_new_tokens=8, seed=0, out_path=tmp_path / "p.jsonl", progress=False)
    with pytest.raises(ValueError, match="temperature=0.*same greedy answer"):
        verified.verified_pairs(model, tok, PROBLEMS, k=2, temperature=0.0, **kw)
    with pytest.raises(ValueError, match="no problems"):
        verified.verified_pairs(model, tok, [], k=2, temperature=1.0, **kw)
    with pytest.raises(ValueError, match="max_new_tokens=64 must be between 1 and the model's context length 64"):
        verified.verified_pairs(model, tok, PROBLEMS, k=2, temperature=1.0, **{**kw, "max_new_tokens": 64})


def test_real_samples_deterministic_by_seed_and_resume_exactly(eval_run, loaded, tmp_path, monkeypatch):
    model, tok = loaded
    problems = verified.load_procedural(eval_run, "train")[:5]
    assert all(p["solution"].endswith(f"#### {p['answer']}") and p["answer"].lstrip("-").isdigit() for p in problems)
    kw = dict(k=2, temperature=1.0, max_new_tokens=6, batch_size=4, progress=False)  # chunks: 2, 2, 1 problems
    a = verified.verified_pairs(model, tok, problems, seed=3, out_path=tmp_path / "a.jsonl", **kw)
    verified.verified_pairs(model, tok, problems, seed=3, out_path=tmp_path / "b.jsonl", **kw)
    verified.verified_pairs(model, tok, problems, seed=4, out_path=tmp_path / "c.jsonl", **kw)
    text = (tmp_path / "a.jsonl").read_text()
    assert text == (tmp_path / "b.jsonl").read_text() != (tmp_path / "c.jsonl").read_text()
    # An untrained model is never right: every problem with a non-empty answer pairs the reference with it.
    assert a["chosen_from_reference"] == a["pairs"] >= 4 and a["sample_accuracy"] == 0
    pairs = read(tmp_path / "a.jsonl")
    assert all(p["chosen"][0]["content"] == problems[p["problem"]]["solution"] for p in pairs)

    # Killed during the second chunk, with a line cut short: the first chunk is reused, the rest drawn again.
    real, calls = verified.sample_answers, []

    def dies_on_second_chunk(*args):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(verified, "sample_answers", dies_on_second_chunk)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        verified.verified_pairs(model, tok, problems, seed=3, out_path=out, **kw)
    partial = out.with_name("resumed.jsonl.partial")
    assert [r["problem"] for r in read(partial)] == [0, 1] and not out.exists()
    partial.write_text(partial.read_text() + '{"problem": 2, "quest')
    calls.clear()
    monkeypatch.setattr(verified, "sample_answers", lambda *args: calls.append(args[2]) or real(*args))
    assert verified.verified_pairs(model, tok, problems, seed=3, out_path=out, **kw) == a
    assert calls == [[p["question"] for p in problems[2:4]], [problems[4]["question"]]]
    assert out.read_text() == text and not partial.exists()

    # Records written under other settings (another seed) are never reused.
    partial.write_text(json.dumps({**verified.judge(0, problems[0], ["#### 1", "#### 2"]),
                                   "settings": {"seed": 4}}) + "\n")
    calls.clear()
    verified.verified_pairs(model, tok, problems, seed=3, out_path=out, **kw)
    assert len(calls) == 3 and out.read_text() == text


def test_chat_samples_are_asked_as_one_user_turn(loaded, monkeypatch):
    model, tok = loaded
    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, **kw):
        seen.update(prompts=prompts, **kw)
        return [f"#### {i}" for i in range(len(prompts))]

    monkeypatch.setattr(verified, "generate_texts", fake_generate)
    out = verified.sample_answers(model, tok, ["a?", "b?"], 2, 0.7, 5, None, 4)
    assert out == [["#### 0", "#### 1"], ["#### 2", "#### 3"]]
    assert seen["prompts"] == [[{"role": "user", "content": "a?"}]] * 2 + [[{"role": "user", "content": "b?"}]] * 2
    assert seen["stop_ids"] == gsm8k.chat_stop_ids(tok) and tok.token_id("<|end|>") in seen["stop_ids"]
    assert seen["temperature"] == 0.7
