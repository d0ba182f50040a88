"""Each CPU fast path of the model against its plain reference: outputs and gradients."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from slmforge.model import attention
from slmforge.model.ops import cpu
from slmforge.model.attention import Attention, attention_matmul, attention_ref, causal_mask
from slmforge.model.layers import (RMSNorm, apply_rope, apply_rope_ref, cross_entropy, cross_entropy_ref, linear,
                                   rms_norm_ref, rope_tables)
from slmforge.model.lm import LM


def _grads(fn, *tensors):
    """fn's output and the gradients of all ``tensors`` under a fixed random upstream gradient."""
    out = fn(*tensors)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", [0, 5], ids=["full", "window5"])
@pytest.mark.parametrize("t,s", [(1, 1), (7, 7), (33, 33), (1, 19), (6, 19), (23, 30)], ids=lambda v: str(v))
@pytest.mark.parametrize("block", [4, 128])
def test_attention_matmul_matches_reference(heads, kv, window, t, s, block):
    q = torch.randn(2, heads, t, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv, s, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = causal_mask(t, s, window, "cpu")
    out, grads = _grads(lambda *a: attention_matmul(*a, window, block), q, k, v)
    ref, ref_grads = _grads(lambda *a: attention_ref(*a, mask), q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [0, 6], ids=["full", "sliding"])
def test_attention_module_matmul_path_equals_sdpa_path(tiny_model_cfg, window, monkeypatch):
    cfg = dataclasses.replace(tiny_model_cfg, attn=dataclasses.replace(tiny_model_cfg.attn, window=window))
    attn = Attention(cfg).double()
    x = torch.randn(2, 13, cfg.d_model, dtype=torch.float64, requires_grad=True)
    fast, fast_grads = _grads(lambda x, *_: attn(x), x, attn.wqkv.weight, attn.wo.weight)
    monkeypatch.setattr(attention, "MATMUL_ATTN_MAX_KEYS", 0)  # SDPA only
    ref, ref_grads = _grads(lambda x, *_: attn(x), x, attn.wqkv.weight, attn.wo.weight)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 16), (3, 7, 16)], ids=["2d", "3d"])
