"""Plan a training run: exact parameter and FLOP counts, Chinchilla budgets, memory per GPU.

- Parameters are counted from a ``ModelConfig`` by the same recipe ``model/lm.py`` follows (Llama-style, no
  biases) and checked against the instantiated model in ``tests/test_plan.py``. A parameter shared by several
  layers (``model.share_ffn``, ``model.block_repeat``) counts once; FLOPs and activations count every use.
- Each mixer and FFN states its own per-token cost (``cost(cfg, seq_len) -> LayerCost``, ``model/cost.py``) in
  its class, which this module finds through ``model.block.MIXERS`` / ``FFNS``. Reading that table imports the
  model modules, hence torch; the arithmetic itself touches no tensor.
- FLOPs per token follow PaLM's MFU formula (Chowdhery et al. 2022, arXiv 2204.02311, appendix B):
  2 FLOPs per matmul weight in the forward, plus the attention-score term, times 3 for training.
- Compute-optimal sizes come from Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
  (Chinchilla, arXiv 2203.15556): the Approach 3 fit and the rule of about 20 tokens per parameter.
- Activation memory follows the accounting of Korthikanti et al. 2022, "Reducing Activation Recomputation in
  Large Transformer Models" (arXiv 2205.05198), redone for RMSNorm, GQA and SwiGLU.

Legend: V vocab, h d_model, f ffn_dim, L layers, s sequence length, b micro-batch size (sequences per GPU),
N parameters, D training tokens, C training FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from slmforge.config import PRESETS, ModelConfig, check_choice, check_min, preset
from slmforge.model.block import FFNS, MIXERS
from slmforge.model.cost import LayerCost
from slmforge.model.engram import Engram
from slmforge.registry import lookup

GIB = 2**30


class GPU(NamedTuple):
    peak_flops: float  # dense bf16 tensor-core FLOP/s, no sparsity
    memory_gib: float  # total device memory as nvidia-smi reports it


GPUS: dict[str, GPU] = {
    "b200": GPU(2250e12, 180),
    "h200": GPU(989e12, 140),
    "h100": GPU(989e12, 80),  # SXM; the PCIe card peaks at 756e12
    "a100": GPU(312e12, 80),  # the 80 GB card
    "a100-40gb": GPU(312e12, 40),
    "a10g": GPU(125e12, 24),
    "l40s": GPU(362e12, 48),
    "l4": GPU(121e12, 22.5),
    "rtx4090": GPU(165e12, 24),  # with fp32 accumulation, as PyTorch uses
    "rtx3090": GPU(71e12, 24),
    "t4": GPU(65e12, 15),  # fp16: the T4 has no bf16
    "mi300x": GPU(1307e12, 192),
}

# Leave 10% of device memory for the CUDA context, allocator fragmentation and transient buffers.
USABLE_MEMORY_FRACTION = 0.9


# ---------------------------------------------------------------- parameter counts


def _block_costs(cfg: ModelConfig, seq_len: int) -> list[tuple[LayerCost, LayerCost]]:
    """(mixer, FFN) cost of each unique block, from its own config (OpenELM scaling changes it per block)."""
    ffns = {kind: lookup(FFNS, kind, "FFN (model.ffn)") for kind in dict.fromkeys(cfg.block_ffns())}
    mixers = {kind: lookup(MIXERS, kind, "token mixer (model.layers)") for kind in dict.fromkeys(cfg.block_kinds())}
    configs = [cfg.block_config(j) for j in range(cfg.num_unique_blocks)]
    return [(mixers[kind].cost(c, seq_len), ffns[ffn].cost(c, seq_len))
            for c, kind, ffn in zip(configs, cfg.block_kinds(), cfg.block_ffns())]


def _layer_costs(cfg: ModelConfig, seq_len: int) -> list[tuple[LayerCost, LayerCost]]:
    """Per layer application (num_layers long): compute and activations count every use of a shared weight."""
    blocks = _block_costs(cfg, seq_len)
    return [blocks[j] for j in cfg.block_index()]


@dataclass
class ParamCount:
    total: int
    non_embedding: int  # total minus the token embedding, an untied output head and Engram tables: compute
    embedding: int
    per_layer: list[int] = field(default_factory=list)  # parameters each layer uses, shared ones in every user
    shared: int = 0  # parameters used by more than one layer (a shared FFN, repeated blocks), counted once
    active: int = 0  # total minus the routed experts a token is not sent to (MoE) and the Engram rows it does not read
    table: int = 0  # Engram's hashed n-gram tables (model/engram.py), in total, not in non_embedding


def count_params(cfg: ModelConfig) -> ParamCount:
    """Every distinct parameter once: unique blocks, the shared FFN once, the embedding once when tied."""
    h = cfg.d_model
    blocks = _block_costs(cfg, cfg.max_seq_len)
    # two RMSNorm weights per block, one before the mixer and one before the FFN
    per_block = [2 * h + mixer.params + ffn.params for mixer, ffn in blocks]
    shared_ffn = blocks[0][1].params if cfg.share_ffn else 0
    own = [p - shared_ffn for p in per_block]  # what each unique block holds itself
    embedding = cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
    total = embedding + sum(own) + shared_ffn + h  # + final RMSNorm
    shared = sum(own) if cfg.block_repeat > 1 else 0
    shared += shared_ffn if cfg.num_layers > 1 else 0
    inactive = blocks[0][1].inactive_params if cfg.share_ffn else sum(f.inactive_params for _, f in blocks)
    inactive += sum(m.inactive_params for m, _ in blocks)
    engram, table, table_read = _engram_costs(cfg)
    total += engram.params + table
    inactive += table - table_read
    return ParamCount(total, total - embedding - table, embedding, [per_block[j] for j in cfg.block_index()], shared,
                      total - inactive, table)


def _engram_costs(cfg: ModelConfig) -> tuple[LayerCost, int, int]:
    """Engram memories over their layers: (compute cost, table parameters, table parameters read per token)."""
    e, n = cfg.engram, len(cfg.engram.layer_ids())
    one = Engram.cost(cfg)
    compute = LayerCost(n * one.params, n * one.matmul_params, activation_bytes=n * one.activation_bytes)
    return compute, n * Engram.table_params(cfg), n * (e.max_order - 1) * e.num_heads * e.dim


# ---------------------------------------------------------------- FLOPs


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward and training FLOPs per token.

    Convention (PaLM's MFU formula): the attention term counts the full s x s score matrix, 4 * L * s * q_dim per
    token in the forward, although a causal mask makes half of it zero. Reported MFU numbers use this convention;
    ``*_causal`` counts only the work a causal kernel must do (about half the term).
    The embedding lookup is free; the output head is a matmul even when tied.
    """
    layers = _layer_costs(cfg, seq_len)
    matmul = 2 * (sum(m.matmul_params + f.matmul_params for m, f in layers) + cfg.vocab_size * cfg.d_model
                  + _engram_costs(cfg)[0].matmul_params)
    context = sum(m.context_flops for m, _ in layers)
    causal = sum(m.context_flops_causal for m, _ in layers)
    # the backward costs twice the forward: gradients with respect to both activations and weights
    return {"forward": matmul + context, "train": 3 * (matmul + context),
            "forward_causal": matmul + causal, "train_causal": 3 * (matmul + causal),
            "attention_share": context / (matmul + context)}


