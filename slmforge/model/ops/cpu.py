"""CPU fast paths behind ``model/layers.py``: oneDNN float32 linear (with a pre-blocked weight for small
decoding batches), RMSNorm with a hand-written backward, and a block-by-block cross-entropy.

Each has a plain reference in ``layers.py`` (``F.linear``, ``rms_norm_ref``, ``cross_entropy_ref``) and a test
comparing them (``tests/model/test_speed_paths.py``). Which linear kernel a path uses is measured on the machine
(``ops/choice.py``); RMSNorm and the loss are always faster than their references. Shapes: I/O in/out
features, N rows, V vocabulary.
"""

from __future__ import annotations

import weakref

import torch

# Whether this torch has oneDNN's float32 linear: then it is a candidate in ``ops/choice.py`` (set False to keep
# every float32 matmul on torch's default BLAS).
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("slmforge::linear_onednn", mutates_args=())
def linear_onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with oneDNN's float32 GEMM. x: (..., I), weight: (O, I) -> (..., O).

    A custom op, so that torch.compile calls it as it is (inductor's own lowering of this oneDNN op
    assumes frozen weights).
    """
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@linear_onednn.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_onednn_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _linear_onednn_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_onednn(grad, weight.t())  # (..., O) @ (O, I)
    if ctx.needs_input_grad[1]:
        # (I, N) @ (N, O), transposed: oneDNN runs this orientation up to 2x faster than (O, N) @ (N, I).
        grad_weight = linear_onednn(x.flatten(0, -2).t(), grad.flatten(0, -2).t()).t()
    return grad_x, grad_weight


linear_onednn.register_autograd(_linear_onednn_backward, setup_context=_linear_onednn_setup)


# Small batches read every weight once per step, so their speed is how fast the weights stream from memory.
# Times of the 121 matmuls of a SmolLM2-135M-shaped decoding step on a 2-core Zen 4 (537 MB of weights):
#   rows                        1      2      4      8      16
#   oneDNN, weight as stored   17.5   20.0   20.2   22.8    -     (it re-blocks the weight on every call)
#   oneDNN, weight pre-blocked 15.0   15.0   14.6   16.6   18.4
#   ops/gemv.py (numba)        12.5   13.0   16.7   31.1    -
# Other CPUs order them otherwise: ``ops/choice.py`` measures them there.
# id(weight) -> (weak reference to it, its version, blocked copy); an entry leaves with its weight. (Not a
# WeakKeyDictionary: that compares keys with ==, which on tensors is elementwise.)
_PACKED: dict[int, tuple] = {}


def linear_onednn_packed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Without autograd, for a few rows: ``x @ weight.T`` with oneDNN on a blocked copy of the weight, made once
    per weight version (so it doubles the weights' memory while the model decodes small batches; an optimizer
    step makes a new one)."""
    if weight.is_contiguous():
        key = id(weight)
        hit = _PACKED.get(key)
        version = -1 if weight.is_inference() else weight._version  # inference tensors keep no version
        if hit is None or hit[0]() is not weight or hit[1] != version:
            ref = weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None))
            hit = _PACKED[key] = (ref, version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8))
        weight = hit[2]
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def linear_onednn_plain(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Without autograd: ``x @ weight.T`` with oneDNN, the weight as stored (many rows amortise its blocking)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


class RMSNormCPU(torch.autograd.Function):
    """RMSNorm with a hand-written backward: 3 passes forward, 6 backward.

    On CPU ``F.rms_norm`` is a chain of small ops (pow, mean, add, rsqrt, mul, mul) and autograd
    differentiates each; this is about 2x faster forward + backward (21 norms per step in the 10m preset).
    Computed in float32 at least, like ``rms_norm_ref``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, xf, rstd = rms_norm_cpu(x, weight, eps)
        ctx.save_for_backward(xf, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xf, weight, rstd = ctx.saved_tensors
        g = grad.to(xf.dtype)
        x_hat = xf * rstd
        grad_weight = torch.linalg.vecdot(g.flatten(0, -2), x_hat.flatten(0, -2), dim=0)  # sum over rows
        g_hat = g * weight
        # d/dx of x * rstd(x): rstd * (g_hat - x_hat * mean(g_hat * x_hat))
        dot = torch.linalg.vecdot(g_hat, x_hat, dim=-1).unsqueeze(-1).div_(xf.shape[-1])
        grad_x = torch.addcmul(g_hat, x_hat, dot, value=-1).mul_(rstd)
        return grad_x.to(grad.dtype), grad_weight.to(weight.dtype), None


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y, x in float32 at least, 1 / rms) for ``RMSNormCPU``'s forward and for inference."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    # vector_norm is one fused reduction; mean(x^2) = norm^2 / C
    rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return (xf * rstd * weight).to(x.dtype), xf, rstd


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean next-token loss over rows with a target, in float32, a block of rows at a time.

    The full (N, V) float32 copy of the logits, its log-softmax and their gradients are never materialised:
    each block is converted, reduced and differentiated while it is still in cache, and the gradient is written
    straight back in the logits' dtype. Forward keeps only the logits (already alive) for backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        n, vocab = logits.shape
        acc = torch.promote_types(logits.dtype, torch.float32)
        rows = max(1, 2**20 // vocab)  # a block of about 4 MiB in float32
        picked = targets.clamp(min=0)[:, None]  # (N, 1); ignored rows pick token 0 and are masked below
        nll = torch.empty(n, dtype=acc, device=logits.device)
        for i in range(0, n, rows):
            logp = torch.log_softmax(logits[i : i + rows], -1, dtype=acc)
            nll[i : i + rows] = -logp.gather(1, picked[i : i + rows]).squeeze(1)
        valid = targets != ignore_index
        count = valid.sum()
        ctx.save_for_backward(logits, picked, valid, count)
        ctx.rows = rows
        return (nll * valid).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, picked, valid, count = ctx.saved_tensors
        acc = torch.promote_types(logits.dtype, torch.float32)
        # d loss / d logits = (softmax - one_hot(target)) * grad / count, zero on ignored rows.
        scale = (valid * (grad_loss / count)).to(acc)[:, None]  # (N, 1)
        grad = torch.empty_like(logits)
        minus_one = torch.full((min(ctx.rows, logits.shape[0]), 1), -1.0, dtype=acc, device=logits.device)
        for i in range(0, logits.shape[0], ctx.rows):
            p = torch.softmax(logits[i : i + ctx.rows], -1, dtype=acc)
            p.scatter_add_(1, picked[i : i + ctx.rows], minus_one[: p.shape[0]])
            torch.mul(p, scale[i : i + ctx.rows], out=grad[i : i + ctx.rows])
        return grad, None, None
