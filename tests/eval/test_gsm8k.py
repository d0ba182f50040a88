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
