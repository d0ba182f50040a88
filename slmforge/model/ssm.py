"""Mamba-2 selective state-space mixer (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060).

in_proj -> (z gate, x, B, C, dt); a short causal depthwise conv1d and SiLU over x, B and C; the selective scan
(``ops/scan.py``) with an input-dependent step dt = softplus(dt + dt_bias) and one decay rate A = -exp(A_log) per
head; the D skip; the gated RMSNorm  norm(y * silu(z))  and out_proj. B and C form one group shared by all heads.
Training and prefill run ``ssd_chunked`` (on CUDA, mamba-ssm's kernel when installed: ``ops/kernels.py``);
decoding (T = 1) runs the recurrence ``ssd_ref``. The cache holds the conv's last k-1 inputs and the SSM state,
both of fixed size. Left padding (a batch of prompts of different lengths) enters as zero conv inputs and dt = 0,
which leaves both as they are.
Shapes: b batch, T time, d d_model, E inner width, H heads, P head dim (E = H P), N state size, k conv kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slmforge.config import ModelConfig
from slmforge.model.cache import RecurrentCache
from slmforge.model.cost import LayerCost
from slmforge.model.layers import RMSNorm, init_linear, linear
from slmforge.model.ops import ssd_ref
from slmforge.model.ops.scan import checkpoint_blocks, recompute_block, use_recompute
from slmforge.model.ops.kernels import ssd_scan


class SSMHeads(nn.Module):
    """The SSM mixer up to its output projection: (b, T, d) -> gated, normalised heads (b, T, E).

    ``SSM`` adds the output projection; Hymba (``hymba.py``) runs these heads beside attention heads.
    """

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        s = cfg.ssm
        if width % s.head_dim:
            raise ValueError(f"SSM inner width {width} must be a multiple of ssm.head_dim={s.head_dim}")
        if s.conv_kernel < 1 or s.chunk_size < 1:
            raise ValueError(f"ssm.conv_kernel={s.conv_kernel} and ssm.chunk_size={s.chunk_size} must be >= 1")
        self.width, self.head_dim, self.state_dim = width, s.head_dim, s.state_dim
        self.num_heads = width // s.head_dim
        self.conv_kernel, self.chunk_size, self.fast_kernels = s.conv_kernel, s.chunk_size, cfg.fast_kernels
        conv_dim = width + 2 * s.state_dim  # x, B and C go through the conv
        # One fused projection for z, x, B, C and dt: a single larger matmul beats five small ones.
        self.in_proj = nn.Linear(cfg.d_model, width + conv_dim + self.num_heads, bias=False)
        self.conv = nn.Conv1d(conv_dim, conv_dim, s.conv_kernel, groups=conv_dim)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = RMSNorm(width, cfg.norm_eps)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        init_linear(self.in_proj, std)
        self.conv.reset_parameters()
        # Mamba-2's init: softplus(dt_bias) log-uniform in [1e-3, 1e-1], A uniform in [1, 16], D = 1.
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def init_cache(self, batch_size: int, max_len: int, device, dtype) -> RecurrentCache:
        # max_len is not needed: the state has the same size at every length.
        state = torch.zeros(batch_size, self.num_heads, self.head_dim, self.state_dim, device=device,
                            dtype=torch.promote_types(dtype, torch.float32))
        conv = torch.zeros(batch_size, self.conv_kernel - 1, self.conv.in_channels, device=device, dtype=dtype)
        return RecurrentCache(state, conv)

    def forward(self, x: torch.Tensor, cache: RecurrentCache | None = None) -> torch.Tensor:
        t = x.shape[1]
        if cache is None and use_recompute(None, t, x, self.A_log):
            # Training on a long sequence (CPU): blocks of the whole mixer under checkpointing, the conv's last
            # inputs and the SSM state carried between them; backward recomputes one block at a time.
            y, _ = checkpoint_blocks(self._step, (x,), 1, (None, None), recompute_block(self.chunk_size))
            return y
        y, conv, state = self._step(x, None if cache is None else cache.conv, None if cache is None else cache.state,
                                    None if cache is None else cache.pad_mask(t))
        if cache is not None:
            cache.conv.copy_(conv)
            cache.state.copy_(state)
            cache.pos += t
        return y

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        """After the gated norm: nothing here; ``SSM`` adds its output projection."""
        return y

    def _step(self, x: torch.Tensor, conv_in: torch.Tensor | None, initial: torch.Tensor | None,
              pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixer over x (b, T, d) after the conv's last k-1 inputs ``conv_in`` (None: zeros) and the state
        ``initial`` (None: zeros). Returns the output, the conv's last k-1 inputs and the final state."""
        b, t, _ = x.shape
        h, p, n = self.num_heads, self.head_dim, self.state_dim
        z, xbc, dt = linear(x, self.in_proj.weight).split([self.width, self.width + 2 * n, h], dim=-1)
        if pad is not None:
            # Padding (b, T) leaves the row as if it were absent: zero conv inputs (the conv window an unpadded row
            # starts from), and below dt = 0, so the state decays by exp(0) = 1 and takes in nothing.
            xbc = xbc.masked_fill(pad[:, :, None], 0.0)
        # Causal depthwise conv over time, (b, T, ch) -> (b, T, ch), after the previous k-1 inputs.
        if conv_in is None:
            padded = F.pad(xbc, (0, 0, self.conv_kernel - 1, 0))
        else:
            padded = torch.cat([conv_in.to(xbc.dtype), xbc], dim=1)  # (b, k-1+T, ch)
        conv = F.conv1d(padded.transpose(1, 2), self.conv.weight, self.conv.bias, groups=self.conv.in_channels)
        xs, B, C = F.silu(conv.transpose(1, 2)).split([self.width, n, n], dim=-1)
        xs = xs.view(b, t, h, p)
        dt = F.softplus(dt + self.dt_bias)  # (b, T, H)
        if pad is not None:
            dt = dt.masked_fill(pad[:, :, None], 0.0)
        A = -torch.exp(self.A_log)  # (H,)
        # The scan runs in float32 at least, also under bf16 autocast: exponentials of long sums need it.
        with torch.autocast(x.device.type, enabled=False):
            if t == 1 and initial is not None:  # decoding
                y, state = ssd_ref(xs, dt, A, B, C, initial)
            else:
                y, state = ssd_scan(xs, dt, A, B, C, self.chunk_size, initial, self.fast_kernels)
        y = y + self.D[:, None] * xs  # (b, T, H, P)
        y = self._project(self.norm(y.reshape(b, t, self.width) * F.silu(z)))
        return y, padded[:, padded.shape[1] - (self.conv_kernel - 1) :], state

    @staticmethod
    def heads_cost(cfg: ModelConfig, width: int, seq_len: int) -> LayerCost:
        """Per-token cost of SSMHeads of inner width ``width``: everything up to the output projection."""
        s = cfg.ssm
        heads, n, chunk = width // s.head_dim, s.state_dim, min(s.chunk_size, seq_len)
        conv_dim = width + 2 * n  # x, B, C
        proj = cfg.d_model * (width + conv_dim + heads)  # in_proj: z, x, B, C, dt
        params = proj + conv_dim * (s.conv_kernel + 1) + 3 * heads + width  # conv weight+bias, dt_bias/A_log/D, norm
        # Chunked scan per token: the C.B scores and their use on x within a chunk, the state each token adds and
        # the state it reads, and the conv. It grows with the chunk length, not the context.
        scan = 2 * chunk * (n + width) + 2 * 2 * width * n + 2 * s.conv_kernel * conv_dim
        # Saved (bf16): the input, the in_proj output, the conv output, the gated and the normed output; in fp32 the
        # scan output and the decay mask within a chunk (chunk values per head).
        act = 2 * (cfg.d_model + width + conv_dim + heads + conv_dim + 2 * width) + 4 * width + 4 * heads * chunk
        return LayerCost(params, proj, scan, scan, act)

    @staticmethod
    def heads_state_bytes(cfg: ModelConfig, width: int, nbytes: int) -> int:
        """Bytes of ``init_cache`` for one sequence, the same at every length: the state (H, P, N), kept in at least
        float32, and the conv's last k-1 inputs (k-1, x + B + C channels)."""
        s = cfg.ssm
        state = (width // s.head_dim) * s.head_dim * s.state_dim * max(nbytes, 4)
        conv = (s.conv_kernel - 1) * (width + 2 * s.state_dim) * nbytes
        return state + conv


class SSM(SSMHeads):
    """The Mamba-2 mixer: ``SSMHeads`` of width expand * d_model, then out_proj. (b, T, d) -> (b, T, d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.ssm.expand * cfg.d_model)
        self.out_proj = nn.Linear(self.width, cfg.d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        super().reset_parameters(std)
        init_linear(self.out_proj, out_std)

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        return linear(y, self.out_proj.weight)

    @staticmethod
    def cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
        """Parameters, FLOPs and saved activations per token (``model/cost.py``): the heads, then out_proj."""
        width = cfg.ssm.expand * cfg.d_model
        out = width * cfg.d_model
        return SSMHeads.heads_cost(cfg, width, seq_len) + LayerCost(out, out)

    @staticmethod
    def state_bytes(cfg: ModelConfig, tokens: int, nbytes: int) -> int:
        return SSMHeads.heads_state_bytes(cfg, cfg.ssm.expand * cfg.d_model, nbytes)
