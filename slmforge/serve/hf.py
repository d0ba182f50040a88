"""Hugging Face interop: export an attention-only slmforge model as a ``LlamaForCausalLM`` folder, and import one.

Our LM is a Llama (arXiv 2302.13971) with two fused projections, so the mapping is a split or a concatenation:
``wqkv`` = rows of q_proj, k_proj, v_proj; ``w13`` = rows of gate_proj (w1) then up_proj (w3). RoPE uses HF's
"rotate half" convention on both sides, so q and k rows need no permutation. Export writes config.json,
model.safetensors, the tokenizer (``PreTrainedTokenizerFast``) and generation_config.json; import reads
config.json and the safetensors files directly, so it needs neither ``transformers`` nor the hub.

Our ``Tokenizer`` keeps its special tokens at ids 0..6. A foreign tokenizer (SmolLM2, ...) that lacks them is
imported with every id shifted up by 7 and the seven specials put in front; their embedding rows copy the
folder's EOS/BOS/pad rows (the mean row when it has none), so logits over the original tokens are unchanged
(``logits[..., 7:]``), but with tied embeddings our EOS and the folder's EOS share a row and so a logit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import safetensors.torch
import torch

from slmforge.checkpoint import load_for_inference, write_checkpoint
from slmforge.config import AttnConfig, ModelConfig, RunConfig
from slmforge.model.lm import LM
from slmforge.runs import RunDir, atomic_path, save_config, write_json
from slmforge.tokens.tokenizer import SPECIAL_TOKENS, Tokenizer

# Keys of a Llama config.json that change the network; anything not in the first group must have these values.
SUPPORTED_VALUES = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
SUPPORTED_TYPES = ("llama",)


def _check_exportable(cfg: ModelConfig) -> None:
    if cfg.scaling.enabled:
        raise ValueError("export_hf: model.scaling.enabled (OpenELM layer-wise scaling) gives every layer its own "
                         "head count and FFN width, which LlamaForCausalLM cannot represent")
    if "moe" in cfg.block_ffns():
        raise ValueError(f"export_hf: model.ffn={cfg.ffn!r} has mixture-of-experts layers, which LlamaForCausalLM "
                         f"cannot represent; export a dense model (model.ffn=dense) or serve this run with slmforge")
    kinds = sorted(set(cfg.layer_kinds()))
    if "dsa" in kinds:
        raise ValueError(f"export_hf: model.layers={cfg.layers!r} has DeepSeek sparse attention (dsa) layers, whose "
                         f"indexer and top-k key selection LlamaForCausalLM cannot represent; serve this run with "
                         f"slmforge")
    if cfg.attn.rope_scaling != "none" and cfg.attn.rope_factor != 1:
        raise ValueError(f"export_hf: model.attn.rope_scaling={cfg.attn.rope_scaling!r} is not exported (the "
                         f"config.json would say plain RoPE); serve this run with slmforge")
    if kinds != ["attn"] or cfg.ffn != "dense" or cfg.attn.window:
        raise ValueError(f"export_hf: only attention-only dense models map onto LlamaForCausalLM; this model has "
                         f"model.layers={cfg.layers!r} (mixers {kinds}), model.ffn={cfg.ffn!r}, "
                         f"model.attn.window={cfg.attn.window} (need layers='attn', ffn='dense', window=0)")


def hf_config(cfg: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0) -> dict:
    """The config.json of a ``LlamaForCausalLM`` equal to ``cfg``.

    ``rope_theta`` is written both at the top level (transformers 4.x) and in ``rope_parameters`` (5.x).
    """
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.attn.num_heads, "num_key_value_heads": cfg.attn.num_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.attn.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.attn.rope_theta},
        "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "initializer_range": cfg.init_std, "torch_dtype": "float32",
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }


def to_hf_state_dict(model: LM) -> dict[str, torch.Tensor]:
    """Our parameters under Llama names; the tied head is left out, as transformers saves it.

    Shared weights (``model.share_ffn``, ``model.block_repeat``) are written out once per layer that uses them:
    Llama has no sharing, so the export is larger than the model but computes the same logits.
    """
    cfg = model.cfg
    q_rows, kv_rows, f = cfg.attn.num_heads * cfg.head_dim, cfg.attn.num_kv_heads * cfg.head_dim, cfg.ffn_dim
    out = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.layers()):
        p = f"model.layers.{i}."
        ffn = block.ffn if model.ffn is None else model.ffn
        q, k, v = block.mixer.wqkv.weight.split([q_rows, kv_rows, kv_rows])
        gate, up = ffn.w13.weight.split([f, f])
        out.update({
            p + "input_layernorm.weight": block.mixer_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.mixer.wo.weight, p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": ffn.w2.weight,
        })
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.head.weight
    # Clones: safetensors refuses tensors that share memory, and q/k/v (gate/up) are views of one weight.
    return {name: t.detach().clone() for name, t in out.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                       where: str = "state dict") -> dict[str, torch.Tensor]:
    """Llama names -> our state dict (fused ``wqkv`` and ``w13``)."""
    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"{where}: missing tensor {name!r}")
        return sd.pop(name).float()

    out = {"tok_emb.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        out.update({
            f"blocks.{i}.mixer_norm.weight": take(p + "input_layernorm.weight"),
            f"blocks.{i}.ffn_norm.weight": take(p + "post_attention_layernorm.weight"),
            f"blocks.{i}.mixer.wqkv.weight": torch.cat(attn),
            f"blocks.{i}.mixer.wo.weight": take(p + "self_attn.o_proj.weight"),
            f"blocks.{i}.ffn.w13.weight": torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
            f"blocks.{i}.ffn.w2.weight": take(p + "mlp.down_proj.weight"),
        })
    head = sd.pop("lm_head.weight", None)
    out["head.weight"] = out["tok_emb.weight"] if cfg.tie_embeddings else head.float() if head is not None else None
    if out["head.weight"] is None:
        raise ValueError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight")
    leftover = [n for n in sd if not n.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"{where}: unexpected tensors {leftover[:5]} (is this a plain Llama checkpoint?)")
    return out


def _model_and_tokenizer(source) -> tuple[LM, Tokenizer | None]:
    if isinstance(source, LM):
        return source, None
    model, tok, _ = load_for_inference(source)
    return model, tok


def export_hf(source, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a ``LlamaForCausalLM`` folder from a run folder, a checkpoint folder or an ``LM`` (+ ``tokenizer``)."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    model, run_tok = _model_and_tokenizer(source)
    tokenizer = tokenizer or run_tok
    _check_exportable(model.cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = dict(bos_id=1, eos_id=2, pad_id=0) if tokenizer else dict(bos_id=None, eos_id=None, pad_id=None)
    write_json(out / "config.json", hf_config(model.cfg, **ids))
    with atomic_path(out / "model.safetensors") as tmp:
        safetensors.torch.save_file(to_hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    if tokenizer is not None:
        bos, eos, pad = (SPECIAL_TOKENS[i] for i in (1, 2, 0))
        PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, bos_token=bos, eos_token=eos, pad_token=pad,
                                model_max_length=model.cfg.max_seq_len).save_pretrained(out)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)
    return out


# ---------------------------------------------------------------- import


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Map a Llama config.json onto a ``ModelConfig``; anything we cannot represent is a clear error."""
    if hf.get("model_type") not in SUPPORTED_TYPES:
        raise ValueError(f"{where}: model_type={hf.get('model_type')!r}; only {SUPPORTED_TYPES} can be imported")
    for key, want in SUPPORTED_VALUES.items():
        if hf.get(key, want) != want:
            raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (need {want!r})")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: rope scaling {rope!r} is not supported (only plain RoPE, rope_type 'default')")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    # Sizes that equal the defaults derived from d_model stay 0 ("derived"), as in a config we wrote ourselves.
    derived_ffn = ModelConfig(d_model=hf["hidden_size"]).ffn_dim
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        ffn_hidden=0 if hf["intermediate_size"] == derived_ffn else hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
        attn=AttnConfig(num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                        head_dim=0 if head_dim * heads == hf["hidden_size"] else head_dim, rope_theta=float(theta)),
    )


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if not (folder / files[0]).exists():
        raise ValueError(f"{folder}: no model.safetensors (or sharded index); only safetensors checkpoints are read")
    sd = {}
    for name in files:
        sd.update(safetensors.torch.load_file(str(folder / name)))
    return sd


