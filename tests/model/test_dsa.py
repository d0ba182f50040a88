"""DeepSeek sparse attention (``model/dsa.py``): the chunked form equals the dense-score reference (float64, outputs,
KL and gradients), top-k with k >= T is dense causal attention, no query ever selects a later key, cached and
left-padded decoding equal the forward pass, the KL warm-up teaches the indexer the attention's top keys, and the
LM adds the indexer's KL to its training loss only.
"""

import dataclasses

import pytest
import torch

from slmforge.config import AttnConfig, DSAConfig, ModelConfig
from slmforge.model.attention import attention_ref, causal_mask
from slmforge.model import dsa as dsa_module
from slmforge.model.dsa import DSA, NOT_ALLOWED, indexer_recall, select_block
from slmforge.model.lm import LM
from slmforge.serve.hf import _check_exportable

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=1, max_seq_len=64, layers="dsa",
                  attn=AttnConfig(num_heads=4, num_kv_heads=2), dsa=DSAConfig(index_heads=2, index_dim=8, top_k=5))


def _layer(mode="sparse", top_k=5, block=4, std=0.3, seed=0) -> DSA:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(CFG, dsa=dataclasses.replace(CFG.dsa, mode=mode, top_k=top_k, block=block))
    layer = DSA(cfg).double()
    layer.reset_parameters(std, std)
    return layer


def _run(layer: DSA, x: torch.Tensor, reference: bool):
    """Output, KL and the gradients of (output . r + KL) over the input and every parameter."""
    layer.reference = reference
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    kl = layer.aux_loss
    ((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + kl).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), kl.detach(), x.grad, grads


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("t", [1, 13])
@pytest.mark.parametrize("select_keys", [4, 2048])  # the selection's running top-k over 4 key chunks, or over one
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_chunked_equals_reference(mode, t, select_keys, tau, monkeypatch):
    monkeypatch.setattr(dsa_module, "SELECT_KEYS", select_keys)
    layer = _layer(mode).train()
    layer.tau = tau
    x = torch.randn(2, t, CFG.d_model, dtype=torch.float64)
    y, kl, gx, grads = _run(layer, x, reference=False)
    y_ref, kl_ref, gx_ref, grads_ref = _run(layer, x, reference=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(kl, kl_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-10)
    assert grads.keys() == grads_ref.keys() and any(n.startswith("indexer.") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=1e-10, msg=name)
    if t > 1:
        assert kl > 0


def test_the_kl_trains_only_the_indexer_and_the_output_never_reaches_it():
    layer = _layer().train()
    y = layer(torch.randn(1, 13, CFG.d_model, dtype=torch.float64))
    y.sum().backward()
    assert all(p.grad is None for p in layer.indexer.parameters())
    layer.zero_grad(set_to_none=True)
    layer(torch.randn(1, 13, CFG.d_model, dtype=torch.float64))
    layer.aux_loss.backward()
    assert all(p.grad is None for p in layer.attn.parameters())
    assert all(p.grad is not None for p in layer.indexer.parameters())


def test_top_k_of_all_keys_is_dense_causal_attention():
    x = torch.randn(2, 11, CFG.d_model, dtype=torch.float64)
    sparse, dense = _layer(top_k=11).eval(), _layer("dense").eval()
    with torch.no_grad():
        q, k, v, *_ = dense.project(x)
        want = attention_ref(q, k, v, causal_mask(11, 11, 0, x.device)).transpose(1, 2).reshape(2, 11, -1)
        want = want @ dense.attn.wo.weight.T
        torch.testing.assert_close(sparse(x), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(dense(x), want, rtol=0, atol=1e-12)
        assert not torch.allclose(_layer(top_k=3).eval()(x), want, atol=1e-3)  # fewer keys do change it


def test_no_future_key_is_ever_selected():
    torch.manual_seed(1)
    b, t, s, k = 2, 9, 20, 6
    iq, iw, ik = torch.randn(b, t, 3, 8), torch.randn(b, t, 3), torch.randn(b, s, 8)
    iw[:, :, 0] = 50.0  # a large score on late keys is tempting
    q_slots = torch.arange(s - t, s)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :7] = False  # row 1: seven slots of left padding
    keys = select_block(iq, iw, ik, q_slots, valid, k, block=3)
    idx, chosen = keys & 0xFFFFFFFF, keys != NOT_ALLOWED
    assert (idx[chosen] <= q_slots[None, :, None].expand_as(idx)[chosen]).all()
    assert not chosen[1][(idx[1] < 7) & chosen[1]].any()  # never a padding slot
    per_query = chosen.sum(-1)
    assert (per_query[0] == torch.clamp(q_slots + 1, max=k)).all()
    assert (per_query[1] == torch.clamp(q_slots - 7 + 1, max=k)).all()
    assert all(len(set(row.tolist())) == len(row) for row in idx.view(-1, k))  # no key twice


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_decode_with_cache_equals_forward(mode):
    layer = _layer(mode, top_k=4).eval()
    x = torch.randn(2, 19, CFG.d_model, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(2, 19, x.device, x.dtype)
        steps = [layer(x[:, :7], cache=cache)] + [layer(x[:, i : i + 1], cache=cache) for i in range(7, 19)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)
    assert cache.pos == 19 and cache.index_k.shape == (2, 19, CFG.dsa.index_dim)
    assert cache.nbytes() == 2 * DSA.state_bytes(CFG, 19, 8)


@torch.no_grad()
def test_left_padded_batch_decodes_each_prompt_as_alone():
    torch.manual_seed(0)
    model = LM(dataclasses.replace(CFG, num_layers=2, dsa=dataclasses.replace(CFG.dsa, top_k=3))).double().eval()
    prompts = [torch.randint(3, 97, (n,)).tolist() for n in (2, 6, 11)]
    length = max(map(len, prompts))
    tokens = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    cache = model.init_cache(3, length + 4, num_pad=torch.tensor([length - len(p) for p in prompts]))
    extra = torch.randint(3, 97, (3, 4))
    steps = [model(tokens, cache=cache)[0][:, -1]] + [model(extra[:, i : i + 1], cache=cache)[0][:, -1]
                                                      for i in range(4)]
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt + extra[row].tolist()]))[0][0, len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack([s[row] for s in steps]), alone, rtol=0, atol=1e-10)


