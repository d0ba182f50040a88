"""Left-padded batched decoding is a model feature: for every mixer in ``MIXERS``, a mixed layout, attention with a
sliding window and a shared (repeated-block) model, prompts of different lengths decoded in one left-padded batch
(``LM.init_cache(num_pad=...)``) give each row the logits it gets decoded alone, at every step, also after rows
leave the batch (``cache.keep``) and with a chunked prefill (fla's ``run_test_generation`` with left padding).
"""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from slmforge.config import AttnConfig, LinearConfig, ModelConfig, SSMConfig
from slmforge.model import attention
from slmforge.model.block import MIXERS
from slmforge.model.cache import RecurrentCache
from slmforge.model.lm import LM
from slmforge.serve.generate import generate_batch, generate_batch_ref

LENGTHS = [1, 5, 12]
# Chunks of 4 tokens, so the padded prompt spans several chunks and padding ends inside one.
BASE = ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=64,
                   attn=AttnConfig(num_heads=4, num_kv_heads=2), ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=4),
                   linear=LinearConfig(num_heads=2, chunk_size=4))
LAYOUTS = {kind: dict(layers=kind) for kind in MIXERS} | {
    "mixed": dict(layers="attn,ssm,linear,hymba", num_layers=4),
    "window": dict(attn=AttnConfig(num_heads=4, num_kv_heads=2, window=4)),
    "shared": dict(layers="attn,ssm", num_layers=4, block_repeat=2, share_ffn=True),
}


def _model(layout: str) -> LM:
    return LM(dataclasses.replace(BASE, **LAYOUTS[layout])).eval()


def _prompts() -> list[list[int]]:
    return [torch.randint(3, 97, (n,)).tolist() for n in LENGTHS]


def _padded_batch(prompts):
    length = max(map(len, prompts))
    tokens = torch.tensor([[0] * (length - len(p)) + p for p in prompts])  # (B, T), pad id 0
    return tokens, torch.tensor([length - len(p) for p in prompts])


@torch.no_grad()
def _alone(model, prompt, extra) -> torch.Tensor:
    """Logits (1 + len(extra), V) of ``prompt`` decoded alone with a cache: its last position, then each new token."""
    cache = model.init_cache(1, len(prompt) + len(extra))
    out = [model(torch.tensor([prompt]), cache=cache)[0][0, -1]]
    out += [model(torch.tensor([[t]]), cache=cache)[0][0, -1] for t in extra]
    return torch.stack(out)


