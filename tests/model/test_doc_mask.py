"""Packed documents (``LM.forward(doc=...)``): each document's logits are those it gets when run alone."""

import pytest
import torch

from slmforge.config import ModelConfig
from slmforge.model.attention import document_positions
from slmforge.model.lm import LM


def _model(**kw) -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, max_seq_len=64, **kw)
    cfg.attn.num_heads, cfg.attn.num_kv_heads = 4, 2
    return LM(cfg).double().eval()


def test_document_positions_restart_at_each_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, 1]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(document_positions(doc), want)


@pytest.mark.parametrize("window", [0, 3])
def test_packed_documents_equal_each_run_alone(window):
    model = _model()
    for block in model.blocks:
        block.mixer.window = window
    g = torch.Generator().manual_seed(1)
    lengths = [[5, 7, 4], [9, 6, 1]]
    docs = [[torch.randint(0, 50, (n,), generator=g) for n in row] for row in lengths]
    tokens = torch.stack([torch.cat(row) for row in docs])
    doc = torch.stack([torch.cat([torch.full((n,), j) for j, n in enumerate(row)]) for row in lengths])
    packed, _ = model(tokens, doc=doc)
    unpacked, _ = model(tokens)
    for r, row in enumerate(docs):
        start = 0
        for d in row:
            alone, _ = model(d[None])
            torch.testing.assert_close(packed[r, start : start + len(d)], alone[0], rtol=0, atol=1e-10)
            start += len(d)
    # The first document of a row sees the same context either way; later ones differ without the mask.
    assert torch.allclose(packed[0, :5], unpacked[0, :5], atol=1e-10)
    assert not torch.allclose(packed[0, 5:12], unpacked[0, 5:12], atol=1e-4)


def test_packed_loss_equals_the_documents_run_one_by_one():
    model = _model()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 50, (6,), generator=g), torch.randint(0, 50, (8,), generator=g)
    ya, yb = torch.randint(0, 50, (6,), generator=g), torch.randint(0, 50, (8,), generator=g)
    ya[:2] = -100  # a masked prompt
    yb[-1] = -100
    tokens, targets = torch.cat([a, b])[None], torch.cat([ya, yb])[None]
    doc = torch.tensor([[0] * 6 + [1] * 8])
    _, packed = model(tokens, targets=targets, doc=doc)
    _, la = model(a[None], targets=ya[None])
    _, lb = model(b[None], targets=yb[None])
    n_a, n_b = (ya != -100).sum(), (yb != -100).sum()
    torch.testing.assert_close(packed, (la * n_a + lb * n_b) / (n_a + n_b), rtol=0, atol=1e-10)


def test_doc_refused_for_recurrent_mixers():
    model = _model(layers="attn,ssm")
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="packing=false"):
        model(tokens, doc=torch.zeros_like(tokens))