def _special_rows(folder: Path, tok_json: dict) -> list[int | None]:
    """Ids (in the folder's vocabulary) whose rows seed our pad, bos and eos tokens; None = mean row."""
    special = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).exists():
            special = {**json.loads((folder / name).read_text()), **special}
    ids = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    vocab = tok_json["model"].get("vocab", {})

    def id_of(role: str) -> int | None:
        tok = special.get(f"{role}_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return ids.get(tok, vocab.get(tok)) if tok else None

    eos = id_of("eos")
    return [id_of("pad") if id_of("pad") is not None else eos, id_of("bos"), eos]


def _shift_tokenizer(tok_json: dict, shift: int) -> dict:
    """Move every id up by ``shift`` and put our special tokens at 0..shift-1."""
    if tok_json["model"].get("type") != "BPE":
        raise ValueError(f"tokenizer model {tok_json['model'].get('type')!r}: only BPE tokenizers can be remapped")
    tok_json = json.loads(json.dumps(tok_json))
    # The specials go into the model's vocabulary as well: tokenizers gives an added token that is missing
    # there a fresh id past the end instead of the one it is saved with.
    vocab = {t: i + shift for t, i in tok_json["model"]["vocab"].items()}
    tok_json["model"]["vocab"] = {**dict(zip(SPECIAL_TOKENS, range(shift))), **vocab}
    added = [{**t, "id": t["id"] + shift} for t in tok_json.get("added_tokens", [])]
    ours = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for i, s in enumerate(SPECIAL_TOKENS)]
    tok_json["added_tokens"] = ours + added
    tok_json["post_processor"] = None  # its templates name the old ids; we never add special tokens on encode
    return tok_json


