"""Fact accuracy: ranking the true value among its attribute's values by the model's log-likelihood."""

import copy

import torch

from slmforge.eval.facts import answer_logprobs, fact_accuracy, fact_scores
from slmforge.synth.knowledge import KnowledgeBase
from tests.conftest import memorize


def test_answer_logprobs_equal_the_models_loss_on_the_answer(loaded):
    model, tok = loaded
    prompt, answers = "Zorava plays the", ["piano", "violin"]
    got = answer_logprobs(model, tok, prompt, answers)
    for n, a in enumerate(answers):
        context = [tok.eos_id] + tok.encode(prompt)
        row = torch.tensor([[tok.eos_id] + tok.encode(f"{prompt} {a}")])
        targets = row[:, 1:].clone()
        targets[:, : len(context) - 1] = -100
        with torch.no_grad():
            _, loss = model(row[:, :-1], targets=targets)
        num = int((targets != -100).sum())
        assert num > 0 and torch.allclose(got[n], -loss * num, atol=1e-4)


def test_a_memorized_fact_ranks_first_and_a_wrong_answer_does_not(loaded):
    model, tok = copy.deepcopy(loaded[0]), loaded[1]
    kb = KnowledgeBase(3, 1, seed=0)
    prompt, answer = kb.questions()[3]  # the pet of entity 0
    ids = torch.tensor([[tok.eos_id] + tok.encode(f"{prompt} {answer}.")])
    memorize(model, ids, steps=60)
    wrong = next(v for v in ("fox", "owl", "duck") if v != answer)
    assert fact_scores(model, tok, [(prompt, answer), (prompt, wrong)]) == [True, False]
    assert fact_accuracy(model, tok, [(prompt, answer), (prompt, wrong)]) == 0.5
    assert fact_accuracy(model, tok, []) == 0.0
    # a caller's own choices replace the attribute's values
    assert fact_accuracy(model, tok, [(prompt, wrong)], choices=lambda a: [a, answer]) == 0.0
