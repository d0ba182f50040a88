"""What a model config costs to hold: parameters (total, non-embedding, shared) and inference-state bytes.

The state is what decoding keeps per sequence, counted exactly as the mixers allocate it (``init_cache``):
attention keeps keys and values for every position (``KVCache``, which also allocates all ``max_len`` slots
under a sliding window), the SSM and linear attention a fixed-size state (``RecurrentCache``, kept in at least
float32) plus the SSM's last conv inputs; Hymba both. Each mixer class states its own bytes
(``state_bytes(cfg, tokens, nbytes)``), found through ``model.block.MIXERS``, which imports torch; no tensor
is made. Each layer application has its own cache, also when it shares weights with another layer.
``tests/test_info.py`` and ``tests/model/test_mixer_table.py`` check these numbers against real caches.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import torch

from slmforge.config import PRESETS, ModelConfig, load_config
from slmforge.model.block import MIXERS
from slmforge.model.lm import LM
from slmforge.model.ops import choice, machine
from slmforge.plan import count_params
from slmforge.registry import lookup
from slmforge.runs import RunDir

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def state_bytes(cfg: ModelConfig, tokens: int, dtype: str = "bf16") -> dict[str, int]:
    """Decoding-state bytes of one sequence of ``tokens`` tokens, summed per mixer kind, plus ``total``."""
    nbytes = lookup(DTYPE_BYTES, dtype, "dtype")
    kinds = cfg.block_kinds()
    per_block = [lookup(MIXERS, kind, "token mixer (model.layers)").state_bytes(cfg.block_config(j), tokens, nbytes)
                 for j, kind in enumerate(kinds)]
    out: dict[str, int] = {}
    for j in cfg.block_index():
        out[kinds[j]] = out.get(kinds[j], 0) + per_block[j]
    out["total"] = sum(per_block[j] for j in cfg.block_index())
    return out


def info(cfg: ModelConfig, seq_lens: tuple[int, ...] = (4096, 16384),
         dtypes: tuple[str, ...] = ("bf16", "fp32")) -> dict:
    """Parameters and per-sequence decoding state of ``cfg`` (any layout, sharing and scaling)."""
    n = count_params(cfg)
    blocks = [cfg.block_config(j) for j in range(cfg.num_unique_blocks)]
    return {
        "params": {"total": n.total, "non_embedding": n.non_embedding, "embedding": n.embedding, "shared": n.shared,
                   "active": n.active, "table": n.table},
        "layers": {"num_layers": cfg.num_layers, "num_unique_blocks": cfg.num_unique_blocks,
                   "mixers": dict(Counter(cfg.layer_kinds())), "share_ffn": cfg.share_ffn,
                   "ffns": dict(Counter(cfg.block_ffns()[j] for j in cfg.block_index())),
                   "block_repeat": cfg.block_repeat, "scaling": cfg.scaling.enabled,
                   "attn_heads": [b.attn.num_heads for b in blocks], "ffn_dims": [b.ffn_dim for b in blocks]},
        "state_bytes": {dtype: {tokens: state_bytes(cfg, tokens, dtype) for tokens in seq_lens} for dtype in dtypes},
    }


def _bytes(x: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    raise AssertionError


def format_info(result: dict) -> str:
    p, layers = result["params"], result["layers"]
    mixers = ", ".join(f"{k} x{v}" for k, v in layers["mixers"].items())
    sharing = [name for name, on in (("shared FFN", layers["share_ffn"]),
                                     (f"each block x{layers['block_repeat']}", layers["block_repeat"] > 1),
                                     ("OpenELM scaling", layers["scaling"])) if on]
    active = f"; {p['active']:,} active per token" if p.get("active", p["total"]) != p["total"] else ""
    # Engram tables (model/engram.py) are lookups: counted in total, apart from the compute (non-embedding) ones
    active += f"; {p['table']:,} in Engram tables, apart from compute" if p.get("table") else ""
    ffns = ", ".join(f"{k} x{v}" for k, v in layers.get("ffns", {}).items() if k != "dense")
    lines = [f"Parameters: {p['total']:,} total, {p['non_embedding']:,} non-embedding, {p['shared']:,} shared "
             f"by more than one layer{active}",
             f"Layers: {layers['num_layers']} ({mixers}{'; FFN ' + ffns if ffns else ''}) from "
             f"{layers['num_unique_blocks']} unique blocks"
             + (f"; {', '.join(sharing)}" if sharing else "")]
    if layers["scaling"]:
        lines.append(f"  attention heads per block {layers['attn_heads']}, FFN widths {layers['ffn_dims']}")
    lines.append("Decoding state per sequence (caches as init_cache allocates them):")
    for dtype, by_len in result["state_bytes"].items():
        for tokens, by_kind in by_len.items():
            kinds = ", ".join(f"{k} {_bytes(v)}" for k, v in by_kind.items() if k != "total")
            lines.append(f"  {dtype:>4} at {tokens:>6,} tokens: {_bytes(by_kind['total']):>10}  ({kinds})")
    return "\n".join(lines)


def kernels(cfg: ModelConfig, decode_rows: tuple[int, ...] = choice.DECODE_ROWS,
            prefill_rows: tuple[int, ...] = (64, 256)) -> dict:
    """The float32 CPU matmul kernel of each path on this machine (``model/ops/choice.py``) for the weight shapes
    of ``cfg``: its candidates' times (measured now or read from the cache), the choice and why."""
    with torch.device("meta"):  # the shapes, without memory or initialisation
        shapes = sorted({(p.shape[1], p.shape[0]) for p in LM(cfg).parameters() if p.dim() == 2})
    made = [choice.choose("train", choice.TRAIN_ROWS, 0, 0)]
    for path, rows_list in (("decode", decode_rows), ("prefill", prefill_rows)):
        made += [choice.choose(path, choice.row_class(rows), i, o) for i, o in shapes for rows in rows_list]
    return {"machine": {"cpu": machine.cpu_model(), "flags": sorted(set(machine.KEY_FLAGS) & machine.cpu_flags()),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "isa_env": os.environ.get(machine.ISA_ENV, "")},
            "forced": os.environ.get(choice.KERNELS_ENV, ""), "train_shapes": choice.TRAIN_SHAPES,
            "cache": str(machine.cache_dir()), "choices": [dataclasses.asdict(c) for c in made]}


