"""Run folders for the compression tests: a tiny untrained model (built, not trained: under a second) and another
with different weights."""

import pytest
import torch

from tests.conftest import make_run


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("compress"), "coder")


@pytest.fixture(scope="session")
def other_run(tmp_path_factory):
    """The same architecture and tokenizer as ``run``, other weights (a newer checkpoint)."""
    from slmforge.checkpoint import load_for_inference
    from slmforge.train.checkpoint import save_checkpoint

    root = make_run(tmp_path_factory.mktemp("compress_other"), "other")
    model = load_for_inference(root)[0]
    with torch.no_grad():
        model.tok_emb.weight.mul_(1.5)
    save_checkpoint(root / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()), {})
    return root


def sample_text() -> str:
    return ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
            "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass doors "
            "of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust from entering along "
            "with him. 1984: caf\u00e9, na\u00efve, \u00fcber, \u65e5\u672c\u8a9e, emoji \U0001f600 <|eos|> "
            "<|user|>\n\tTabs and\r\nnewlines.\n") * 3