# ---------------------------------------------------------------- Chinchilla


# Hoffmann et al. 2022, Approach 3 (eq. 10). Fitted on MassiveText with their tokenizer, so predicted losses
# are a guide to shape, not absolute numbers for another dataset.
CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


LOSS_NOTE = ("Chinchilla-fit loss: Hoffmann et al.'s fit on MassiveText with their tokenizer (nats/token);\n"
             "    a guide to shape, not comparable to the loss of your data and tokenizer")


def chinchilla_loss(n_params: float, n_tokens: float) -> float:
    c = CHINCHILLA
    return c["E"] + c["A"] / n_params ** c["alpha"] + c["B"] / n_tokens ** c["beta"]


def chinchilla_optimal(flops: float) -> dict[str, float]:
    """Minimise L(N, C / 6N) over N: setting dL/dN = 0 gives N^(alpha+beta) = (alpha A / beta B) (C/6)^beta."""
    c = CHINCHILLA
    a, b = c["alpha"], c["beta"]
    g = (a * c["A"] / (b * c["B"])) ** (1 / (a + b))
    n = g * (flops / 6) ** (b / (a + b))
    d = (flops / 6) ** (a / (a + b)) / g
    return {"params": n, "tokens": d, "loss": chinchilla_loss(n, d)}