def test_kl_warmup_teaches_the_indexer_the_attention_top_keys():
    """Dense mode, main attention frozen: the indexer alone trains on the KL. Inputs are one vector per sequence plus
    noise, so the attention's pattern is mostly a function of relative position, as much of a text LM's is (on
    i.i.d. Gaussian inputs a random attention is a rank-8 bilinear form a tiny indexer does not learn in 60 steps).
    The KL falls and the recall of the attention's top-4 keys on held-out sequences rises above chance (~0.32)."""
    layer = _layer("dense", std=0.3, block=8).train()

    def batch(b):
        return torch.randn(b, 1, CFG.d_model, dtype=torch.float64) + 0.3 * torch.randn(b, 24, CFG.d_model,
                                                                                       dtype=torch.float64)

    held_out = batch(4)
    opt = torch.optim.Adam(layer.indexer.parameters(), lr=2e-2)
    recall_before, losses = indexer_recall(layer, held_out, 4), []
    mass_before = indexer_recall(layer, held_out, 4, mass=True)
    for _ in range(60):
        layer(batch(8))
        opt.zero_grad()
        layer.aux_loss.backward()
        opt.step()
        losses.append(layer.aux_loss.item())
    recall_after = indexer_recall(layer, held_out, 4)
    assert sum(losses[-10:]) < 0.6 * sum(losses[:10])
    assert recall_after > recall_before + 0.05, (recall_before, recall_after)
    # by attention mass: at most 1 (no k keys hold more than the attention's own top k), and it rises too
    mass_after = indexer_recall(layer, held_out, 4, mass=True)
    assert mass_before < mass_after <= 1 + 1e-12, (mass_before, mass_after)


def test_lm_adds_the_indexer_kl_in_training_mode_only():
    torch.manual_seed(0)
    model = LM(dataclasses.replace(CFG, num_layers=2))
    tokens = torch.randint(0, 97, (2, 16))
    model.train()
    _, with_kl = model(tokens, tokens)
    aux = sum(b.mixer.aux_loss for b in model.layers())
    model.eval()
    _, plain = model(tokens, tokens)
    assert aux > 0
    torch.testing.assert_close(with_kl, plain + aux)
    assert all(b.mixer.aux_loss == 0.0 for b in model.layers())


def test_hf_export_refuses_dsa_with_one_line():
    with pytest.raises(ValueError, match="dsa") as err:
        _check_exportable(CFG)
    assert "\n" not in str(err.value)


def test_odd_index_dim_is_a_config_error():
    with pytest.raises(ValueError, match="model.dsa.index_dim=7"):
        dataclasses.replace(CFG, dsa=DSAConfig(index_dim=7)).validate()


def test_dense_steps_with_dense_mode_is_a_config_error():
    with pytest.raises(ValueError, match="model.dsa.dense_steps=10: .*dsa.mode=dense"):
        dataclasses.replace(CFG, dsa=DSAConfig(mode="dense", dense_steps=10)).validate()
    dataclasses.replace(CFG, dsa=DSAConfig(mode="sparse", dense_steps=10)).validate()


def test_one_block_of_keys_takes_the_masked_form_and_equals_the_chunked_one():
    """Up to ``block`` keys the layer uses the masked (T, S) form; its output, KL and gradients equal the chunked
    form's on the same inputs (a block of 16 forces the masked form, a block of 4 the chunked one)."""
    x = torch.randn(2, 13, CFG.d_model, dtype=torch.float64)
    results = []
    for block in (16, 4):
        layer = _layer("sparse", block=block).train()
        results.append(_run(layer, x, reference=False))
    (y, kl, gx, grads), (y4, kl4, gx4, grads4) = results
    torch.testing.assert_close(y, y4, rtol=0, atol=1e-10)
    torch.testing.assert_close(kl, kl4, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx, gx4, rtol=0, atol=1e-10)
    for name in grads:
        torch.testing.assert_close(grads[name], grads4[name], rtol=0, atol=1e-10, msg=name)


def test_kl_temperature_flattens_the_target_and_keeps_its_ranking():
    """With tau, the KL is zero exactly for logits log(p) / tau (+ a constant per query): indexer scores that rank
    the keys as the attention does, on a flatter scale; the plain KL of those same logits is not zero."""
    torch.manual_seed(0)
    mask = torch.ones(3, 5, 7, dtype=torch.bool).tril(2)
    p = torch.rand(3, 5, 7, dtype=torch.float64).masked_fill(~mask, 0.0)
    p = p / p.sum(-1, keepdim=True)
    logits = torch.where(mask, p.log() / 4.0 + 3.0, torch.tensor(-7.0, dtype=torch.float64))
    assert dsa_module.kl_sum(p, logits, mask, 4.0).abs() < 1e-12
    assert dsa_module.kl_sum(p, logits, mask, 1.0) > 0.1
