"""Batched, left-padded generation (``serve.generate.PaddedDecoder``) against one-prompt-at-a-time full recompute.

(Here rather than in tests/serve/test_generate.py because the eval code is its main user.)
"""

import pytest
import torch

from slmforge.config import AttnConfig, ModelConfig
from slmforge.model.attention import Attention
from slmforge.model.block import MIXERS
from slmforge.model.lm import LM
from slmforge.serve.generate import PaddedDecoder, generate_batch, generate_batch_ref

PROMPT_LENGTHS = [1, 7, 12, 3]


def _model(window: int = 0) -> LM:
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=64,
                      attn=AttnConfig(num_heads=4, num_kv_heads=2, window=window))
    return LM(cfg).eval()


def _prompts():
    return [torch.randint(3, 97, (n,)).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("window", [0, 5], ids=["full", "window5"])
def test_padded_logits_equal_full_forward(window):
    model, prompts = _model(window), _prompts()
    decoder = PaddedDecoder(model, prompts, max_new_tokens=9)
    logits = [decoder.prefill()]
    extra = torch.randint(3, 97, (len(prompts), 8))
    for step in range(8):
        logits.append(decoder.step(extra[:, step]))
    for row, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + extra[row].tolist()])
        with torch.no_grad():
            full, _ = model(seq)
        want = full[0, len(prompt) - 1 :]  # (9, V): the last prompt position, then each new token
        got = torch.stack([lg[row] for lg in logits])
        assert (got - want).abs().max().item() < 1e-5, row


@pytest.mark.parametrize("window", [0, 5], ids=["full", "window5"])
def test_greedy_batch_equals_reference(window):
    model, prompts = _model(window), _prompts()
    assert generate_batch(model, prompts, 12) == generate_batch_ref(model, prompts, 12)


def test_eos_and_stop_rows_leave_the_batch():
    model, prompts = _model(), _prompts()
    free = generate_batch_ref(model, prompts, 12)
    eos = free[1][3]  # row 1 meets this id at step 3 (other rows maybe too)
    stop = lambda new: len(new) >= 2 and new[-1] == free[2][1]  # noqa: E731
    got = generate_batch(model, prompts, 12, eos_id=eos, stop=stop)
    assert got == generate_batch_ref(model, prompts, 12, eos_id=eos, stop=stop)
    assert len(got[1]) <= 3 and eos not in got[1]


def test_sampling_is_seeded_and_a_user_mixer_batches_too(monkeypatch):
    model, prompts = _model(), _prompts()
    a, b, c = (generate_batch(model, prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed))
               for seed in (5, 5, 6))
    assert a == b and c != a  # seeded sampling: a greedy decoder would give c == a
    assert a != generate_batch(model, prompts, 10)

    class Other(Attention):  # a mixer added to MIXERS whose cache is one of model/cache.py's
        pass

    monkeypatch.setitem(MIXERS, "other", Other)
    other = LM(ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=64, layers="attn,other")).eval()
    assert generate_batch(other, prompts, 8) == generate_batch_ref(other, prompts, 8)
