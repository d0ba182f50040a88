"""info.py: parameters and decoding-state bytes, checked against the real model and its caches."""

import dataclasses

import pytest
import torch

from slmforge.config import ScalingConfig, preset
from slmforge.info import format_info, info, load_model_config, state_bytes
from slmforge.model.lm import LM
from slmforge.plan import count_params

LAYOUTS = {
    "attn": dict(layers="attn"),
    "ssm": dict(layers="ssm"),
    "linear": dict(layers="linear"),
    "hymba": dict(layers="hymba"),
    "hybrid_window": dict(layers="attn,ssm,ssm", attn=dict(window=64)),
    "repeat2_share_ffn": dict(layers="attn,linear", block_repeat=2, share_ffn=True),
    "scaling": dict(layers="attn,hymba", scaling=dict(enabled=True)),
}


def _cfg(name: str):
    from slmforge.config import merge

    return merge(preset("tiny"), LAYOUTS[name])


def _real_bytes(cfg, tokens: int, dtype: torch.dtype) -> dict[str, int]:
    with torch.device("meta"):
        model = LM(cfg)
    caches = model.init_cache(1, tokens, device="meta", dtype=dtype)
    out: dict[str, int] = {}
    for block, cache in zip(model.layers(), caches):
        out[block.kind] = out.get(block.kind, 0) + cache.nbytes()
    out["total"] = sum(c.nbytes() for c in caches)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_state_bytes_equal_the_real_caches(name):
    cfg = _cfg(name)
    result = info(cfg)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for tokens in (4096, 16384):
            assert result["state_bytes"][dtype][tokens] == _real_bytes(cfg, tokens, torch_dtype)


def test_recurrent_state_is_flat_and_kv_grows_linearly():
    ssm, attn = _cfg("ssm"), _cfg("attn")
    assert state_bytes(ssm, 4096) == state_bytes(ssm, 16384)
    assert state_bytes(attn, 16384)["total"] == 4 * state_bytes(attn, 4096)["total"]
    # tiny: 4 layers x k and v x 2 kv heads x head_dim 32 x 4096 tokens x 2 bytes
    assert state_bytes(attn, 4096)["total"] == 4 * 2 * 2 * 32 * 4096 * 2


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_params_match_count_params(name):
    cfg = _cfg(name)
    p, n = info(cfg)["params"], count_params(cfg)
    assert (p["total"], p["non_embedding"], p["shared"]) == (n.total, n.non_embedding, n.shared)


def test_format_and_spec_loading(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: tiny\nmodel:\n  layers: attn,ssm\n  block_repeat: 2\n")
    from_recipe = load_model_config(str(recipe))
    from_preset = load_model_config("tiny", ["model.layers=attn,ssm", "model.block_repeat=2"])
    assert from_recipe == from_preset
    text = format_info(info(from_preset))
    n = count_params(from_preset)
    assert f"{n.total:,} total" in text and f"{n.shared:,} shared" in text
    assert "16,384 tokens" in text and "ssm" in text and "each block x2" in text
    with pytest.raises(ValueError, match="unknown key"):
        load_model_config("tiny", ["model.block_repeats=2"])
    assert dataclasses.replace(from_preset, scaling=ScalingConfig(enabled=True)).block_config(0).attn.num_heads == 2


def test_run_folder_spec(tmp_path):
    from slmforge.config import load_config
    from slmforge.runs import save_config

    run = tmp_path / "run"
    cfg = load_config(None, ["preset=tiny", "model.layers=attn,linear", "model.d_model=96"])
    save_config(run, cfg)
    assert load_model_config(str(run)) == cfg.model
    assert load_model_config(str(run), ["model.num_layers=2"]).num_layers == 2
    with pytest.raises(ValueError, match="folder without config.yaml.*tiny"):
        load_model_config(str(tmp_path))
