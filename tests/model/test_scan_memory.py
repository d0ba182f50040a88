"""Recompute in the recurrent mixers (issue 17): training on a long sequence keeps only block-boundary states and
recomputes inside each block in backward. Checked: the checkpointed scans against the for-loop references (values
and every gradient, float64), whole models with and without recompute, when the automatic switch turns it on, and
that the tensors autograd keeps really shrink.

(The chunked scans without recompute: ``test_ssm.py``, ``test_linear.py``; decoding: ``test_mixers_decode.py``.)
"""

import dataclasses

import pytest
import torch

from slmforge.config import LinearConfig, SSMConfig
from slmforge.model.lm import LM
from slmforge.model.ops import gla_chunked, gla_ref, scan, ssd_chunked, ssd_ref
from tests.model import test_linear, test_ssm


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 tokens, so that short test sequences span several."""
    monkeypatch.setattr(scan, "RECOMPUTE_BLOCK", 16)
    monkeypatch.setattr(scan, "RECOMPUTE_MIN_TOKENS", 0)


@pytest.mark.parametrize("initial", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("chunk", [5, 8], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("t", [17, 63], ids=lambda t: f"T{t}")
def test_ssd_recompute_matches_ref(small_blocks, t, chunk, initial):
    inputs = test_ssm._scan_inputs(t, initial)
    got = test_ssm._outputs_and_grads(lambda *a: ssd_chunked(*a[:5], chunk, a[5], recompute=True), inputs, initial)
    want = test_ssm._outputs_and_grads(ssd_ref, inputs, initial)
    for name, g, w in zip(test_ssm.NAMES, got, want):
        assert g.shape == w.shape and test_ssm.rel_diff(g, w) <= test_ssm.RTOL, name


@pytest.mark.parametrize("initial", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("chunk", [5, 8, 24], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("t", [17, 63], ids=lambda t: f"T{t}")
def test_gla_recompute_matches_ref(small_blocks, t, chunk, initial):
    inputs = test_linear._scan_inputs(t, initial)
    scan_fn = lambda q, k, v, g, s: gla_chunked(q, k, v, g, chunk, initial_state=s, recompute=True)  # noqa: E731
    got = test_linear._outputs_and_grads(scan_fn, inputs, initial)
    want = test_linear._outputs_and_grads(lambda q, k, v, g, s: gla_ref(q, k, v, g, initial_state=s), inputs, initial)
    for name, g, w in zip(test_linear.NAMES, got, want):
        assert g.shape == w.shape and test_linear.rel_diff(g, w) <= test_linear.RTOL, name


def test_auto_switch():
    short = max(scan.RECOMPUTE_BLOCK, scan.RECOMPUTE_MIN_TOKENS)
    long = short + 1
    x = torch.zeros(1, long, requires_grad=True)
    assert scan.use_recompute(None, long, x)
    assert not scan.use_recompute(None, short, x)  # short: the faster path
    assert not scan.use_recompute(None, long, x.detach())  # no gradient wanted
    with torch.no_grad():  # prefill, evaluation
        assert not scan.use_recompute(None, long, x)
    assert not scan.use_recompute(False, long, x) and scan.use_recompute(True, short, x.detach())  # forced
    meta = torch.zeros(1, long, device="meta", requires_grad=True)
    assert not scan.use_recompute(None, long, meta)  # auto is CPU only; CUDA keeps its path


def _lm(cfg, layers: str) -> LM:
    cfg = dataclasses.replace(cfg, layers=layers, max_seq_len=128, ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=8),
                              linear=LinearConfig(num_heads=2, chunk_size=8))
    torch.manual_seed(0)
    return LM(cfg)


def _loss_and_grads(model: LM, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    _, loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("layers", ["ssm", "linear", "hymba", "attn,ssm,linear"])
def test_models_with_and_without_recompute_agree(tiny_model_cfg, monkeypatch, layers):
    monkeypatch.setattr(scan, "RECOMPUTE_MIN_TOKENS", 0)
    model = _lm(tiny_model_cfg, layers).double()
    tokens = torch.randint(0, tiny_model_cfg.vocab_size, (2, 101))  # 100 tokens: 7 blocks, the last one short
    monkeypatch.setattr(scan, "RECOMPUTE_BLOCK", 10**9)
    loss, grads = _loss_and_grads(model, tokens)
    monkeypatch.setattr(scan, "RECOMPUTE_BLOCK", 16)
    loss_rc, grads_rc = _loss_and_grads(model, tokens)
    assert torch.allclose(loss, loss_rc, rtol=1e-12, atol=0)
    for (name, _), g, g_rc in zip(model.named_parameters(), grads, grads_rc):
        assert torch.allclose(g, g_rc, rtol=1e-9, atol=1e-14), name


def _saved_bytes(model: LM, tokens: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after the forward (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens[:, :-1], targets=tokens[:, 1:])
    return sum(storages.values())


@pytest.mark.parametrize("layers", ["ssm", "linear"])
def test_recompute_keeps_less_for_backward(tiny_model_cfg, monkeypatch, layers):
    monkeypatch.setattr(scan, "RECOMPUTE_MIN_TOKENS", 0)
    tokens = torch.randint(0, tiny_model_cfg.vocab_size, (1, 513))
    model = _lm(tiny_model_cfg, layers)
    monkeypatch.setattr(scan, "RECOMPUTE_BLOCK", 10**9)
    kept, kept_attn = _saved_bytes(model, tokens), _saved_bytes(_lm(tiny_model_cfg, "attn"), tokens)
    monkeypatch.setattr(scan, "RECOMPUTE_BLOCK", 64)
    kept_rc = _saved_bytes(model, tokens)
    # With recompute, only the mixer's input per layer (and the block-boundary states) is left of it; the rest
    # (embeddings, norms, FFN, logits) is the same in both, and less than attention keeps.
    assert kept_rc < 0.6 * kept and kept_rc < kept_attn
