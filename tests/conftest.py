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


def tiny_run_config(out_dir, name="run", **train):
    """A RunConfig small enough that a whole pipeline run takes a few seconds."""
    from slmforge.config import load_config

    overrides = [
        f"out_dir={out_dir}", f"name={name}", "model.vocab_size=320", "model.d_model=32", "model.num_layers=2",
        "model.attn.num_heads=4", "model.attn.num_kv_heads=2", "model.max_seq_len=64",
        "data.num_train_docs=400", "data.num_val_docs=40", "data.num_test_docs=40", "data.seq_len=32",
        "data.num_workers=1", "train.batch_size=4", "train.max_steps=8", "train.warmup_steps=2",
        "train.eval_every=4", "train.ckpt_every=4", "train.eval_batches=2", "train.lr_peak=1e-2",
        "sample_tokens=8",
    ] + [f"train.{k}={v}" for k, v in train.items()]
    return load_config(None, overrides)


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory):
    """Tokenizer + token shards of a small procedural corpus, built once per test session."""
    from slmforge.pipeline import prepare

    cfg = tiny_run_config(tmp_path_factory.mktemp("corpus"), name="corpus")
    prepare(cfg)
    return cfg.run_dir


def assert_count_params_exact(layers: str, tie: bool) -> None:
    """plan.count_params equals the parameters of the LM built on the meta device."""
    import dataclasses

    from slmforge.config import preset
    from slmforge.model.lm import LM
    from slmforge.plan import count_params

    cfg = dataclasses.replace(preset("tiny"), layers=layers, tie_embeddings=tie)
    with torch.device("meta"):
        model = LM(cfg)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def assert_tiny_lm_learns(model) -> None:
    """30 AdamW steps on one batch: every parameter gets a gradient and the loss drops below 0.5."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 97, (2, 16))
    losses = []
    for step in range(30):
        _, loss = model(x[:, :-1], targets=x[:, 1:])
        opt.zero_grad()
        loss.backward()
        if step == 0:  # every parameter gets a gradient, the mixer's scalars included
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 < 4 < losses[0]


def forward_and_decode(model, x: torch.Tensor, prefill: int):
    """(logits of one forward pass over x, the same from a ``prefill``-token prefill then one token at a time,
    the caches) for comparing the cached path with the full one."""
    with torch.no_grad():
        full, _ = model(x)
        cache = model.init_cache(x.shape[0], x.shape[1])
        outs = [model(x[:, :prefill], cache=cache)[0]]
        outs += [model(x[:, i : i + 1], cache=cache)[0] for i in range(prefill, x.shape[1])]
    return full, torch.cat(outs, 1), cache
