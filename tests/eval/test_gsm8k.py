"""GSM8K scoring against lm-eval-harness's own filters and metric, read from its installed gsm8k.yaml."""

import json
from pathlib import Path

import pytest

from slmforge.cli import main
from slmforge.eval import gsm8k
from tests.conftest import needs_data
from tests.eval.conftest import GSM8K

lm_eval = pytest.importorskip("lm_eval")
pytestmark = needs_data(GSM8K / "test.jsonl", GSM8K / "train.jsonl")


def lm_eval_scorer():
    """(generations, gold) -> {filter name: (answer, correct)}, built from lm-eval's gsm8k.yaml."""
    import yaml
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters import build_filter_ensemble

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    (metric,) = config["metric_list"]
    kwargs = {k: v for k, v in metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    ensembles = [build_filter_ensemble(f["name"], [(s["function"], {k: v for k, v in s.items() if k != "function"})
                                                   for s in f["filter"]]) for f in config["filter_list"]]

    def score(generations: list[str], golds: list[str]) -> list[dict]:
        instances = [Instance("generate_until", {}, ("", {}), 0, resps=[g]) for g in generations]
        out = [{} for _ in generations]
        for ensemble in ensembles:
            ensemble.apply(instances)
            for o, inst, gold in zip(out, instances, golds):
                answer = inst.filtered_resps[ensemble.name]
                em = exact_match_hf_evaluate(predictions=[answer], references=[gold], **kwargs)["exact_match"]
                o[ensemble.name] = (answer, bool(em))
        return out

    return score


def ours(generation: str, gold: str) -> dict:
    return {name: (r["answer"], r["correct"]) for name, r in gsm8k.score(generation, gold).items()}


def test_filters_and_metric_are_lm_evals():
    import yaml

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    assert config["doc_to_text"] == gsm8k.PROMPT.replace("{question}", "{{question}}")
    assert tuple(config["generation_kwargs"]["until"]) == gsm8k.STOP
    assert config["num_fewshot"] == 5 and tuple(config["metric_list"][0]["regexes_to_ignore"]) == gsm8k.IGNORE
    patterns = {f["name"]: f["filter"][0]["regex_pattern"] for f in config["filter_list"]}
    assert patterns == {name: p.pattern for name, (p, _) in gsm8k.FILTERS.items()}


def test_oracle_scores_100_percent_like_lm_eval():
    problems = gsm8k.load_problems(str(GSM8K / "test.jsonl"), "test")
    assert len(problems) == 1319
    golds = [p["answer"] for p in problems]
    theirs = lm_eval_scorer()(golds, golds)
    for gold, t in zip(golds, theirs):
        assert ours(gold, gold) == t
        assert all(correct for _, correct in t.values())


TRICKY = [
    ("She earns 1,234 dollars.\n#### 1,234", "#### 1234"),
    ("#### $18", "x\n#### 18"),
    ("So the total is $18.", "#### 18"),
    ("#### 18.", "#### 18"),
    ("The change is -5 dollars.\n#### -5", "#### -5"),
    ("#### 3\n#### 4", "#### 4"),
    ("#### 3\n#### 4", "#### 3"),
    ("First 2 + 2 = 4.\n#### 4\n\nThen 7", "#### 4"),
    ("no number here", "#### 7"),
    ("", "#### 7"),
    ("####18", "#### 18"),
    ("#### 1 234", "#### 1234"),
    ("It costs 0.50 each, so 1.5 in total.", "#### 1.5"),
    ("... and so on", "#### 0"),
    ("The answer is 5,000,000.", "#### 5000000"),
    ("$1,200.50 is the total\n#### 1200.5", "#### 1200.5"),
    ("#### ١٢", "#### 12"),
    ("Answer: 12. #### twelve", "#### 12"),
    ("#### -", "#### 5"),
    ("4.\n\n", "#### 4"),
]


@pytest.mark.parametrize("generation,gold", TRICKY, ids=[repr(g)[:24] for g, _ in TRICKY])
def test_tricky_outputs_scored_as_lm_eval_scores_them(generation, gold):
    assert ours(generation, gold) == lm_eval_scorer()([generation], [gold])[0]


def test_majority_vote_is_lm_evals():
    from lm_eval.filters.selection import MajorityVoteFilter, TakeFirstFilter

    votes = ["#### 3", "#### 4", "no", "#### 4", "#### 3", "nothing"]
    result = gsm8k.score(votes[0], "#### 3", samples=votes)
    extracted = [gsm8k.extract(v, "strict-match") for v in votes]
    theirs = list(TakeFirstFilter().apply(MajorityVoteFilter().apply([extracted], [{}]), [{}]))[0]
    assert result["maj@6/strict-match"]["answer"] == theirs == "3"  # 3 and 4 tie; the first seen wins
    assert result["maj@6/strict-match"]["correct"]


def test_prompts_are_lm_evals_fewshot_contexts():
    """Spot check against contexts built by lm-eval itself (recorded from lm-eval 0.4.13, seed 1234)."""
    test = gsm8k.load_problems(str(GSM8K / "test.jsonl"), "test")[:2]
    train = gsm8k.load_problems(str(GSM8K / "train.jsonl"), "train")
    prompts = gsm8k.build_prompts(test, train, 5)
    # lm-eval's first context draws train problems 6374, 3610, 957, 61 and 742 (Random(1234).sample).
    shots = "".join(f"Question: {train[i]['question']}\nAnswer: {train[i]['answer']}\n\n"
                    for i in (6374, 3610, 957, 61, 742))
    assert prompts[0] == shots + f"Question: {test[0]['question']}\nAnswer:"
    assert prompts[1].count("Question: ") == 6 and not prompts[1].startswith(shots[:100])


def test_evaluate_writes_records_and_resumes(eval_run, loaded, tmp_path):
    model, tok = loaded
    cfg = gsm8k.GSM8KConfig(limit=3, num_fewshot=1, max_new_tokens=8, batch_size=2, maj_k=2,
                            out_dir=str(tmp_path / "out"))
    summary = gsm8k.evaluate_model(model, tok, cfg, eval_run, progress=False)
    assert summary["num_problems"] == 3 and set(summary["metrics"]) == {
        "strict-match", "flexible-extract", "maj@2/strict-match", "maj@2/flexible-extract"}
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and len(records[0]["samples"]) == 2
    assert records[0]["prompt"].startswith("Question: ") and records[0]["gold"].rstrip().split()[-1] == "18"
    for r in records:
        assert r["generation"] == gsm8k.cut_at_stop(r["generation"])
        assert r["strict-match"]["answer"] == gsm8k.extract(r["generation"], "strict-match")
    # An interrupted run: record 1 is on disk (marked), the others are not; only they are generated again.
    marked = {**records[1], "generation": "#### 18", "strict-match": {"answer": "18", "correct": True}}
    (tmp_path / "out" / "samples.partial.jsonl").write_text(json.dumps(marked) + "\n" + '{"index": 2, "trunc')
    again = gsm8k.evaluate_model(model, tok, cfg, eval_run, progress=False)
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["generation"] == "#### 18" and json.loads(lines[0]) == records[0]
    assert not (tmp_path / "out" / "samples.partial.jsonl").exists()
    assert again["metrics"]["strict-match"]["exact_match"] == pytest.approx(
        summary["metrics"]["strict-match"]["exact_match"] + (not records[1]["strict-match"]["correct"]) / 3)


def test_cli_gsm8k_and_procedural(eval_run, capsys):
    assert main(["eval", "gsm8k", str(eval_run), "limit=2", "num_fewshot=1", "max_new_tokens=4"]) == 0
    assert "strict-match: exact_match" in capsys.readouterr().out
    assert json.loads((eval_run / "eval" / "gsm8k" / "summary.json").read_text())["num_problems"] == 2
    assert main(["eval", "gsm8k", str(eval_run), "data=procedural", "limit=3", "max_new_tokens=4"]) == 0
    records = (eval_run / "eval" / "gsm8k_procedural" / "samples.jsonl").read_text().splitlines()
    first = json.loads(records[0])
    assert len(records) == 3 and "####" in first["gold"] and first["prompt"].count("Question: ") == 6
    assert main(["eval", "gsm8k", str(eval_run), "limt=2"]) == 2
    assert "did you mean limit" in capsys.readouterr().err


def test_procedural_path_equals_procedural_split(eval_run):
    by_name = gsm8k.load_problems("procedural", "test", eval_run)
    by_path = gsm8k.load_problems(str(eval_run / "data" / "test.jsonl"), "test")
    assert by_name == by_path and by_name and all("\n#### " in p["answer"] for p in by_name)
    with pytest.raises(ValueError, match="not JSON"):
        gsm8k.load_problems(str(eval_run / "config.yaml"), "test")


# ---------------------------------------------------------------- chat=true (a model trained with SFT)


def scripted_generate_batch(tok, script: str, calls: list):
    """A stand-in for ``generate_batch`` that records its prompts and emits ``script``'s ids, with ``<|end|>``
    spliced in after its first line, through the real stop rules (the stop callable and EOS)."""
    first, rest = script.split("\n", 1)
    ids = tok.encode(first) + [tok.token_id("<|end|>")] + tok.encode("\n" + rest)

    def fake(model, prompts, max_new_tokens, eos_id=None, stop=None, **kw):
        calls.append([list(p) for p in prompts])
        out = []
        for _ in prompts:
            new = []
            for token in ids[:max_new_tokens]:
                if token == eos_id:
                    break
                new.append(token)
                if stop is not None and stop(new):
                    break
            out.append(new)
        return out

    return fake


def test_chat_prompts_are_encode_chat_ids_and_stop_at_end(eval_run, loaded, tmp_path, monkeypatch):
    model, tok = loaded
    calls = []
    monkeypatch.setattr(gsm8k, "generate_batch", scripted_generate_batch(tok, "#### 18\nQ: more #### 99", calls))
    cfg = gsm8k.GSM8KConfig(data="procedural", limit=2, num_fewshot=1, max_new_tokens=40, batch_size=2,
                            chat=True, out_dir=str(tmp_path / "chat"))
    gsm8k.evaluate_model(model, tok, cfg, eval_run, progress=False)
    problems = gsm8k.load_problems("procedural", "test", eval_run)[:2]
    chats = gsm8k.build_chats(problems, gsm8k.load_problems("procedural", "train", eval_run), 1)
    assert [m["role"] for m in chats[0]] == ["user", "assistant", "user"]
    assert chats[0][-1]["content"] == problems[0]["question"] and "####" in chats[0][1]["content"]
    keep = max(model.cfg.max_seq_len - cfg.max_new_tokens, model.cfg.max_seq_len // 2)
    expected = [([tok.eos_id] + tok.encode_chat(c, add_generation_prompt=True))[-keep:] for c in chats]
    (passed,) = calls
    assert sorted(passed) == sorted(expected) and all(p[-1] == tok.token_id("<|assistant|>") for p in passed)
    records = [json.loads(line) for line in (tmp_path / "chat" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [tok.apply_chat_template(c) for c in chats]
    # The answer ends at <|end|>: the rest of the script (its #### 99) is never generated.
    assert [r["generation"] for r in records] == ["#### 18", "#### 18"]
    assert all(r["strict-match"]["answer"] == "18" and r["settings"]["chat"] for r in records)
    # An untruncated conversation is EOS + encode_chat's ids.
    assert gsm8k.context_ids(tok, chats[0], 10_000, 1) == [tok.eos_id] + tok.encode_chat(chats[0])


def test_a_generation_budget_as_long_as_the_context_keeps_the_question(loaded):
    _, tok = loaded
    ids = gsm8k.context_ids(tok, "Question: " + "Tom has 3 apples. " * 40, 256, 256)
    # Before, max_len - max_new_tokens = 0 kept only the last token: the model never saw the question.
    assert len(ids) == 128 and ids == ([tok.eos_id] + tok.encode("Question: " + "Tom has 3 apples. " * 40))[-128:]
    short = gsm8k.context_ids(tok, "Question: 1 + 1?", 256, 256)
    assert short == [tok.eos_id] + tok.encode("Question: 1 + 1?")


def test_base_format_ignores_chat_stop_ids(eval_run, loaded, tmp_path, monkeypatch):
    model, tok = loaded
    calls = []
    monkeypatch.setattr(gsm8k, "generate_batch", scripted_generate_batch(tok, "#### 18\nQ: more #### 99", calls))
    cfg = gsm8k.GSM8KConfig(data="procedural", limit=1, num_fewshot=0, max_new_tokens=40, out_dir=str(tmp_path))
    gsm8k.evaluate_model(model, tok, cfg, eval_run, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    problem = gsm8k.load_problems("procedural", "test", eval_run)[0]
    ids = [tok.eos_id] + tok.encode(gsm8k.PROMPT.format(question=problem["question"]))
    assert calls[0] == [ids[-max(model.cfg.max_seq_len - cfg.max_new_tokens, model.cfg.max_seq_len // 2):]]
    assert record["generation"].endswith("#### 99") and record["settings"]["chat"] is False


def test_chat_run_never_reuses_other_format_records(eval_run, loaded, tmp_path, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(gsm8k, "generate_batch", scripted_generate_batch(tok, "#### 18\nx", []))
    cfg = gsm8k.GSM8KConfig(data="procedural", limit=2, num_fewshot=0, max_new_tokens=20, chat=True,
                            out_dir=str(tmp_path))
    gsm8k.evaluate_model(model, tok, cfg, eval_run, progress=False)
    first = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    partial = tmp_path / "samples.partial.jsonl"
    for chat, reused in ((False, False), (True, True)):
        marked = {**first, "generation": "#### 7", "settings": {**first["settings"], "chat": chat}}
        partial.write_text(json.dumps(marked) + "\n")
        gsm8k.evaluate_model(model, tok, cfg, eval_run, progress=False)
        again = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
        assert again["generation"] == ("#### 7" if reused else "#### 18")


def test_cli_gsm8k_chat(eval_run, capsys):
    assert main(["eval", "gsm8k", str(eval_run), "data=procedural", "chat=true", "limit=2", "num_fewshot=0",
                 "max_new_tokens=4"]) == 0
    assert "strict-match: exact_match" in capsys.readouterr().out
    out = eval_run / "eval" / "gsm8k_procedural_chat"
    assert json.loads((out / "summary.json").read_text())["config"]["chat"] is True
    first = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("<|user|>") and first["prompt"].endswith("<|end|><|assistant|>")
