"""Run configuration: plain dataclasses, loaded from YAML, overridden by ``key=value``.

Precedence is defaults < preset < YAML recipe < CLI overrides. Unknown keys fail at parse time and
name the nearest valid keys. Every run writes its resolved config as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmforge.tokens.mixture import MixtureConfig


@dataclass
class AttnConfig:
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: num_heads must be a multiple; 1 = MQA, num_heads = MHA
    head_dim: int = 0  # 0 = d_model // num_heads
    rope_theta: float = 10000.0
    window: int = 0  # sliding-window size in tokens; 0 = full causal attention


@dataclass
class SSMConfig:
    # Mamba-2 selective SSM (slmforge/model/ssm.py): inner width expand * d_model, in heads of head_dim.
    state_dim: int = 64  # N, the state size per head
    head_dim: int = 32  # P; heads = expand * d_model // head_dim
    expand: int = 2
    conv_kernel: int = 4  # causal depthwise conv over x, B and C
    chunk_size: int = 64  # block length of the chunked scan (training and prefill)


@dataclass
class LinearConfig:
    # Gated linear attention (slmforge/model/linear.py): key width expand_k * d_model, value width expand_v * d_model.
    num_heads: int = 4
    expand_k: float = 0.5
    expand_v: float = 1.0
    decay_rank: int = 16  # rank of the projection that makes the per-channel decay
    decay_normalizer: float = 16.0  # log decay = logsigmoid(.) / decay_normalizer, keeping decays near 1
    chunk_size: int = 32  # block length of the chunked form; 32 trains fastest on CPU (pairwise decays are costly)


@dataclass
class HymbaConfig:
    # Hybrid heads (slmforge/model/hymba.py): attention heads from `attn`, SSM heads from `ssm`, same width.
    window: int = 0  # sliding window of the attention heads in hymba layers; 0 = full causal attention


@dataclass
class ScalingConfig:
    # OpenELM layer-wise scaling (Mehta et al. 2024, arXiv 2404.14619, sec. 2.1): unique block i of N gets
    #   alpha_i = alpha_min + (alpha_max - alpha_min) * i / (N - 1),   beta_i likewise,
    #   n_h^i = alpha_i * d_model / head_dim query heads,   m^i = beta_i * d_model FFN hidden units,
    # with OpenELM's rounding (multipliers to 2 decimals, widths by make_divisible). head_dim and the query heads
    # per kv head stay those of `attn`.
    enabled: bool = False
    alpha_min: float = 0.5
    alpha_max: float = 1.0
    beta_min: float = 0.5
    beta_max: float = 4.0
    ffn_multiple: int = 32  # FFN widths are multiples of this (OpenELM uses 256, too coarse for tiny models)


def make_divisible(value: float, divisor: int) -> int:
    """OpenELM's (from MobileNet) rounding: nearest multiple of ``divisor``, at least ``divisor``, and never
    more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    num_layers: int = 4
    ffn_hidden: int = 0  # 0 = 8/3 * d_model rounded up to a multiple of 32 (Llama's SwiGLU sizing)
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # On CUDA, the mamba-ssm / flash-linear-attention kernels when installed (model/ops/kernels.py); CPU: ours.
    fast_kernels: bool = True
    # Token mixer per layer, a comma-separated pattern tiled across depth ("attn", "attn,ssm,ssm", ...); mixers:
    # attn, ssm (Mamba-2), linear (gated linear attention), hymba (attention and SSM heads side by side).
    layers: str = "attn"
    ffn: str = "dense"
    init_std: float = 0.02
    attn: AttnConfig = field(default_factory=AttnConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    hymba: HymbaConfig = field(default_factory=HymbaConfig)
    # Parameter sharing. num_layers is always the depth (layer applications); the parameters live in
    # num_layers / block_repeat unique blocks, and the `layers` pattern is tiled over the unique blocks.
    share_ffn: bool = False  # MobiLlama (arXiv 2402.16840): one FFN shared by every layer
    block_repeat: int = 1  # MobileLLM (arXiv 2402.14905): each unique block runs this many times in a row
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-int(8 * self.d_model / 3) // 32) * 32

    @property
    def head_dim(self) -> int:
        return self.attn.head_dim or self.d_model // self.attn.num_heads

    @property
    def num_unique_blocks(self) -> int:
        if self.block_repeat < 1 or self.num_layers % self.block_repeat:
            raise ValueError(f"model.num_layers={self.num_layers} must be a multiple of "
                             f"model.block_repeat={self.block_repeat} (a positive integer)")
        return self.num_layers // self.block_repeat

    def block_index(self) -> list[int]:
        """Layer i runs unique block ``block_index()[i]`` (MobileLLM's immediate repeat: 0, 0, 1, 1, ...)."""
        return [i // self.block_repeat for i in range(self.num_layers)]

    def block_kinds(self) -> list[str]:
        """The token mixer of each unique block."""
        pattern = [p.strip() for p in self.layers.split(",") if p.strip()]
        return [pattern[j % len(pattern)] for j in range(self.num_unique_blocks)]

    def layer_kinds(self) -> list[str]:
        """The token mixer of each layer (application), num_layers long."""
        kinds = self.block_kinds()
        return [kinds[j] for j in self.block_index()]

    def block_config(self, j: int) -> ModelConfig:
        """The config unique block ``j`` is built from: this one, or with OpenELM's per-block heads and FFN width."""
        s = self.scaling
        if not s.enabled:
            return self
        if self.share_ffn:
            raise ValueError("model.share_ffn and model.scaling.enabled cannot be combined: "
                             "one shared FFN cannot have a different width in every layer")
        # np.linspace(min, max, N) as OpenELM computes it, rounded to 2 decimals as there
        frac = j / (self.num_unique_blocks - 1) if self.num_unique_blocks > 1 else 0.0
        alpha = round(s.alpha_min + (s.alpha_max - s.alpha_min) * frac, 2)
        beta = round(s.beta_min + (s.beta_max - s.beta_min) * frac, 2)
        head_dim, groups = self.head_dim, self.attn.num_heads // self.attn.num_kv_heads
        # Query width a multiple of head_dim * groups keeps every kv head with the same number of query heads.
        num_heads = make_divisible(alpha * self.d_model, head_dim * groups) // head_dim
        attn = dataclasses.replace(self.attn, num_heads=num_heads, num_kv_heads=num_heads // groups, head_dim=head_dim)
        return dataclasses.replace(self, attn=attn, ffn_hidden=make_divisible(beta * self.d_model, s.ffn_multiple),
                                   scaling=ScalingConfig())


@dataclass
class DataConfig:
    # "procedural" builds the embedded corpus (no teacher, no internet); "files" reads `paths`.
    source: str = "procedural"
    paths: list[str] = field(default_factory=list)  # text/JSONL/Parquet files or globs (source=files)
    val_paths: list[str] = field(default_factory=list)  # held-out files; empty = split by val_fraction
    val_fraction: float = 0.02
    text_field: str = "text"  # JSONL/Parquet column holding the text
    text_split: str = "file"  # plain-text files: one document per "file", "line" or "blank_line"-separated block
    num_train_docs: int = 20000  # procedural corpus size per split
    num_val_docs: int = 500
    num_test_docs: int = 500
    families: list[str] = field(default_factory=lambda: ["arithmetic", "narrative", "facts", "sorting"])
    seq_len: int = 256
    packing: str = "window"  # "window": fixed-length windows of the token stream; "documents": packed docs
    num_workers: int = 2  # processes for tokenization
    tokenizer: str = ""  # tokenizer.json; "" = <run_dir>/tokenizer.json (trained by `slmforge run`)
    shards_dir: str = ""  # holds train/ and validation/ token shards; "" = <run_dir>/shards
    # Multi-stage data mixture over token-shard sources (slmforge/tokens/mixture.py); no stages = train on
    # <shards_dir>/train. Validation always uses <shards_dir>/validation.
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    # Named corpora built side by side (one shared tokenizer, shards in <shards_dir>/<name>/), each a mapping of
    # the data keys above that differ from the top-level ones, e.g. {math: {families: [arithmetic]},
    # wiki: {source: files, paths: [...]}}. Mixture sources with no shards folder read <shards_dir>/<name>/train.
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 1234


@dataclass
class TrainConfig:
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 300
    lr_peak: float = 3e-3
    lr_min_ratio: float = 0.1  # final lr = lr_peak * lr_min_ratio
    warmup_steps: int = 30
    schedule: str = "wsd"  # "wsd" or "cosine"
    decay_fraction: float = 0.2  # WSD: fraction of steps spent decaying
    decay_shape: str = "sqrt"  # WSD decay: "linear", "sqrt" (1 - sqrt), "cosine"
    # WSD: name of a data.mixture stage; the decay starts with it (replacing decay_fraction) and ends at max_steps.
    anneal_stage: str = ""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16"
    device: str = "auto"
    # torch.compile each block: "auto" = on for CUDA (where it pays back quickly), off on CPU, where it
    # takes 20-30 s to compile and needs a C compiler; or true / false.
    compile: str = "auto"
    parallel: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard); ignored in one process
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    num_threads: int = 0  # torch intra-op threads; 0 = leave torch's default


@dataclass
class CurateConfig:
    # Optional curation stages of `slmforge run`, between the corpus and the tokenizer (slmforge/curate/):
    # each reads the previous stage's kept documents and writes <run_dir>/curate/<stage>/.
    dedup: bool = False  # exact + MinHash near-duplicate removal
    quality: bool = False  # Gopher quality rules
    decontaminate: bool = False  # drop documents sharing a 13-gram with an evaluation set (GSM8K test)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    preset: str = ""  # model preset applied before the recipe's own model keys
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    sample_prompts: list[str] = field(default_factory=lambda: ["Question: Tom has 3 apples"])
    sample_tokens: int = 64

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# Model presets. Parameter counts are exact and checked against the instantiated model in tests;
# `slmforge plan --preset NAME` prints them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=128, num_layers=4, max_seq_len=256,
                 attn=dict(num_heads=4, num_kv_heads=2)),
    "10m": dict(vocab_size=8192, d_model=256, num_layers=10, max_seq_len=1024,
                attn=dict(num_heads=4, num_kv_heads=2)),
    "50m": dict(vocab_size=32768, d_model=512, num_layers=12, max_seq_len=2048,
                attn=dict(num_heads=8, num_kv_heads=4)),
    "100m": dict(vocab_size=32768, d_model=768, num_layers=12, max_seq_len=2048, ffn_hidden=2048,
                 attn=dict(num_heads=12, num_kv_heads=4)),
    "300m": dict(vocab_size=32768, d_model=1024, num_layers=24, max_seq_len=2048, ffn_hidden=2816,
                 attn=dict(num_heads=16, num_kv_heads=8)),
    "1b": dict(vocab_size=32768, d_model=2048, num_layers=16, max_seq_len=4096, ffn_hidden=7168,
               attn=dict(num_heads=32, num_kv_heads=8, rope_theta=500000.0)),
}