def format_kernels(result: dict) -> str:
    m, env = result["machine"], result["forced"]
    hidden = f" ({machine.ISA_ENV}={m['isa_env']}: AVX-512 hidden)" if m["isa_env"] else ""
    train = ", ".join(f"{i}->{o}" for i, o in result["train_shapes"])
    lines = [f"Machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}",
             f"ISA flags: {' '.join(m['flags']) or '-'}{hidden}",
             f"{choice.KERNELS_ENV}: " + (env if env else "unset (every path measured; torch unless a candidate is "
                                           f"{choice.MIN_GAIN:.2f}x faster)"),
             "Float32 CPU matmul kernels (time per call; train: forward + backward over "
             f"{train}):",
             f"  {'path':<8}{'rows':>5}  {'I->O':<11}{'candidates':<44}{'choice':<8}why"]
    for c in result["choices"]:
        shape = "-" if c["path"] == "train" else f"{c['shape'][0]}->{c['shape'][1]}"
        tried = [f"{name} {_seconds(t)}" for name, t in c["times"].items()]
        tried += [f"{name} failed ({why})" for name, why in c["errors"].items()]
        lines.append(f"  {c['path']:<8}{c['rows']:>5}  {shape:<11}{', '.join(tried) or '-':<44}{c['kernel']:<8}"
                     f"{c['reason']}")
    lines.append(f"Measurements kept in {Path(result['cache']) / 'kernels_*.json'} (delete them to measure again)")
    return "\n".join(lines)


def _seconds(t: float) -> str:
    return f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def load_model_config(spec: str, overrides: list[str] | None = None) -> ModelConfig:
    """A preset name (``tiny``, ``100m``, ...), a recipe YAML or a run folder (its resolved ``config.yaml``), then
    ``key=value`` overrides (``model.layers=ssm``)."""
    if spec in PRESETS:
        return load_config(None, [f"preset={spec}", *(overrides or [])]).model
    if Path(spec).is_dir():
        path = RunDir.at(spec).config
        if not path.is_file():
            raise ValueError(f"{spec}: a folder without config.yaml; expected a preset ({', '.join(PRESETS)}), "
                             f"a recipe YAML or a run folder")
        return load_config(path, overrides).model
    if not Path(spec).is_file():
        raise ValueError(f"{spec}: not a preset ({', '.join(PRESETS)}), a recipe YAML or a run folder")
    return load_config(spec, overrides).model
