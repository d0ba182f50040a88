"""GSM8K (Cobbe et al. 2021, arXiv 2110.14168), prompted and scored as lm-eval-harness scores its ``gsm8k`` task.

The variant matched is ``lm_eval/tasks/gsm8k/gsm8k.yaml`` (task ``gsm8k``, version 3.0, lm-eval 0.4.x):
  prompt     5 few-shot examples, each ``"Question: {q}\\nAnswer: {full solution}\\n\\n"``, then
             ``"Question: {q}\\nAnswer:"``; the shots are ``Random(1234).sample(train, 5)`` drawn problem after
             problem in test order, as lm-eval's default sampler does with its default few-shot seed
  decoding   greedy, until ``"Question:"``, ``"</s>"`` or ``"<|im_end|>"`` (the text is cut at the first), at most
             256 new tokens; the context keeps its last ``max_seq_len - 256`` tokens
  filters    "strict-match": the first match of ``#### (\\-?[0-9\\.\\,]+)``; "flexible-extract": the last match of
             ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (its first non-empty group), stripped; no match -> ``[invalid]``
  metric     exact_match against the full reference solution after removing ``,``, ``$``, everything up to the
             last ``"#### "`` and a final ``.`` (in that order) from both sides, ignoring case
maj@k (``maj_k``) samples k answers per problem (temperature 0.2, as ``gsm8k-cot-self-consistency``), applies
each filter to every answer and scores the most common extraction (``[invalid]`` votes too; ties go to the
first seen), as lm-eval's ``majority_vote`` filter does. Our prompts start with EOS, the document boundary
the model saw in training. ``data=procedural`` scores the run's held-out arithmetic problems the same way.
``chat=true`` asks a chat model (one trained with SFT) instead: each shot is a user turn (the question) and an
assistant turn (its solution), the problem the last user turn, rendered with ``Tokenizer.encode_chat`` (after the
EOS, as ``slmforge chat`` does); the answer also ends at ``<|end|>`` or ``<|user|>``; scoring is the same.
Writes ``samples.jsonl`` (one record per problem, with the wrong ``<<a=b>>`` steps of its generation) and
``summary.json`` (under ``eval/gsm8k``, ``..._procedural``, ``..._chat``; its ``strata``: accuracy by number of steps
and by largest operand, right answers with a wrong step, see ``eval/strata.py``); an interrupted run resumes.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slmforge.checkpoint import load_for_inference
from slmforge.curate.documents import read_documents
from slmforge.eval.strata import check_steps, strata
from slmforge.progress import progress_bar
from slmforge.runs import RunDir, partial_records, write_json, write_text
from slmforge.serve.generate import generate_batch
from slmforge.serve.tools import make_tool

LM_EVAL_TASK = "gsm8k (lm-eval-harness tasks/gsm8k/gsm8k.yaml, version 3.0)"
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"  # <repo>/../shared/data/gsm8k
HUB_DATASET = ("openai/gsm8k", "main")
PROMPT = "Question: {question}\nAnswer:"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
STOP = ("Question:", "</s>", "<|im_end|>")
CHAT_STOP_TOKENS = ("<|end|>", "<|user|>")  # chat=true: an answer ends with its turn (as in serve/server.py)
FALLBACK = "[invalid]"
# name -> (pattern, group_select): lm-eval's RegexFilter followed by take_first.
FILTERS = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
# exact_match's regexes_to_ignore, applied in this order to prediction and reference, then lower-casing.
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


@dataclass
class GSM8KConfig:
    data: str = ""  # test problems: a JSONL path, "hub" (openai/gsm8k) or "procedural"; "" = DEFAULT_DIR/test.jsonl
    fewshot_data: str = ""  # few-shot pool; "" = the train split that goes with `data`
    num_fewshot: int = 5
    fewshot_seed: int = 1234
    limit: int = 0  # score the first `limit` problems; 0 = all
    batch_size: int = 8
    max_new_tokens: int = 256
    maj_k: int = 0  # > 0: also sample k answers per problem and score their majority (maj@k)
    temperature: float = 0.2  # maj@k sampling temperature
    seed: int = 0
    chat: bool = False  # ask in the chat template (a model trained with SFT); see the module docstring
    tools: str = ""  # "calculator": GSM8K's calculator in decoding (serve/tools.py); "" = off
    out_dir: str = ""  # "" = <run_dir>/eval/gsm8k (gsm8k_procedural for data=procedural; _chat, _calculator suffixes)


# ---------------------------------------------------------------- scoring


def extract(text: str, name: str) -> str:
    """The answer filter ``name`` takes from one generation (lm-eval's RegexFilter + take_first)."""
    pattern, group = FILTERS[name]
    found = pattern.findall(text)
    if not found:
        return FALLBACK
    match = found[group]
    if isinstance(match, tuple):
        match = next((m for m in match if m), FALLBACK)
    return match.strip()


def normalize(text: str) -> str:
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def majority(answers: list[str]) -> str:
    return Counter(answers).most_common(1)[0][0]


def score(generation: str, reference: str, samples: list[str] | None = None) -> dict:
    """Extracted answers and correctness under each filter; with ``samples``, also their maj@k."""
    out = {}
    for name in FILTERS:
        answer = extract(generation, name)
        out[name] = {"answer": answer, "correct": exact_match(answer, reference)}
        if samples:
            votes = [extract(s, name) for s in samples]
            vote = majority(votes)
            out[f"maj@{len(samples)}/{name}"] = {"answer": vote, "votes": votes,
                                                 "correct": exact_match(vote, reference)}
    return out


def cut_at_stop(text: str, stop=STOP) -> str:
    """lm-eval's ``for term in until: text = text.split(term)[0]``."""
    for term in stop:
        text = text.split(term)[0]
    return text


# ---------------------------------------------------------------- data and prompts


def load_problems(source: str, split: str, run_dir: str | Path | None = None) -> list[dict]:
    """Problems as ``{"question", "answer"}`` (answer = the full worked solution ending in ``#### N``).

    ``source``: "hub" (openai/gsm8k through ``datasets``), "procedural" (``<run_dir>/data/<split>.jsonl``) or a
    JSONL path, either GSM8K's (question, answer per line) or our documents (arithmetic ones are kept).
    """
    if source == "hub":
        import datasets

        rows = datasets.load_dataset(*HUB_DATASET, split=split)
        return [{"question": r["question"], "answer": r["answer"]} for r in rows]
    if source == "procedural" and run_dir is None:
        raise ValueError("data=procedural needs a run folder (its data/test.jsonl holds the problems)")
    path = RunDir.at(run_dir).split_data(split) if source == "procedural" else Path(source)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected GSM8K JSONL or a run's data/{split}.jsonl)")
    with path.open() as f:
        line = next((line for line in f if line.strip()), "{}")
    try:
        first = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{path}: the first line is not JSON; expected JSONL records") from None
    if isinstance(first, dict) and "question" in first:  # GSM8K's own format
        problems = []
        for doc in read_documents(path, text_field="question"):
            if "answer" not in doc.meta:
                raise ValueError(f"{path}: record {len(problems) + 1} has no 'answer' field")
            problems.append({"question": doc.text, "answer": doc.meta["answer"]})
        return problems
    docs = [d for d in read_documents(path) if d.meta.get("family") == "arithmetic"]
    if not docs:
        raise ValueError(f"{path}: neither GSM8K records (question, answer) nor arithmetic documents")
    return [{"question": d.meta["question"], "answer": d.meta["solution"]} for d in docs]


def _sources(cfg: GSM8KConfig) -> tuple[str, str]:
    data = cfg.data or str(DEFAULT_DIR / "test.jsonl")
    if cfg.fewshot_data:
        return data, cfg.fewshot_data
    if data in ("hub", "procedural"):
        return data, data
    return data, str(Path(data).with_name("train.jsonl"))


def draw_shots(problems: list[dict], pool: list[dict], num_fewshot: int, seed: int = 1234,
               same_split: bool = False) -> list[list[dict]]:
    """Each problem's few-shot examples, drawn as lm-eval's default sampler draws them (module docstring)."""
    rnd = random.Random(seed)
    out = []
    for problem in problems:
        if not num_fewshot:
            shots = []
        elif same_split:  # lm-eval draws one extra and drops the problem itself
            shots = [s for s in rnd.sample(pool, num_fewshot + 1) if s != problem][:num_fewshot]
        else:
            shots = rnd.sample(pool, num_fewshot)
        out.append(shots)
    return out


def build_prompts(problems: list[dict], pool: list[dict], num_fewshot: int, seed: int = 1234,
                  same_split: bool = False) -> list[str]:
    """Few-shot contexts exactly as lm-eval builds them for the ``gsm8k`` task (module docstring)."""
    prompts = []
    for problem, shots in zip(problems, draw_shots(problems, pool, num_fewshot, seed, same_split)):
        context = "".join(PROMPT.format(question=s["question"]) + TARGET_DELIMITER + s["answer"] + FEWSHOT_DELIMITER
                          for s in shots)
        prompts.append(context + PROMPT.format(question=problem["question"]))
    return prompts


def build_chats(problems: list[dict], pool: list[dict], num_fewshot: int, seed: int = 1234,
                same_split: bool = False) -> list[list[dict]]:
    """The same few-shot examples as ``build_prompts`` as conversations: each shot a user turn (its question) and
    an assistant turn (its solution), then the problem as the last user turn."""
    chats = []
    for problem, shots in zip(problems, draw_shots(problems, pool, num_fewshot, seed, same_split)):
        turns = [m for s in shots for m in ({"role": "user", "content": s["question"]},
                                            {"role": "assistant", "content": s["answer"]})]
        chats.append(turns + [{"role": "user", "content": problem["question"]}])
    return chats


def chat_stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end an assistant turn (``CHAT_STOP_TOKENS``)."""
    return tuple(tokenizer.token_id(t) for t in CHAT_STOP_TOKENS)


def context_ids(tokenizer, prompt: str | list[dict], max_len: int, max_new_tokens: int) -> list[int]:
    """EOS (a new document) + the prompt's ids, keeping the last ``max_len - max_new_tokens``, but at least half the
    context: a generation budget as large as the context (256 new tokens for a 256-token model) must not cut the
    question down to its last token; an answer that runs past the context decodes on (RoPE extends).

    A prompt is text, or a conversation (a list of messages) rendered by ``encode_chat`` for the assistant to answer.
    """
    body = (tokenizer.encode_chat(prompt, add_generation_prompt=True) if isinstance(prompt, list)
            else tokenizer.encode(prompt))
    ids = [tokenizer.eos_id] + body
    return ids[-max(1, max_len - max_new_tokens, max_len // 2):]


def generate_texts(model, tokenizer, prompts: list[str] | list[list[dict]], max_new_tokens: int, stop=STOP,
                   temperature: float = 0.0, generator=None, batch_size: int = 8,
                   stop_ids: tuple[int, ...] = (), tools: str = "") -> list[str]:
    """Continue each prompt (text or conversation) until a stop string, a stop id, EOS or ``max_new_tokens``; the
    text is cut at the stop string (special tokens, a stop id among them, are not decoded).

    Prompts are batched longest first (little padding), as lm-eval's collator orders them.
    """
    ids = [context_ids(tokenizer, p, model.cfg.max_seq_len, max_new_tokens) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = [""] * len(ids)
    tool = make_tool(tools, tokenizer)  # tools="calculator": serve/tools.py

    def stopped(new: list[int]) -> bool:
        if new[-1] in stop_ids:
            return True
        text = tokenizer.decode(new)
        return any(s in text for s in stop)

    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        new = generate_batch(model, [ids[i] for i in chunk], max_new_tokens, eos_id=tokenizer.eos_id,
                             temperature=temperature, generator=generator, stop=stopped, tool=tool)
        for i, row in zip(chunk, new):
            out[i] = cut_at_stop(tokenizer.decode(row), stop)
    return out


# ---------------------------------------------------------------- the evaluation


def evaluate(run_dir: str | Path, cfg: GSM8KConfig | None = None) -> dict:
    """Score a run folder's model (``slmforge eval gsm8k RUN_DIR key=value ...``); see ``evaluate_model``."""
    model, tokenizer, _ = load_for_inference(run_dir)
    return evaluate_model(model, tokenizer, cfg or GSM8KConfig(), run_dir)


def evaluate_model(model, tokenizer, cfg: GSM8KConfig, run_dir: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Score GSM8K (or the run's procedural arithmetic) and write samples.jsonl + summary.json; return the summary."""
    data, fewshot = _sources(cfg)
    t0 = time.perf_counter()
    problems = load_problems(data, "test", run_dir)
    if cfg.limit:
        problems = problems[: cfg.limit]
    pool = load_problems(fewshot, "train", run_dir) if cfg.num_fewshot else []
    inputs, prompts, stop_ids = _prompts(cfg, tokenizer, problems, pool, data, fewshot)
    default_out = ("gsm8k_procedural" if data == "procedural" else "gsm8k") + ("_chat" if cfg.chat else "") + \
        (f"_{cfg.tools}" if cfg.tools else "")  # each setting keeps its own summary.json
    out_dir = Path(cfg.out_dir) if cfg.out_dir else RunDir.at(run_dir or ".").eval_output(default_out)
    partial = out_dir / "samples.partial.jsonl"
    # Records of an interrupted run are reused only under the same decoding settings and prompt format.
    settings = {k: v for k, v in asdict(cfg).items()
                if k in ("max_new_tokens", "maj_k", "temperature", "seed", "chat", "tools")}
    done = _resume(partial, prompts, settings)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    todo = [i for i in range(len(problems)) if i not in done]
    chunk = max(cfg.batch_size, 1) * 4  # problems per chunk written to samples.partial.jsonl
    bar = progress_bar(total=len(problems), initial=len(done), desc="gsm8k", disable=not progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), chunk):
        idx = todo[start : start + chunk]
        greedy = generate_texts(model, tokenizer, [inputs[i] for i in idx], cfg.max_new_tokens,
                                batch_size=cfg.batch_size, stop_ids=stop_ids, tools=cfg.tools)
        sampled = [None] * len(idx)
        if cfg.maj_k:
            flat = generate_texts(model, tokenizer, [inputs[i] for i in idx for _ in range(cfg.maj_k)],
                                  cfg.max_new_tokens, temperature=cfg.temperature, generator=generator,
                                  batch_size=cfg.batch_size, stop_ids=stop_ids, tools=cfg.tools)
            sampled = [flat[j * cfg.maj_k : (j + 1) * cfg.maj_k] for j in range(len(idx))]
        with partial.open("a") as f:
            for i, gen, samples in zip(idx, greedy, sampled):
                done[i] = {**_record(i, problems[i], prompts[i], gen, samples), "settings": settings}
                f.write(json.dumps(done[i]) + "\n")
        bar.update(len(idx))
    bar.close()
    records = [done[i] for i in range(len(problems))]
    write_text(out_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    partial.unlink(missing_ok=True)
    summary = _summary(records, cfg, data, fewshot, time.perf_counter() - t0)
    write_json(out_dir / "summary.json", summary)
    return summary


def _prompts(cfg: GSM8KConfig, tokenizer, problems: list[dict], pool: list[dict], data: str,
             fewshot: str) -> tuple[list, list[str], tuple[int, ...]]:
    """(what the model continues: texts or conversations, the prompts as text for the records, the stop ids)."""
    same = data == fewshot and data not in ("hub", "procedural")
    if not cfg.chat:
        prompts = build_prompts(problems, pool, cfg.num_fewshot, cfg.fewshot_seed, same_split=same)
        return prompts, prompts, ()
    chats = build_chats(problems, pool, cfg.num_fewshot, cfg.fewshot_seed, same_split=same)
    return chats, [tokenizer.apply_chat_template(c) for c in chats], chat_stop_ids(tokenizer)


def _record(index: int, problem: dict, prompt: str, generation: str, samples: list[str] | None) -> dict:
    scored = score(generation, problem["answer"], samples)
    return {"index": index, "question": problem["question"], "prompt": prompt, "generation": generation,
            "gold": problem["answer"], "gold_answer": normalize(problem["answer"]), **scored,
            "wrong_steps": check_steps(generation)[1], **({"samples": samples} if samples else {})}


def _resume(partial: Path, prompts: list[str], settings: dict) -> dict[int, dict]:
    """Records already written by an interrupted run with the same prompts and settings."""
    return {r["index"]: r for r in partial_records(partial)
            if r["index"] < len(prompts) and r["prompt"] == prompts[r["index"]] and r["settings"] == settings}


def _summary(records: list[dict], cfg: GSM8KConfig, data: str, fewshot: str, seconds: float) -> dict:
    n = len(records)
    metrics = {}
    for key in [k for k in (records[0] if records else {}) if k in FILTERS or k.startswith("maj@")]:
        p = sum(r[key]["correct"] for r in records) / n
        # lm-eval's stderr of a mean, the sample standard deviation over sqrt(n), for 0/1 scores.
        metrics[key] = {"exact_match": p, "exact_match_stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None}
    return {"task": LM_EVAL_TASK, "data": data, "fewshot_data": fewshot, "num_problems": n, "metrics": metrics,
            "strata": strata(records, list(metrics)), "config": asdict(cfg), "seconds": seconds}