def preset(name: str) -> ModelConfig:
    from slmforge.registry import lookup

    return merge(ModelConfig(), lookup(PRESETS, name, "preset"), where=f"preset {name}")


# ---------------------------------------------------------------- merging dicts and overrides


def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or CLI value to the annotated field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if dataclasses.is_dataclass(item):
            return [merge(item(), v, f"{where}[{i}]") if isinstance(v, dict) else v for i, v in enumerate(value)]
        return [_coerce(v, item, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def merge(obj, updates: dict[str, Any], where: str = "config"):
    """Return a copy of dataclass ``obj`` with nested ``updates`` applied; unknown keys raise."""
    hints = _type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in (updates or {}).items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a mapping, got {value!r}")
            changes[key] = merge(current, value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(obj, **changes)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.d_model=64", "train.lr_peak=1e-3"]`` -> nested dict (values still strings/YAML)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """A YAML file's top-level mapping ({} for None or an empty file); a clear error otherwise."""
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults < preset < YAML recipe < overrides."""
    raw = read_yaml(path)
    over = parse_overrides(overrides or [])
    preset_name = over.get("preset", raw.get("preset", ""))
    cfg = RunConfig()
    if preset_name:
        cfg = dataclasses.replace(cfg, preset=str(preset_name), model=preset(str(preset_name)))
    cfg = merge(cfg, raw, where=str(path) if path else "config")
    return merge(cfg, over, where="override")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict[str, Any]):
    return merge(cls(), data, where=cls.__name__)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
