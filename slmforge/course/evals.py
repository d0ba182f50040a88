"""The main build's evaluations: held-out procedural math for every model, needles in a haystack, bits per byte.

Math: the same problems (the math source's test split, never trained on) and settings for every model, zero-shot
and greedy as lm-eval's gsm8k task scores them; the pre-trained models in plain text, the post-trained ones in
the chat template they were tuned on. The target and its no-anneal control were scored by the anneal ablation with
these settings already, and those numbers are reused. Needles: ``eval niah`` on the annealed target over
``evals.niah_lengths`` (at most its context). Bits per byte: the target's validation and test splits, from its
run report.
"""

from __future__ import annotations

from pathlib import Path

from slmforge.checkpoint import load_for_inference
from slmforge.course.config import MainConfig
from slmforge.eval.gsm8k import GSM8KConfig, evaluate
from slmforge.runs import RunDir

STRICT = "strict-match"


def math_accuracy(run_dir: str | Path, cfg: MainConfig, problems: Path, chat: bool) -> dict:
    gsm = GSM8KConfig(data=str(problems), num_fewshot=0, limit=cfg.evals.gsm8k_limit,
                      max_new_tokens=cfg.evals.max_new_tokens, chat=chat,
                      out_dir=str(RunDir.at(run_dir).eval_output("main_math" + ("_chat" if chat else ""))))
    out = evaluate(run_dir, gsm)
    return {"accuracy": out["metrics"][STRICT]["exact_match"], "problems": out["num_problems"], "chat": chat}


def math_table(cfg: MainConfig, results: dict, problems: Path) -> dict[str, dict]:
    """{model: {"run_dir", "accuracy", "problems", "chat"}}: target, its control, then each post stage."""
    target = results["target"]
    table = {}
    ablation = target.get("ablation")
    if ablation:
        for name, key in (("target", "anneal"), ("target without anneal mix", "constant")):
            table[name] = {"run_dir": str(Path(target["run_dir"]).parent / key),
                           "accuracy": ablation[key]["arithmetic_accuracy"][STRICT],
                           "problems": ablation[key]["arithmetic_problems"], "chat": False}
    else:
        table["target"] = {"run_dir": target["run_dir"], **math_accuracy(target["run_dir"], cfg, problems, False)}
    for stage in results["post"]["runs"]:
        table[stage["method"]] = {"run_dir": stage["run_dir"], **math_accuracy(stage["run_dir"], cfg, problems, True)}
    return table


def needles(cfg: MainConfig, run_dir: str) -> dict:
    """Recall per context length on the annealed target (lengths beyond its context are left out, and said)."""
    from slmforge.eval.niah import NiahEvalConfig, evaluate_model

    if not cfg.evals.niah_lengths:
        return {"skipped": "evals.niah_lengths is empty"}
    model, tokenizer, _ = load_for_inference(run_dir)
    fits = [n for n in cfg.evals.niah_lengths if n <= model.cfg.max_seq_len]
    dropped = sorted(set(cfg.evals.niah_lengths) - set(fits))
    if not fits:
        return {"skipped": f"every length in evals.niah_lengths exceeds the target's context "
                           f"({model.cfg.max_seq_len} tokens)"}
    niah = NiahEvalConfig(lengths=fits, depths=cfg.evals.niah_depths, samples=max(1, cfg.evals.niah_samples),
                          kinds=cfg.evals.niah_kinds)
    out = evaluate_model(model, tokenizer, niah, run_dir, progress=False)
    return {"recall": {n: v["recall"] for n, v in out["lengths"].items()}, "dropped_lengths": dropped,
            "samples_per_cell": niah.samples, "depths": niah.depths}


def bits_per_byte(results: dict) -> dict:
    ev = results["target"]["report"]["eval"]
    return {split: ev[split]["bits_per_byte"] for split in ("validation", "test") if split in ev}


def evaluate_all(cfg: MainConfig, results: dict, problems: Path) -> dict:
    table = math_table(cfg, results, problems)
    base = table["target"]["accuracy"]
    gains, prev = {}, base
    for stage in results["post"]["runs"]:
        acc = table[stage["method"]]["accuracy"]
        gains[stage["method"]] = {"vs_target": acc - base, "vs_previous": acc - prev}
        prev = acc
    return {"math": table, "post_gains": gains, "niah": needles(cfg, results["target"]["run_dir"]),
            "bits_per_byte": bits_per_byte(results), "problems_file": str(problems)}
