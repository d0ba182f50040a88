"""A tiny run folder shared by the eval tests, built without training (under a second)."""

from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, tiny_run_config

GSM8K = SHARED_DATA / "gsm8k"


def make_run(root: Path, name: str = "run") -> Path:
    """config.yaml, data/{train,test}.jsonl, tokenizer.json and a checkpoint of an untrained tiny model."""
    import torch

    from slmforge.curate.documents import write_jsonl
    from slmforge.synth.procedural import build_corpus
    from slmforge.tokens.tokenizer import train_tokenizer
    from slmforge.model.lm import LM
    from slmforge.runs import save_config
    from slmforge.train.checkpoint import save_checkpoint

    cfg = tiny_run_config(root, name=name)
    corpus = build_corpus(cfg.data.families, 200, 0, 20, seed=1)
    for split in ("train", "test"):
        write_jsonl(cfg.run_dir / "data" / f"{split}.jsonl", corpus[split])
    train_tokenizer((d.text for d in corpus["train"]), cfg.model.vocab_size, cfg.run_dir / "tokenizer.json")
    torch.manual_seed(0)
    model = LM(cfg.model)
    save_checkpoint(cfg.run_dir / "checkpoints", 0, model, torch.optim.AdamW(model.parameters()), {})
    save_config(cfg.run_dir, cfg)
    return cfg.run_dir


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("eval"), "eval")


@pytest.fixture(scope="session")
def loaded(eval_run):
    from slmforge.checkpoint import load_for_inference

    return load_for_inference(eval_run)[:2]