def test_rmsnorm_cpu_backward_matches_reference(shape):
    norm = RMSNorm(16, eps=1e-6).double()
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out, grads = _grads(lambda x, w: norm(x), x, norm.weight)
    ref, ref_grads = _grads(lambda x, w: rms_norm_ref(x, w, 1e-6), x, norm.weight)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_rmsnorm_keeps_input_dtype_and_computes_in_float32():
    norm = RMSNorm(16)
    x = torch.randn(4, 16).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rms_norm_ref(x, norm.weight, 1e-5), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rmsnorm_and_linear_inference_paths_match_references(dtype):
    # Without grad, RMSNorm skips its autograd.Function and linear calls oneDNN directly.
    norm, w = RMSNorm(24, eps=1e-6), torch.randn(40, 24, dtype=dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 24, dtype=dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), rms_norm_ref(x, norm.weight, 1e-6), rtol=tol, atol=tol)
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(24,), (1, 24), (2, 24), (3, 24), (2, 2, 24), (5, 24), (16, 24), (17, 24)],
                         ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_small_linear_matches_f_linear(shape, transposed):
    from slmforge.model.ops import gemv

    x = torch.randn(*shape)
    if transposed and x.dim() > 1:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    w = torch.randn(1000, 24)  # more output rows than threads, not a multiple of anything
    assert gemv.usable(x, w) == (x.numel() <= gemv.MAX_ROWS * 24)
    ref = F.linear(x, w)
    if gemv.usable(x, w):
        torch.testing.assert_close(gemv.small_linear(x, w), ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # linear() takes this path for a decoding step's few rows
        torch.testing.assert_close(linear(x, w), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu.ONEDNN_LINEAR, reason="torch built without oneDNN")
def test_prepacked_weights_follow_in_place_updates(kernels):
    # Decoding rows on oneDNN use a blocked copy of the weight; an optimizer step (in place) must make a new one.
    kernels("decode=onednn")
    w = torch.nn.Parameter(torch.randn(300, 24))
    x = torch.randn(5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        w.mul_(-2.0)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    key = id(w)
    assert key in cpu._PACKED
    del w
    assert key not in cpu._PACKED  # the blocked copy leaves with its weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rope_matches_reference(dtype):
    cos, sin = rope_tables(8, 11, 10000.0)
    x = torch.randn(2, 11, 3, 8, dtype=dtype, requires_grad=True)
    out, (grad,) = _grads(lambda x: apply_rope(x, cos[:, None], sin[:, None]), x)
    ref, (ref_grad,) = _grads(lambda x: apply_rope_ref(x, cos[:, None], sin[:, None]), x)
    tol = 1e-12 if dtype == torch.float64 else 0.0  # float32 and bf16 round to the very same numbers
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)


def test_rope_on_time_major_layout_equals_head_major():
    cos, sin = rope_tables(8, 11, 10000.0)
    x = torch.randn(2, 11, 3, 8, dtype=torch.float64)  # (B, T, H, D)
    time_major = apply_rope(x, cos[:, None], sin[:, None])
    head_major = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(time_major, head_major, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_chunked_cross_entropy_matches_reference(dtype):
    # 50_000 classes make blocks of 20 rows: 45 rows = two full blocks and a partial one.
    logits = (torch.randn(45, 50_000) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50_000, (45,))
    targets[::4] = -100
    loss, (grad,) = _grads(lambda z: cross_entropy(z, targets), logits)
    ref, (ref_grad,) = _grads(lambda z: cross_entropy_ref(z, targets), logits)
    assert loss.dtype == ref.dtype and grad.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}[dtype]
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    # bf16 gradients are rounded once from the same float32 values: at most one bf16 ulp apart.
    torch.testing.assert_close(grad, ref_grad, rtol=tol if dtype != torch.bfloat16 else 1e-2, atol=tol)
    assert grad[::4].abs().max() == 0


def test_cross_entropy_all_ignored_is_nan_like_reference():
    logits = torch.randn(3, 10, requires_grad=True)
    targets = torch.full((3,), -100)
    assert cross_entropy(logits, targets).isnan() and cross_entropy_ref(logits, targets).isnan()


@pytest.mark.skipif(not cpu.ONEDNN_LINEAR, reason="torch built without oneDNN")
@pytest.mark.parametrize("shape", [(5, 24), (2, 7, 24)], ids=["2d", "3d"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_onednn_linear_matches_f_linear(shape, transposed, kernels):
    kernels("train=onednn")
    x = torch.randn(*shape)
    if transposed:  # a non-contiguous input, as after a transpose
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    x.requires_grad_()
    w = torch.randn(40, 24, requires_grad=True)
    out, grads = _grads(linear, x, w)
    ref, ref_grads = _grads(F.linear, x, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not cpu.ONEDNN_LINEAR, reason="torch built without oneDNN")
def test_onednn_linear_compiles(kernels):
    kernels("train=onednn")
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    fn = torch.compile(lambda a, b: linear(torch.relu(a), b).square().sum(), fullgraph=True)
    out, grads = _grads(fn, x, w)
    ref, ref_grads = _grads(lambda a, b: F.linear(torch.relu(a), b).square().sum(), x, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", ["onednn,decode=gemv", "auto"], ids=["onednn", "measured"])
def test_lm_fast_paths_equal_references(tiny_model_cfg, monkeypatch, kernels, fast):
    """The whole model in float32: every fast path on (forced or as measured here), then every reference."""
    kernels(fast if cpu.ONEDNN_LINEAR else "auto")
    model = LM(tiny_model_cfg)
    x = torch.randint(0, 97, (3, 21))
    targets = torch.roll(x, -1, 1)
    targets[:, -1] = -100
    params = list(model.parameters())

    def run():
        _, loss = model(x, targets=targets)
        grads = torch.autograd.grad(loss, params)
        return loss, grads

    fast_loss, fast_grads = run()
    with torch.inference_mode():  # 63 rows (prefill), 3 rows (decode)
        fast_logits = [model(x)[0], model(x, last_only=True)[0]]
    kernels("torch")
    monkeypatch.setattr(attention, "MATMUL_ATTN_MAX_KEYS", 0)
    monkeypatch.setattr("slmforge.model.lm.cross_entropy", cross_entropy_ref)
    ref_loss, ref_grads = run()
    with torch.inference_mode():
        for fast, ref in zip(fast_logits, [model(x)[0], model(x, last_only=True)[0]]):
            torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