def import_hf(folder: str | Path) -> tuple[LM, Tokenizer, ModelConfig]:
    """Load a ``LlamaForCausalLM`` folder (config.json, safetensors, tokenizer.json) into slmforge."""
    import tokenizers

    folder = Path(folder)
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).exists():
            raise ValueError(f"{folder}: no {name}; expected a Hugging Face Llama folder")
    cfg = model_config_from_hf(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    sd = from_hf_state_dict(_read_safetensors(folder), cfg, str(folder))
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    if any(ids.get(s) != i for i, s in enumerate(SPECIAL_TOKENS)):
        shift = len(SPECIAL_TOKENS)
        rows = _special_rows(folder, tok_json)
        tok_json = _shift_tokenizer(tok_json, shift)
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + shift)
        for name in ("tok_emb.weight", "head.weight"):
            w = sd[name]
            seed = [w[i] if i is not None else w.mean(0) for i in (rows + [None] * shift)[:shift]]
            sd[name] = torch.cat([torch.stack(seed), w])
        if cfg.tie_embeddings:
            sd["head.weight"] = sd["tok_emb.weight"]
    model = LM(cfg)
    model.load_state_dict(sd)
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(tok_json)))
    return model.eval(), tokenizer, cfg


def import_hf_run(folder: str | Path, run_dir: str | Path) -> Path:
    """``import_hf`` written as a run folder (config.yaml, tokenizer.json, checkpoints/) that generate, chat and
    eval load like a trained run."""
    model, tokenizer, cfg = import_hf(folder)
    run = RunDir.at(run_dir)
    run_cfg = RunConfig(name=run.root.name, out_dir=str(run.root.parent), model=cfg)
    run_cfg.data.seq_len = min(run_cfg.data.seq_len, cfg.max_seq_len)
    tokenizer.save(run.tokenizer)
    # keep=0: an import removes none of the folder's other checkpoints.
    state = {"step": 0, "imported_from": str(Path(folder).resolve())}
    write_checkpoint(run.checkpoints, 0, model.state_dict(), state, keep=0, tied=cfg.tie_embeddings)
    save_config(run.root, run_cfg)
    return run.root