def tokens_20x_optimal(flops: float) -> dict[str, float]:
    """D = 20 N with C = 6 N D gives N = sqrt(C / 120)."""
    n = math.sqrt(flops / 120)
    return {"params": n, "tokens": 20 * n, "loss": chinchilla_loss(n, 20 * n)}


# ---------------------------------------------------------------- memory


def memory_gib(cfg: ModelConfig, seq_len: int, micro_batch_size: int, num_gpus: int = 1,
               fsdp: bool = False, activation_checkpointing: bool = False) -> dict[str, float]:
    """Memory per GPU in GiB for mixed-precision AdamW training.

    States: fp32 master weights (4 bytes/param), fp32 gradients (4), AdamW moments (2 x 4); FSDP shards all three
    over num_gpus, DDP keeps a full copy on each GPU. Activations (bf16, per micro-batch, from the LayerCosts):
    per layer s*b*(2*2h for the norm inputs + the mixer's and FFN's saved tensors), about 35*s*b*h bytes for
    f = 8h/3 and half as many KV as query heads -- Korthikanti et al.'s 34*s*b*h for GPT, without the
    5*a*s^2*b term because SDPA/flash attention does not store the score matrix. With checkpointing each layer
    keeps only its input (2*s*b*h bytes) and one layer's activations are live during recomputation. Both add
    the head: final-norm input and head input (2 * 2*s*b*h) and the logits, s*b*V*(2 + 4) bytes (bf16 plus the
    fp32 copy the loss uses). The bf16 weight copies FSDP gathers per layer are not counted.
    """
    n = count_params(cfg).total
    shards = num_gpus if fsdp else 1
    tokens = seq_len * micro_batch_size
    h = cfg.d_model
    per_layer = [4 * h + m.activation_bytes + f.activation_bytes for m, f in _layer_costs(cfg, seq_len)]
    layers = len(per_layer) * 2 * h + max(per_layer) if activation_checkpointing else sum(per_layer)
    head = 4 * h + cfg.vocab_size * 6
    out = {"weights": 4 * n / shards, "gradients": 4 * n / shards, "optimizer": 8 * n / shards,
           "activations": tokens * (layers + head)}
    out["total"] = sum(out.values())
    return {k: v / GIB for k, v in out.items()}


# ---------------------------------------------------------------- plan


@dataclass
class PlanConfig:
    flops: float = 0  # training budget in FLOPs; 0 = from gpu_hours
    gpu_hours: float = 0  # total GPU-hours, summed over all GPUs
    gpu: str = "h100"  # GPU model (plan.GPUS): b200 h200 h100 a100 (80 GB) a100-40gb a10g l40s l4 t4 mi300x ...
    num_gpus: int = 1
    mfu: float = 0.4  # model FLOPs utilisation, PaLM convention
    seq_len: int = 2048
    micro_batch_size: int = 8  # sequences per GPU per forward, for activation memory
    preset: str = ""  # plan for this preset instead of the nearest one
    fsdp: bool = False  # shard weights, gradients and optimizer state over num_gpus
    activation_checkpointing: bool = False

    def validate(self, prefix: str = "") -> None:
        """Run by ``config.load``: GPU and preset names against their tables, and sizes that must be positive."""
        check_choice(f"{prefix}gpu", self.gpu, list(GPUS))
        if self.preset:
            check_choice(f"{prefix}preset", self.preset, list(PRESETS))
        check_min(self, prefix, 1, "num_gpus seq_len micro_batch_size")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"{prefix}mfu={self.mfu}: expected a fraction in (0, 1]")


