"""On-policy verified preference pairs: the model's own answers to arithmetic problems, checked exactly.

For each problem ``k`` answers are sampled from the (SFT) model in the chat format (the question as the one user
turn, ``eval.gsm8k.generate_texts`` with ``chat`` prompts, ending at ``<|end|>``) and each is checked with the
GSM8K scorer: its ``#### N`` line (the "strict-match" filter) must equal the problem's answer exactly. The first
correct sample is the chosen answer (else the problem's reference solution), the first wrong non-empty one the
rejected answer; a problem whose samples are all correct gives no pair (nothing to prefer), and is counted.

Pairs are JSONL in TRL's conversational format, which ``post.prefs`` reads::

    {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
     "rejected": [{"role": "assistant", "content": r}], "problem": 12, "chosen_from": "sample" | "reference"}

Deterministic by seed: problems are sampled in fixed chunks of ``max(1, batch_size // k)``, each with its own
generator seeded by (seed, first problem), so an interrupted run that resumes draws exactly what one uninterrupted
run draws. Finished problems are appended to ``<out>.partial`` with the settings and reused on restart under the
same settings; the pairs file is written atomically at the end and the partial file removed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from slmforge.eval.gsm8k import chat_stop_ids, exact_match, extract, generate_texts, load_problems
from slmforge.progress import progress_bar
from slmforge.runs import partial_records, write_text

VERIFIER = "strict-match"  # the GSM8K filter whose answer must match: the "#### N" line


def verified_pairs(model, tokenizer, problems: list[dict], k: int, temperature: float, max_new_tokens: int,
                   seed: int, out_path: str | Path, batch_size: int = 16, progress: bool = True) -> dict:
    """Sample, verify and pair (module docstring); write the pairs to ``out_path`` and return the counts.

    ``problems``: ``[{"question", "answer", "solution"}]``, the answer the final number (or a solution ending in
    ``#### N``), the solution a reference worked answer (``load_procedural`` builds them from a run's data).
    Raises ValueError when no problem gives a pair (nothing to train on).
    """
    _check(model, problems, k, temperature, max_new_tokens, batch_size)
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    settings = {"k": k, "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
                "batch_size": batch_size, "verifier": VERIFIER}
    done = _resume(partial, problems, settings)
    device = next(model.parameters()).device
    per_chunk = max(1, batch_size // k)  # one batch of k samples per problem, when k <= batch_size
    bar = progress_bar(total=len(problems), initial=len(done), desc="verified pairs", disable=not progress)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(problems), per_chunk):
        idx = range(start, min(start + per_chunk, len(problems)))
        if all(i in done for i in idx):
            continue
        # A chunk is always drawn whole, with its own seed: resuming draws what an uninterrupted run draws.
        generator = torch.Generator(device=device).manual_seed(_chunk_seed(seed, start))
        samples = sample_answers(model, tokenizer, [problems[i]["question"] for i in idx], k, temperature,
                                 max_new_tokens, generator, batch_size)
        num_new = sum(i not in done for i in idx)
        with partial.open("a") as f:
            for i, texts in zip(idx, samples):
                done[i] = {**judge(i, problems[i], texts), "settings": settings}
                f.write(json.dumps(done[i]) + "\n")
        bar.update(num_new)
    bar.close()
    records = [done[i] for i in range(len(problems))]
    counts = _counts(records)
    if not counts["pairs"]:
        raise ValueError(f"verified pairs: no pair from {len(problems)} problems, nothing to train on ({counts}); "
                         f"sample more answers (k) or at a higher temperature")
    write_text(out_path, "".join(json.dumps(r["pair"]) + "\n" for r in records if r["pair"]))
    partial.unlink(missing_ok=True)
    return counts


def sample_answers(model, tokenizer, questions: list[str], k: int, temperature: float, max_new_tokens: int,
                   generator: torch.Generator, batch_size: int) -> list[list[str]]:
    """``k`` sampled answers per question, each asked as the one user turn of a conversation."""
    chats = [[{"role": "user", "content": q}] for q in questions for _ in range(k)]
    flat = generate_texts(model, tokenizer, chats, max_new_tokens, temperature=temperature, generator=generator,
                          batch_size=batch_size, stop_ids=chat_stop_ids(tokenizer))
    return [flat[j * k : (j + 1) * k] for j in range(len(questions))]


def judge(index: int, problem: dict, samples: list[str]) -> dict:
    """One problem's record: its samples, which are correct, and its pair (None when there is none to make)."""
    correct = [exact_match(extract(s, VERIFIER), problem["answer"]) for s in samples]
    right = next((s for s, ok in zip(samples, correct) if ok), None)
    # An empty answer is no answer to learn from, and an empty side is a bad pair.
    wrong = next((s for s, ok in zip(samples, correct) if not ok and s.strip()), None)
    pair = None
    if wrong is not None:
        chosen = right if right is not None else problem.get("solution") or problem["answer"]
        pair = {"prompt": [{"role": "user", "content": problem["question"]}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": wrong}],
                "problem": index, "chosen_from": "sample" if right is not None else "reference"}
    return {"problem": index, "question": problem["question"], "samples": samples, "correct": correct, "pair": pair}


def problem(question: str, solution: str) -> dict:
    """A problem as ``verified_pairs`` takes it: the question, the final number of the worked ``solution`` (its
    ``#### N`` line) and the solution itself, the reference answer."""
    return {"question": question, "answer": solution.rsplit("#### ", 1)[-1].strip(), "solution": solution}


def load_procedural(run_dir: str | Path, split: str = "train") -> list[dict]:
    """A run's procedural arithmetic problems (``data/<split>.jsonl``), as ``problem`` makes them."""
    return [problem(p["question"], p["answer"]) for p in load_problems("procedural", split, run_dir)]


def _check(model, problems: list[dict], k: int, temperature: float, max_new_tokens: int, batch_size: int) -> None:
    if not problems:
        raise ValueError("verified pairs: no problems to sample (the run's data split has no arithmetic problems?)")
    missing = [key for key in ("question", "answer") if key not in problems[0]]
    if missing:
        raise ValueError(f"verified pairs: problems need 'question' and 'answer' fields; missing {missing}")
    if k < 1 or batch_size < 1:
        raise ValueError(f"verified pairs: k={k}, batch_size={batch_size}: both must be at least 1")
    if k > 1 and temperature <= 0:
        raise ValueError(f"verified pairs: temperature={temperature} makes all k={k} samples the same greedy "
                         f"answer; use a temperature above 0 (e.g. 0.8)")
    if not 0 < max_new_tokens < model.cfg.max_seq_len:
        raise ValueError(f"verified pairs: max_new_tokens={max_new_tokens} must be between 1 and the model's "
                         f"context length {model.cfg.max_seq_len} (exclusive), to leave room for the question")


def _chunk_seed(seed: int, start: int) -> int:
    digest = hashlib.blake2b(f"slmforge.verified:{seed}:{start}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # torch seeds are below 2**63


def _resume(partial: Path, problems: list[dict], settings: dict) -> dict[int, dict]:
    """Records an interrupted run wrote for the same problems under the same settings."""
    done = {}
    for r in partial_records(partial):
        i = r.get("problem", -1)
        if 0 <= i < len(problems) and r.get("question") == problems[i]["question"] and r.get("settings") == settings:
            done[i] = r
    return done


def _counts(records: list[dict]) -> dict:
    pairs = [r["pair"] for r in records if r["pair"]]
    num_samples = sum(len(r["correct"]) for r in records)
    return {"problems": len(records), "pairs": len(pairs),
            "chosen_from_sample": sum(p["chosen_from"] == "sample" for p in pairs),
            "chosen_from_reference": sum(p["chosen_from"] == "reference" for p in pairs),
            "all_correct": sum(all(r["correct"]) for r in records),
            # wrong samples, but every one of them empty: no rejected answer to pair
            "only_empty_wrong": sum(not r["pair"] and not all(r["correct"]) for r in records),
            "sample_accuracy": sum(sum(r["correct"]) for r in records) / num_samples if num_samples else 0.0}
