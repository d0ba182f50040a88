"""``math_eval`` in a recipe: ``slmforge run`` scores the corpus's held-out arithmetic after training and puts it in
the report, the same numbers ``eval gsm8k data=procedural`` writes; a corpus without arithmetic is refused first."""

import json
import sys
from pathlib import Path

import pytest

from slmforge.config import load_config, merge

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_run_config  # noqa: E402


def test_run_scores_held_out_arithmetic_plain_and_with_the_calculator(tmp_path):
    from slmforge.pipeline import run

    cfg = merge(tiny_run_config(tmp_path, name="m"), {"math_eval": {"decodings": ["plain", "calculator"]},
                                                      "sample_prompts": []})
    report = run(cfg)
    test_docs = [json.loads(line) for line in (tmp_path / "m" / "data" / "test.jsonl").open()]
    arithmetic = [d["meta"] for d in test_docs if d["meta"]["family"] == "arithmetic"]
    assert 0 < len(arithmetic) < len(test_docs)  # only the arithmetic documents of the test split are scored
    for mode, folder in (("plain", "gsm8k_procedural"), ("calculator", "gsm8k_procedural_calculator")):
        scored = [json.loads(line) for line in (tmp_path / "m" / "eval" / folder / "samples.jsonl").open()]
        assert [s["question"] for s in scored] == [d["question"] for d in arithmetic]
        right = sum(s["strict-match"]["correct"] for s in scored)
        assert report["math"][mode] == {"accuracy": right / len(scored), "problems": len(scored)}
    summary = json.loads((tmp_path / "m" / "eval" / "gsm8k_procedural_calculator" / "summary.json").read_text())
    assert summary["config"]["tools"] == "calculator" and summary["config"]["num_fewshot"] == 0
    md = (tmp_path / "m" / "report.md").read_text()
    assert f"held-out arithmetic, with the calculator in decoding | {report['math']['calculator']['accuracy']:.1%} " \
           f"of {len(arithmetic)} problems" in md
    assert "held-out arithmetic, the model's own arithmetic" in md


def test_no_math_eval_no_math_stage(tmp_path):
    from slmforge.pipeline import run

    report = run(merge(tiny_run_config(tmp_path, name="n"), {"sample_prompts": []}))
    assert "math" not in report and not (tmp_path / "n" / "eval" / "gsm8k_procedural").exists()


def test_a_corpus_without_arithmetic_is_refused_before_any_work(tmp_path):
    from slmforge.pipeline import run

    cfg = merge(tiny_run_config(tmp_path, name="x"), {"math_eval": {"decodings": ["calculator"]},
                                                      "data": {"families": ["narrative", "facts"]}})
    with pytest.raises(ValueError, match=r"math_eval.decodings: the corpus has no procedural arithmetic"):
        run(cfg)
    assert not (tmp_path / "x").exists()


def test_bad_decoding_names_the_key():
    with pytest.raises(ValueError, match=r"math_eval.decodings\[1\]='calc': choose one of plain, calculator"):
        load_config(None, ["math_eval.decodings=[plain,calc]"])