def plan(cfg: PlanConfig) -> dict:
    gpu = lookup(GPUS, cfg.gpu, "GPU")
    flops_per_gpu_hour = gpu.peak_flops * cfg.mfu * 3600
    if cfg.flops <= 0 and cfg.gpu_hours <= 0:
        raise ValueError("plan: set flops or gpu_hours to a positive budget")
    budget = cfg.flops if cfg.flops > 0 else cfg.gpu_hours * flops_per_gpu_hour
    gpu_hours = budget / flops_per_gpu_hour
    rule = tokens_20x_optimal(budget)

    # Nearest in log-size to the 20-tokens optimum: Besiroglu et al. 2024 (arXiv 2404.10102) refit Chinchilla's
    # data and found the Approach 3 constants above mis-fitted; their refit agrees with about 20 tokens/param.
    sizes = {name: count_params(preset(name)).total for name in PRESETS}
    name = cfg.preset or min(sizes, key=lambda k: abs(math.log(sizes[k] / rule["params"])))
    model = preset(name)
    params = count_params(model)
    fpt = flops_per_token(model, cfg.seq_len)
    tokens = budget / fpt["train"]
    to_hours = fpt["train"] / (flops_per_gpu_hour * cfg.num_gpus)
    mem = memory_gib(model, cfg.seq_len, cfg.micro_batch_size, cfg.num_gpus, cfg.fsdp,
                     cfg.activation_checkpointing)
    mem["gpu_memory"] = gpu.memory_gib
    mem["fits"] = mem["total"] <= USABLE_MEMORY_FRACTION * gpu.memory_gib
    return {
        "budget": {"flops": budget, "gpu_hours": gpu_hours, "wall_hours": gpu_hours / cfg.num_gpus,
                   "gpu": cfg.gpu, "num_gpus": cfg.num_gpus, "peak_flops_per_gpu": gpu.peak_flops,
                   "mfu": cfg.mfu},
        "compute_optimal": {"chinchilla": chinchilla_optimal(budget), "tokens_20x": rule},
        "preset": {"name": name, "chosen": "given" if cfg.preset else "nearest",
                   "params_total": params.total, "params_non_embedding": params.non_embedding,
                   "params_active": params.active, "params_table": params.table,
                   "seq_len": cfg.seq_len, "train_flops_per_token": fpt["train"],
                   "train_flops_per_token_causal": fpt["train_causal"],
                   "attention_share": fpt["attention_share"], "tokens": tokens,
                   "tokens_per_param": tokens / params.total, "loss": chinchilla_loss(params.total, tokens),
                   "wall_hours": tokens * to_hours, "wall_hours_20x": 20 * params.total * to_hours},
        "memory_gib": mem,
        "memory_setup": {"micro_batch_size": cfg.micro_batch_size, "fsdp": cfg.fsdp,
                         "activation_checkpointing": cfg.activation_checkpointing},
    }


# ---------------------------------------------------------------- reports


def _si(x: float, unit: str, prefixes: str = " KMGTPEZY") -> str:
    i = 0
    while abs(x) >= 1000 and i < len(prefixes) - 1:
        x, i = x / 1000, i + 1
    return f"{x:.3g} {prefixes[i].strip()}{unit}".rstrip()


def _count(x: float) -> str:
    return _si(x, "", " KMBT")


