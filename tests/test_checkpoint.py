"""The checkpoint format (slmforge/checkpoint.py): folder layout, manifest and its checks, numeric rotation, the
pickle-free state, format-1 (state.pt) checkpoints, tied heads, loading for inference."""

import dataclasses
import hashlib
import json
import random

import numpy as np
import pytest
import torch

from slmforge.checkpoint import (checkpoint_folders, latest_checkpoint, load_for_inference, load_weights,
                                 newest_valid_checkpoint, read_checkpoint, read_state, save_weights, verify_checkpoint,
                                 write_checkpoint)
from slmforge.model.lm import LM
from tests.conftest import make_run


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
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "state.json",
                                                      "state.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 2 and manifest["step"] == 15
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
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
    with pytest.raises(ValueError, match=r"no checkpoint found \(expected .*checkpoints/step_NNNNNN/\)"):
        load_for_inference(tmp_path)
    run_dir = make_run(tmp_path, "run")
    (run_dir / "config.yaml").unlink()
    with pytest.raises(ValueError, match=f"{run_dir}: no config.yaml"):
        load_for_inference(run_dir)


def test_steps_are_ordered_by_number_past_a_million(tmp_path, tiny_model_cfg):
    model = LM(tiny_model_cfg)
    for step in (999_800, 999_900, 1_000_000):
        newest = _write(tmp_path, model, step)
    assert newest.name == "step_1000000"
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step_999900", "step_1000000"]  # the new one kept
    assert latest_checkpoint(tmp_path) == newest
    (tmp_path / "latest").unlink()  # only a hint
    assert latest_checkpoint(tmp_path) == newest and newest_valid_checkpoint(tmp_path) == (newest, [])
    _write(tmp_path, model, 1_000_100)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step_1000000", "step_1000100"]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, tiny_model_cfg):
    model = LM(tiny_model_cfg)
    for step in (4, 8, 12):
        _write(tmp_path, model, step)
    # An older step written again (a resume past damaged checkpoints): kept; only steps before it are rotated out.
    _write(tmp_path, model, 6, keep=1)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step_000006", "step_000008", "step_000012"]
    _write(tmp_path, model, 14, keep=1)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step_000014"]


def test_state_is_stored_without_pickle_and_read_back_exactly(tmp_path, tiny_model_cfg, monkeypatch):
    from slmforge.train.checkpoint import rng_state, set_rng_state

    state = {"step": 3, "optimizer": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}},
                                      "param_groups": [{"betas": (0.9, 0.95), "lr": 1e-3 / 3, "params": ["w"]}]},
             "rng": rng_state(), "loader": {"epoch": 0, "position": 12, "mode": "window", "shuffle": True},
             "none": None, "nan": float("nan")}
    draws = (torch.rand(3), random.random(), np.random.rand(3))
    path = write_checkpoint(tmp_path, 3, LM(tiny_model_cfg).state_dict(), state, tied=True)
    assert json.loads((path / "state.json").read_text())["rng"]["python"]["version"] == 3  # plain JSON
    monkeypatch.setattr(torch, "load", None)  # no pickle anywhere on the way back
    back = read_state(path)
    group = back["optimizer"]["param_groups"][0]
    assert group == {"betas": (0.9, 0.95), "lr": 1e-3 / 3, "params": ["w"]} and back["loader"] == state["loader"]
    w = back["optimizer"]["state"]["w"]
    assert torch.equal(w["exp_avg"], state["optimizer"]["state"]["w"]["exp_avg"]) and w["step"].dtype == torch.float32
    assert back["none"] is None and back["nan"] != back["nan"]
    set_rng_state(back["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and np.array_equal(draws[2], again[2])


def test_garbage_in_the_weights_is_an_error_naming_the_file(tmp_path):
    from tests.conftest import make_run

    run_dir = make_run(tmp_path, "run")
    weights = latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[4096:8192] = np.random.default_rng(0).bytes(4096)  # 4 KB of garbage, the size unchanged
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{weights}: its contents do not match the sha256 in manifest.json"):
        load_for_inference(run_dir)


@pytest.mark.parametrize("damage", ["truncate_state", "truncate_json", "delete_manifest", "garbage_manifest"])
def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, tiny_model_cfg, damage):
    path = _write(tmp_path, LM(tiny_model_cfg), 1)
    name = {"truncate_state": "state.safetensors", "truncate_json": "state.json", "delete_manifest": "manifest.json",
            "garbage_manifest": "manifest.json"}[damage]
    file = path / name
    if damage == "delete_manifest":
        file.unlink()
    elif damage == "garbage_manifest":
        file.write_text("{not json")
    else:
        file.write_bytes(file.read_bytes()[:-7])
    expected = {"truncate_state": "bytes but manifest.json records", "truncate_json": "(truncated or overwritten)",
                "delete_manifest": "missing, so the checkpoint is incomplete",
                "garbage_manifest": "not a checkpoint manifest"}[damage]
    for read in (verify_checkpoint, read_state, read_checkpoint):
        with pytest.raises(ValueError) as info:
            read(path)
        assert str(info.value).startswith(f"{file}: ") and expected in str(info.value)
        assert "\n" not in str(info.value)
    assert newest_valid_checkpoint(tmp_path) == (None, [f"step_000001: {info.value}"])
    assert latest_checkpoint(tmp_path) == (None if damage == "delete_manifest" else path)


def test_format_1_checkpoints_load_without_pickle(tmp_path, tiny_model_cfg, monkeypatch):
    """state.pt of earlier versions (NumPy and Python RNG tuples in it) is read with weights_only=True."""
    model = LM(tiny_model_cfg)
    path = tmp_path / "step_000005"
    path.mkdir()
    save_weights(model.state_dict(), path / "model.safetensors", tied=True)
    state = {"step": 5, "rng": {"python": random.getstate(), "numpy": np.random.get_state()}, "loader": {"epoch": 1}}
    torch.save(state, path / "state.pt")
    load = torch.load

    def safe_only(*args, **kwargs):
        assert kwargs.get("weights_only") is True
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", safe_only)
    assert latest_checkpoint(tmp_path) == path
    back = read_state(path)
    assert back["step"] == 5 and back["rng"]["python"] == state["rng"]["python"]
    assert np.array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    weights, _ = read_checkpoint(path, tied=True)
    assert torch.equal(weights["head.weight"], model.tok_emb.weight)
    good = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(good[:-50])
    with pytest.raises(ValueError, match=rf"^{path / 'state.pt'}: damaged"):
        read_state(path)
    (path / "state.pt").write_bytes(good)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(ValueError, match=rf"^{weights}: [0-9,]+ bytes but its header describes"):
        read_checkpoint(path)
