"""Fact-question accuracy: does the model rank the true value above the attribute's other values?

Each question (prompt, answer) of ``synth.knowledge`` is scored by the log-likelihood of " " + value after EOS +
prompt, for every value of the answer's attribute (``knowledge.candidates``); the question counts as right when the
true answer has the highest summed log-likelihood (lm-eval-harness's multiple-choice ``acc``). Ranking rather than
greedy decoding: a small model's greedy answer often fails on form (a stop, a space, an article) before knowledge,
while the ranking isolates the stored fact, gives a known chance level (1 / number of candidates) and needs one
batched forward per question. Shapes: N candidates, T padded length, V vocabulary.
"""

from __future__ import annotations

import torch

from slmforge.synth.knowledge import candidates as knowledge_candidates


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompt: str, answers: list[str]) -> torch.Tensor:
    """(N,) summed log-probability of each " " + answer after EOS + prompt (the document start seen in training)."""
    device = next(model.parameters()).device
    context = [tokenizer.eos_id] + tokenizer.encode(prompt)
    rows = [[tokenizer.eos_id] + tokenizer.encode(f"{prompt} {a}") for a in answers]
    width = max(len(r) for r in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # (N, T), right-padded
    targets = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
    for n, row in enumerate(rows):
        inputs[n, : len(row) - 1] = torch.tensor(row[:-1])
        # The answer's tokens: those past the prompt's (BPE keeps the prompt a prefix: the answer starts a word).
        first = len(context) - 1
        targets[n, first : len(row) - 1] = torch.tensor(row[first + 1 :])
    logits, _ = model(inputs)  # (N, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
    return (picked * (targets != -100)).sum(dim=1)


def fact_scores(model, tokenizer, questions: list[tuple[str, str]], choices=None) -> list[bool]:
    """Per question, whether the true answer ranks first among ``choices(answer)`` (default: its attribute's values)."""
    choices = choices or knowledge_candidates
    was_training = model.training
    model.eval()
    out = []
    for prompt, answer in questions:
        options = list(choices(answer))
        scores = answer_logprobs(model, tokenizer, prompt, options)
        out.append(options[int(scores.argmax())] == answer)
    model.train(was_training)
    return out


def fact_accuracy(model, tokenizer, questions: list[tuple[str, str]], choices=None) -> float:
    """Fraction of ``questions`` whose answer the model ranks first (see ``fact_scores``); 0.0 for no questions."""
    scores = fact_scores(model, tokenizer, questions, choices)
    return sum(scores) / len(scores) if scores else 0.0