def _table(rows: list[tuple[str, ...]], numeric: bool = True) -> list[str]:
    """Indented, aligned rows; the first column is a label, the rest are right-aligned when numeric."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i and numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def format_plan(result: dict) -> str:
    b, co, p = result["budget"], result["compute_optimal"], result["preset"]
    m, ms = result["memory_gib"], result["memory_setup"]
    on = f"{b['num_gpus']} x {b['gpu']} at {b['mfu']:.0%} MFU"
    lines = ["Budget"] + _table([
        ("compute", _si(b["flops"], "FLOP")),
        ("GPU", f"{b['gpu']}: {m['gpu_memory']:g} GiB, {_si(b['peak_flops_per_gpu'], 'FLOP/s')} dense bf16 peak"),
        ("GPU-hours", f"{b['gpu_hours']:,.1f} h ({on})"),
        ("wall time", f"{b['wall_hours']:,.1f} h"),
    ], numeric=False)
    lines += ["", "Compute-optimal (Hoffmann et al. 2022)"] + _table([
        ("", "params", "tokens", "tokens/param", "Chinchilla-fit loss*"),
        *((label, _count(r["params"]), _count(r["tokens"]), f"{r['tokens'] / r['params']:.1f}", f"{r['loss']:.3f}")
          for label, r in (("Approach 3 fit", co["chinchilla"]), ("20 tokens/param", co["tokens_20x"])))
    ]) + [f"  * {LOSS_NOTE}"]
    how = "as requested" if p["chosen"] == "given" else "nearest to the 20 tokens/param size"
    lines += ["", f"Preset {p['name']} ({how})"] + _table([
        ("params", f"{_count(p['params_total'])} total, {_count(p['params_non_embedding'])} non-embedding"
                   + (f", {_count(p['params_active'])} active per token" if p["params_active"] != p["params_total"]
                      else "") + (f", {_count(p['params_table'])} in Engram tables" if p.get("params_table") else "")),
        ("train FLOPs/token", f"{_si(p['train_flops_per_token'], 'FLOP')} at seq {p['seq_len']} "
                              f"(attention {p['attention_share']:.1%}; causal-only "
                              f"{_si(p['train_flops_per_token_causal'], 'FLOP')})"),
        ("tokens affordable", f"{_count(p['tokens'])} ({p['tokens_per_param']:.1f} tokens/param, "
                              f"Chinchilla-fit loss* {p['loss']:.3f})"),
        ("wall time", f"{p['wall_hours']:,.1f} h on {on}; 20 tokens/param takes {p['wall_hours_20x']:,.1f} h"),
    ], numeric=False)
    setup = (f"micro batch {ms['micro_batch_size']} x {p['seq_len']}, {'FSDP' if ms['fsdp'] else 'no FSDP'}, "
             f"{'with' if ms['activation_checkpointing'] else 'no'} activation checkpointing")
    verdict = "fits" if m["fits"] else "does NOT fit"
    lines += ["", f"Memory per GPU ({setup})"] + _table([
        ("weights (fp32)", f"{m['weights']:8.2f} GiB"),
        ("gradients (fp32)", f"{m['gradients']:8.2f} GiB"),
        ("AdamW state (2 x fp32)", f"{m['optimizer']:8.2f} GiB"),
        ("activations (bf16)", f"{m['activations']:8.2f} GiB"),
        ("total", f"{m['total']:8.2f} GiB of {m['gpu_memory']:g} GiB on {b['gpu']}: {verdict} "
                  f"(counting {USABLE_MEMORY_FRACTION:.0%} as usable)"),
    ], numeric=False)
    return "\n".join(lines)


def format_presets() -> str:
    rows = [("preset", "d_model", "layers", "heads/kv", "ffn", "vocab", "total params", "non-embedding")]
    for name in PRESETS:
        cfg = preset(name)
        n = count_params(cfg)
        rows.append((name, str(cfg.d_model), str(cfg.num_layers), f"{cfg.attn.num_heads}/{cfg.attn.num_kv_heads}",
                     str(cfg.ffn_dim), str(cfg.vocab_size), f"{n.total:,}", f"{n.non_embedding:,}"))
    return "\n".join(_table(rows))
