"""The difficulty strata of ``eval gsm8k`` (issue 19): steps, largest operand, right answers through a wrong step."""

import json
import re
from collections import Counter
from fractions import Fraction

import pytest

from slmforge.cli import main
from slmforge.eval import gsm8k
from slmforge.eval.strata import check_steps, format_strata, largest_operand, num_steps, operand_bucket, strata


def test_steps_and_largest_operand():
    assert num_steps("a <<2+3=5>>5 then <<5*4=20>>20\n#### 20") == 2
    assert num_steps("no annotations\n#### 3") == 0
    assert largest_operand("Zoe reads a 238-page book, 11 pages a day for 6 days.") == 238
    assert largest_operand("It costs $1,200 or 2.5 times 999 apples") == 1200
    assert largest_operand("Split 1, 2, 3 and 4.75") == Fraction(19, 4)
    assert largest_operand("three apples") is None
    assert [operand_bucket(q) for q in ("9 and 3", "10 cats", "999 or 12", "1,000 ducks", "2024", "none here")] == [
        "<10", "<100", "<1000", ">=1000", ">=1000", "none"]


@pytest.mark.parametrize("text, checked, wrong", [
    ("<<7*7=49>>49", 1, []),
    ("<<7*7=48>>48", 1, ["<<7*7=48>>"]),
    ("<<10/3=3.33>> and <<10/3=3.3>>", 2, []),  # rounded to its own decimals
    ("<<10/3=3>> and <<10/3=3.34>>", 2, ["<<10/3=3>>", "<<10/3=3.34>>"]),
    ("<<5*.5=2.5>> <<1,000+1=1,001>> <<8*2=$16>> <<2-5=-3>>", 4, []),
    ("<<2+2=four>> <<2+2=>>", 2, ["<<2+2=four>>", "<<2+2=>>"]),  # a result that is no number is wrong
    ("<<x*2=4>> <<7*7>> <<__import__('os')=0>> <<1/0=1>> <<2**8=256>>", 0, []),  # not checkable: left alone
    ("Tom has 3 + 4 = 7 apples.\n#### 7", 0, []),
])
def test_check_steps(text, checked, wrong):
    assert check_steps(text) == (checked, wrong)


def _record(question: str, gold: str, generation: str, strict: bool, flexible: bool) -> dict:
    return {"question": question, "gold": gold, "generation": generation,
            "strict-match": {"correct": strict}, "flexible-extract": {"correct": flexible}}


RECORDS = [
    # 1 step, largest 5: right, steps right
    _record("Ann has 5 pens and 3 more.", "<<5+3=8>>8\n#### 8", "<<5+3=8>>8\n#### 8", True, True),
    # 2 steps, largest 40: right, but its first step is wrong
    _record("40 cats, 4 groups, 2 leave.", "<<40/4=10>>10 <<10-2=8>>8\n#### 8",
            "<<40/4=11>>11 <<10-2=8>>8\n#### 8", True, True),
    # 2 steps, largest 1,500: wrong under both filters, one wrong step of two
    _record("A car costs $1,500 and 2 more.", "<<1500+2=1502>>1502 <<1502*1=1502>>1502\n#### 1502",
            "<<1500+2=1503>>1503\n#### 1503", False, False),
    # 3 steps, no number in the question: strict wrong, flexible right, a wrong step (not counted: strict wrong)
    _record("Three and four?", "<<3+4=7>>7 <<7*1=7>>7 <<7-0=7>>7\n#### 7", "<<3+4=6>> so 7", False, True),
]


def test_strata_on_hand_made_records():
    section = strata(RECORDS, ["strict-match", "flexible-extract"])
    assert section["by_steps"] == {
        "1": {"n": 1, "strict-match": 1.0, "flexible-extract": 1.0},
        "2": {"n": 2, "strict-match": 0.5, "flexible-extract": 0.5},
        "3": {"n": 1, "strict-match": 0.0, "flexible-extract": 1.0},
    }
    assert section["by_largest_operand"] == {
        "<10": {"n": 1, "strict-match": 1.0, "flexible-extract": 1.0},
        "<100": {"n": 1, "strict-match": 1.0, "flexible-extract": 1.0},
        ">=1000": {"n": 1, "strict-match": 0.0, "flexible-extract": 0.0},
        "none": {"n": 1, "strict-match": 0.0, "flexible-extract": 1.0},
    }
    assert section["steps"] == {"generated": 5, "checked": 5, "wrong": 3}
    assert section["right_with_wrong_step"] == {"filter": "strict-match", "count": 1, "of_correct": 2, "rate": 0.5}
    lines = format_strata(section)
    assert lines[0].split() == ["stratum", "n", "strict-match", "flexible-extract"]
    assert lines[1].split() == ["steps", "1", "1", "1.000", "1.000"]
    assert lines[5].split() == ["operand", "<100", "1", "1.000", "1.000"]
    assert lines[-1].endswith("generated steps: 5, checked 5, wrong 3; final answer right (strict-match) "
                              "with a wrong step: 1 of 2")
    assert strata([], [])["right_with_wrong_step"]["rate"] is None


def _scripted(problems: list[dict]):
    """generate_texts stand-in: problem 0 the gold solution, 1 the gold with its first result wrong (final answer
    kept), 2 a wrong final answer, the rest nothing."""
    def fake(model, tokenizer, prompts, *args, **kwargs):
        out = []
        for prompt in prompts:
            i = next(j for j, p in enumerate(problems) if prompt.endswith(p["question"] + "\nAnswer:"))
            gold = problems[i]["answer"]
            if i == 1:
                gold = re.sub(r"=(\d+)>>", lambda m: f"={int(m.group(1)) + 1}>>", gold, count=1)
            out.append({0: gold, 1: gold, 2: "#### -1"}.get(i, ""))
        return out
    return fake


def test_procedural_summary_and_cli_table(eval_run, monkeypatch, capsys):
    problems = gsm8k.load_problems("procedural", "test", eval_run)[:4]
    monkeypatch.setattr(gsm8k, "generate_texts", _scripted(problems))
    assert main(["eval", "gsm8k", str(eval_run), "data=procedural", "limit=4", "num_fewshot=0",
                 "out_dir=" + str(eval_run / "eval" / "strata")]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((eval_run / "eval" / "strata" / "summary.json").read_text())
    section = summary["strata"]
    steps = [p["answer"].count("<<") for p in problems]
    expected_steps = {str(s): steps.count(s) for s in sorted(set(steps))}
    assert {k: v["n"] for k, v in section["by_steps"].items()} == expected_steps
    biggest = [max(int(n) for n in re.findall(r"\d+", p["question"])) for p in problems]
    buckets = ["<10" if x < 10 else "<100" if x < 100 else "<1000" if x < 1000 else ">=1000" for x in biggest]
    assert {k: v["n"] for k, v in section["by_largest_operand"].items()} == Counter(buckets)
    assert section["steps"] == {"generated": steps[0] + steps[1], "checked": steps[0] + steps[1], "wrong": 1}
    assert section["right_with_wrong_step"] == {"filter": "strict-match", "count": 1, "of_correct": 2, "rate": 0.5}
    records = [json.loads(line) for line in (eval_run / "eval" / "strata" / "samples.jsonl").read_text().splitlines()]
    assert [len(r["wrong_steps"]) for r in records] == [0, 1, 0, 0]
    assert "final answer right (strict-match) with a wrong step: 1 of 2" in printed
    assert re.search(r"^steps \d+ +\d+ +[01]\.\d{3} +[01]\.\d{3}$", printed, re.M)
