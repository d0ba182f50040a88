"""Shared fixtures: tiny configs that make a test take about a second on 2 cores."""

from pathlib import Path

import pytest
import torch

from slmforge.config import ModelConfig, AttnConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=32, num_layers=2, max_seq_len=64,
                       attn=AttnConfig(num_heads=4, num_kv_heads=2))
