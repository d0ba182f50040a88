import math

import pytest
import torch

from slmforge.metrics import batch_losses, bits_per_byte, evaluate_loss, tokens_per_step
from slmforge.model.lm import LM
from tests.conftest import tiny_run_config


def test_evaluate_loss_is_the_mean_batch_loss_and_restores_the_mode(tiny_model_cfg):
    model = LM(tiny_model_cfg)
    batches = [(torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))) for _ in range(3)]
    losses = batch_losses(model, batches)
    assert model.training  # put back in training mode
    with torch.no_grad():
        model.eval()
        assert losses == [model(x, targets=y)[1].item() for x, y in batches]
    assert not model.training  # an eval-mode model stays in eval mode
    assert evaluate_loss(model, batches) == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert evaluate_loss(model, []) == 0.0


def test_bits_per_byte_and_tokens_per_step(tmp_path):
    assert bits_per_byte(math.log(2), 0.25) == pytest.approx(0.25)
    cfg = tiny_run_config(tmp_path, grad_accum=3)
    assert tokens_per_step(cfg, world_size=2) == 4 * 3 * 32 * 2