# A chunked prefill whose first chunk is one padding token in rows 0 and 1 (a query that sees only itself), and
# whose second chunk ends inside row 1's padding (7 slots).
@pytest.mark.parametrize("bounds", [[0, 12], [0, 1, 6, 12]], ids=["prefill", "chunked_prefill"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@torch.no_grad()
def test_padded_batch_equals_each_prompt_alone(layout, bounds):
    """Rows 0-2 decode 4 steps together, then row 1 leaves the batch and rows 0 and 2 decode 4 more."""
    model, prompts = _model(layout), _prompts()
    tokens, num_pad = _padded_batch(prompts)
    extra = torch.randint(3, 97, (3, 8))
    cache = model.init_cache(3, tokens.shape[1] + 8, num_pad=num_pad)
    for a, b in zip(bounds, bounds[1:]):
        logits = model(tokens[:, a:b], cache=cache, last_only=True)[0]
    steps = [logits[:, -1]]
    steps += [model(extra[:, i : i + 1], cache=cache)[0][:, -1] for i in range(4)]
    rows = torch.tensor([0, 2])
    for c in cache:
        c.keep(rows)
    steps += [model(extra[rows, i : i + 1], cache=cache)[0][:, -1] for i in range(4, 8)]
    for row, prompt in enumerate(prompts):
        want = _alone(model, prompt, extra[row].tolist())
        got = torch.stack([s[row] for s in steps[:5]] + ([s[row // 2] for s in steps[5:]] if row != 1 else []))
        torch.testing.assert_close(got, want[: len(got)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_batch_equals_reference(layout):
    model, prompts = _model(layout), _prompts()
    assert generate_batch(model, prompts, 10) == generate_batch_ref(model, prompts, 10)


@pytest.mark.parametrize("layout", ["attn", "mixed", "window"])
@torch.no_grad()
def test_no_padding_takes_the_unpadded_path(layout, monkeypatch):
    """num_pad of zeros is no padding: no mask is built and the logits are bit for bit those of a plain cache."""
    model = _model(layout)
    x = torch.randint(3, 97, (2, 9))
    plain, zeros = model.init_cache(2, 10), model.init_cache(2, 10, num_pad=torch.zeros(2, dtype=torch.long))
    want = [model(x, cache=plain)[0], model(x[:, :1], cache=plain)[0]]
    monkeypatch.setattr(attention, "padded_mask", None)  # calling it would fail
    got = [model(x, cache=zeros)[0], model(x[:, :1], cache=zeros)[0]]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_last_only_is_the_last_row_of_the_logits():
    model = _model("mixed")
    x = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        full, last = model(x)[0], model(x, last_only=True)[0]
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)


def test_padding_leaves_recurrent_state_as_unpadded():
    """After a padded prefill, the SSM state and conv window and the linear-attention state equal the unpadded ones."""
    model, prompt = _model("mixed"), torch.randint(3, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], dim=1)
    with torch.no_grad():
        alone, batch = model.init_cache(1, 11), model.init_cache(1, 11, num_pad=torch.tensor([5]))
        model(prompt, cache=alone)
        model(padded, cache=batch)
    # The recurrent caches of the ssm, linear and hymba layers (Hymba's is its .ssm half).
    pairs = [(getattr(a, "ssm", a), getattr(b, "ssm", b)) for a, b in zip(alone, batch)]
    pairs = [(a, b) for a, b in pairs if isinstance(a, RecurrentCache)]
    assert len(pairs) == 3
    for a, b in pairs:
        torch.testing.assert_close(b.state, a.state, rtol=0, atol=1e-5)
        if a.conv is not None:
            torch.testing.assert_close(b.conv, a.conv, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [0, 3], ids=["full", "window3"])
@pytest.mark.parametrize("t", [1, 4])
def test_padded_mask_equals_its_definition(t, window):
    """Query i (slot s-t+i) of row b may see key j: j causal and in the window, and j real; a padding query sees
    itself only (an empty softmax row would be NaN in SDPA's math kernel)."""
    num_pad, s = [0, 2, 6], 7
    valid = torch.arange(s)[None, :] >= torch.tensor(num_pad)[:, None]
    want = torch.zeros(3, 1, t, s, dtype=torch.bool)
    for b, i, j in itertools.product(range(3), range(t), range(s)):
        q = s - t + i
        if q < num_pad[b]:
            want[b, 0, i, j] = j == q
        else:
            want[b, 0, i, j] = num_pad[b] <= j <= q and not (window and j <= q - window)
    assert torch.equal(attention.padded_mask(valid, t, window), want)


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("t", [1, 5])
def test_padded_attention_matmul_equals_sdpa(heads, kv, t, monkeypatch):
    """The CPU matmul path for left-padded rows (per-row bias) gives SDPA's answer with the same mask."""
    num_pad, s = torch.tensor([0, 2, 6]), 9
    valid = torch.arange(s)[None, :] >= num_pad[:, None]
    mask = attention.padded_mask(valid, t, 0)
    q = torch.randn(3, heads, t, 8, dtype=torch.float64)
    k, v = (torch.randn(3, kv, s, 8, dtype=torch.float64) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv)
    torch.testing.assert_close(attention.attention_padded(q, k, v, mask), want, rtol=1e-10, atol=1e-10)
    monkeypatch.setattr(attention, "MATMUL_ATTN_MAX_KEYS", 0)  # past the limit: SDPA itself
    torch.testing.assert_close(attention.attention_padded(q, k, v, mask), want, rtol=0, atol=0)
