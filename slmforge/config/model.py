"""Model configuration: the LM's sizes, the per-mixer sub-configs, OpenELM layer-wise scaling, and the presets.

Mixer and FFN names (``layers``, ``ffn``) are checked against the model's own tables by
``slmforge.model.block.check_model``: config imports nothing from ``slmforge.model``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from slmforge.config.loading import check_min, merge
from slmforge.registry import lookup


@dataclass
class AttnConfig:
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: num_heads must be a multiple; 1 = MQA, num_heads = MHA
    head_dim: int = 0  # 0 = d_model // num_heads
    rope_theta: float = 10000.0
    window: int = 0  # sliding-window size in tokens; 0 = full causal attention
    # Context extension (model/layers.py rope_tables): linear = position interpolation (Chen et al. 2023, arXiv
    # 2306.15595), ntk = NTK-aware base change, yarn = YaRN (Peng et al. 2023, arXiv 2309.00071); factor 1 = none.
    rope_scaling: Literal["none", "linear", "ntk", "yarn"] = "none"
    rope_factor: float = 1.0  # new context / original context
    rope_original_len: int = 0  # the context trained before scaling (yarn); 0 = max_seq_len / rope_factor
    yarn_beta_fast: float = 32.0  # yarn: dimensions turning more than this many times in the original context keep
    yarn_beta_slow: float = 1.0  # their frequency; fewer than this are interpolated by rope_factor; a ramp between


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
class MoEConfig:
    # DeepSeekMoE FFN (slmforge/model/moe.py, arXiv 2401.06066): fine-grained routed experts, top_k per token, plus
    # num_shared always-on experts; aux-loss-free balancing by a per-expert selection bias (DeepSeek-V3, 2412.19437).
    num_experts: int = 8  # routed experts
    num_shared: int = 1  # shared experts, always on (one SwiGLU of num_shared * expert_hidden units)
    top_k: int = 2  # routed experts per token
    expert_hidden: int = 0  # hidden units per expert; 0 = ffn_dim // (top_k + num_shared): the dense FFN's active size
    gate: Literal["softmax", "sigmoid"] = "sigmoid"  # sigmoid: V3 (top-k weights normalised); softmax: DeepSeekMoE
    bias_update_rate: float = 1e-3  # selection bias += rate * sign(mean load - load) per optimizer step; 0 = off
    seq_aux_loss: float = 0.0  # weight of V3's sequence-wise balance loss (0 = none)


@dataclass
class FlexMoEConfig:
    # FlexOlmo (slmforge/model/flexmoe.py, arXiv 2507.07024): the base FFN (the anchor expert) plus one expert FFN of
    # the same size per data source, routed by fixed per-expert router embeddings; written by `slmforge flex`.
    sources: str = ""  # comma-separated names of the expert FFNs beside the anchor, in router order; "" = the base
    top_k: int = 2  # experts per token, the anchor among the candidates; 0 = all
    # The router's input: the token's FFN input, or the causal running mean of the sequence's FFN inputs so far (a
    # document's domain is the document's: the router reads the context), started with context_prior pseudo-tokens
    # of the public data's mean, so a sequence's first tokens stay with the anchor until the context says otherwise.
    router_input: Literal["token", "context"] = "context"
    context_prior: float = 16.0


@dataclass
class DSAConfig:
    # DeepSeek Sparse Attention (slmforge/model/dsa.py, DeepSeek-V3.2-Exp): the main attention is `attn`'s; a
    # lightning indexer I_ts = sum_j w_tj ReLU(q_tj . k_s) (index_heads heads of index_dim) picks top_k keys per query.
    index_heads: int = 4
    index_dim: int = 32  # even (RoPE)
    top_k: int = 64  # keys each query attends to in sparse mode
    # dense: the warm-up (full attention; the indexer learns the attention's distribution by KL); sparse: top-k
    mode: Literal["dense", "sparse"] = "sparse"
    kl_weight: float = 1.0  # weight of the indexer's KL loss (trains only the indexer; 0 = off)
    # > 1: the KL's target is the attention's distribution flattened to p^(1/T), renormalised: the same ranking, so
    # the same top-k, but the far tail's keys (where the top-k boundary lies) weigh more; 1 = the paper's KL
    kl_temperature: float = 1.0
    block: int = 256  # query and key block length of the chunked implementation
    # mode=sparse: the run's first dense_steps optimizer steps are the dense warm-up, so warm-up and sparse training
    # share one run, one optimizer state and one learning-rate schedule (0 = sparse from the first step)
    dense_steps: int = 0


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


@dataclass
class VisionConfig:
    # LLaVA's stage-1 projector (slmforge/model/vision.py, arXiv 2304.08485): a frozen vision encoder's patch features
    # (feature_dim each) are mapped to d_model and spliced into the sequence at the image slots; 0 = no vision part.
    feature_dim: int = 0
    projector: Literal["linear", "mlp"] = "linear"  # mlp: LLaVA-1.5's Linear-GELU-Linear
    num_tokens: int = 17  # image slots per image: the encoder's patch features (and summary), what the encoder gives
    # How an image and its text sit in the sequence: plain (LLaVA's stage-1 template: the image slots, then the
    # text, ended by a newline; for a base model that never saw the chat tokens) or chat (the slots at the front of
    # the user's turn; for a chat-tuned model)
    template: Literal["plain", "chat"] = "plain"


@dataclass
class EngramConfig:
    # Engram conditional memory (slmforge/model/engram.py, Cheng et al., arXiv 2601.07372): hashed n-gram embedding
    # tables read at chosen layers, gated by the hidden state, added to the residual; "" layers = off.
    layers: str = ""  # comma-separated 0-based layers that get a memory before their block ("1", "1,3")
    max_order: int = 3  # n-grams of orders 2..max_order of the compressed token ids
    num_heads: int = 2  # hash heads (tables) per order
    table_rows: int = 4093  # rows per table: each table gets its own prime at or above this
    dim: int = 16  # embedding width per table; the memory vector is (max_order - 1) * num_heads * dim wide
    kernel: int = 4  # the depthwise causal convolution's width (dilated by max_order)
    offload: bool = False  # tables stay in host memory when the model moves to an accelerator

    def layer_ids(self) -> list[int]:
        return sorted({int(p) for p in self.layers.split(",") if p.strip()})


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
    # attn, ssm (Mamba-2), linear (gated linear attention), hymba (attention and SSM heads side by side),
    # dsa (DeepSeek sparse attention: top-k keys per query picked by a lightning indexer).
    # Names are checked against the model's tables by slmforge.model.block.check_model (config cannot import model).
    layers: str = "attn"
    # FFN per unique block, a comma-separated pattern tiled like `layers`: dense (SwiGLU), moe ("dense,moe", ...).
    ffn: str = "dense"
    init_std: float = 0.02
    attn: AttnConfig = field(default_factory=AttnConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    hymba: HymbaConfig = field(default_factory=HymbaConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    dsa: DSAConfig = field(default_factory=DSAConfig)
    flexmoe: FlexMoEConfig = field(default_factory=FlexMoEConfig)
    # Parameter sharing. num_layers is always the depth (layer applications); the parameters live in
    # num_layers / block_repeat unique blocks, and the `layers` pattern is tiled over the unique blocks.
    share_ffn: bool = False  # MobiLlama (arXiv 2402.16840): one FFN shared by every layer
    block_repeat: int = 1  # MobileLLM (arXiv 2402.14905): each unique block runs this many times in a row
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)  # conditional memory; off by default

    def validate(self, prefix: str = "model.") -> None:
        """Sizes that would otherwise fail deep in the model code; mixer and FFN names: ``model.block.check_model``."""
        check_min(self, prefix, 1, "vocab_size d_model num_layers max_seq_len block_repeat attn.num_heads "
                                   "attn.num_kv_heads ssm.state_dim ssm.head_dim ssm.expand ssm.conv_kernel "
                                   "ssm.chunk_size linear.num_heads linear.decay_rank linear.chunk_size")
        check_min(self, prefix, 0, "ffn_hidden attn.head_dim attn.window hymba.window moe.num_shared moe.expert_hidden "
                                   "moe.bias_update_rate moe.seq_aux_loss")
        check_min(self, prefix, 1, "moe.num_experts moe.top_k dsa.index_heads dsa.index_dim dsa.top_k dsa.block")
        check_min(self, prefix, 0, "dsa.kl_weight dsa.dense_steps attn.rope_original_len")
        check_min(self, prefix, 1, "dsa.kl_temperature")
        check_min(self, prefix, 1, "attn.rope_factor")
        check_min(self, prefix, 0, "vision.feature_dim")
        check_min(self, prefix, 1, "vision.num_tokens")
        self._validate_engram(prefix)
        if self.dsa.dense_steps and self.dsa.mode == "dense":
            raise ValueError(f"{prefix}dsa.dense_steps={self.dsa.dense_steps}: a warm-up before sparse training; "
                             f"with dsa.mode=dense every step is dense (set dsa.mode=sparse or dense_steps=0)")
        if self.dsa.index_dim % 2:
            raise ValueError(f"{prefix}dsa.index_dim={self.dsa.index_dim}: expected an even number (RoPE)")
        if self.moe.top_k > self.moe.num_experts:
            raise ValueError(f"{prefix}moe.top_k={self.moe.top_k}: expected at most "
                             f"{prefix}moe.num_experts={self.moe.num_experts}")
        if self.share_ffn and len({p.strip() for p in self.ffn.split(",") if p.strip()}) > 1:
            raise ValueError(f"{prefix}ffn={self.ffn!r} with {prefix}share_ffn: one shared FFN has one kind; "
                             f"give a single name")
        if self.num_layers % self.block_repeat:
            raise ValueError(f"{prefix}num_layers={self.num_layers}: expected a multiple of "
                             f"{prefix}block_repeat={self.block_repeat}")
        if self.attn.num_heads % self.attn.num_kv_heads:
            raise ValueError(f"{prefix}attn.num_heads={self.attn.num_heads}: expected a multiple of "
                             f"{prefix}attn.num_kv_heads={self.attn.num_kv_heads}")

    def _validate_engram(self, prefix: str) -> None:
        check_min(self, prefix, 2, "engram.max_order engram.table_rows")
        check_min(self, prefix, 1, "engram.num_heads engram.dim engram.kernel")
        try:
            ids = self.engram.layer_ids()
        except ValueError:
            ids = [-1]
        if any(not 0 <= i < self.num_layers for i in ids):
            raise ValueError(f"{prefix}engram.layers={self.engram.layers!r}: expected comma-separated layer numbers "
                             f"in 0..{self.num_layers - 1}")

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

    def block_ffns(self) -> list[str]:
        """The FFN of each unique block: the ``ffn`` pattern tiled like ``layers``."""
        pattern = [p.strip() for p in self.ffn.split(",") if p.strip()] or [self.ffn]
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
    return merge(ModelConfig(), lookup(PRESETS, name, "preset"), where=f"preset {name}")
