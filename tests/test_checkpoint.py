"""The checkpoint format (slmforge/checkpoint.py): folder layout, rotation, tied heads, loading for inference."""

import dataclasses

import pytest
import torch

from slmforge.checkpoint import (latest_checkpoint, load_for_inference, load_weights, read_checkpoint,
                                 write_checkpoint)
from slmforge.model.lm import LM
from tests.eval.conftest import make_run


def _write(ckpt_dir, model, step, keep=2):
    return write_checkpoint(ckpt_dir, step, model.state_dict(), {"step": step}, keep,
                            tied=model.cfg.tie_embeddings)


def test_folders_pointer_and_rotation(tmp_path, tiny_model_cfg):
    model = LM(tiny_model_cfg)
    for step in (5, 10, 15):
        path = _write(tmp_path, model, step)
    assert path == tmp_path / "step_000015"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000010", "step_000015"]
    assert (tmp_path / "latest").read_text() == "step_000015\n"
    assert latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "state.pt"]
    _write(tmp_path, model, 20, keep=0)  # keep=0 removes nothing
    assert len(list(tmp_path.glob("step_*"))) == 3
    assert latest_checkpoint(tmp_path / "missing") is None


def test_tied_head_is_stored_once_and_restored(tmp_path, tiny_model_cfg):
    model = LM(tiny_model_cfg)
    assert model.cfg.tie_embeddings
    path = _write(tmp_path, model, 1)
    weights, state = read_checkpoint(path)
    assert "head.weight" not in weights and state == {"step": 1}
    weights, _ = read_checkpoint(path, tied=True)
    assert torch.equal(weights["head.weight"], model.tok_emb.weight)
    untied = LM(dataclasses.replace(tiny_model_cfg, tie_embeddings=False))
    weights, _ = read_checkpoint(_write(tmp_path / "untied", untied, 1))
    assert torch.equal(weights["head.weight"], untied.head.weight)


def test_weights_that_do_not_match_are_one_line_errors(tmp_path, tiny_model_cfg):
    path = _write(tmp_path, LM(tiny_model_cfg), 1)
    other = LM(dataclasses.replace(tiny_model_cfg, num_layers=3))
    with pytest.raises(ValueError, match=r"model.safetensors: weights do not match the model \(missing \['blocks.2"):
        load_weights(other, path / "model.safetensors")


def test_load_for_inference_from_a_run_or_a_checkpoint_folder(tmp_path):
    run_dir = make_run(tmp_path, "run")
    model, tok, cfg = load_for_inference(run_dir)
    assert not model.training and cfg.name == "run" and tok.vocab_size <= cfg.model.vocab_size
    same, _, _ = load_for_inference(latest_checkpoint(run_dir / "checkpoints"))
    for (name, a), b in zip(model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), name
    torch.manual_seed(1)
    assert not torch.equal(LM(cfg.model).tok_emb.weight, model.tok_emb.weight)  # loaded, not a fresh init


def test_load_for_inference_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match=r"no checkpoint found \(expected .*checkpoints/latest\)"):
        load_for_inference(tmp_path)
    run_dir = make_run(tmp_path, "run")
    (run_dir / "config.yaml").unlink()
    with pytest.raises(ValueError, match=f"{run_dir}: no config.yaml"):
        load_for_inference(run_dir)
