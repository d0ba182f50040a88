"""Training and decoding speed of the ``10m`` preset against an equal-size nanoGPT-style GPT.

Training tokens/s counts forward + backward + optimizer step, after warm-up steps, as the median of timed
steps. Both models run under the same settings (batch, sequence, threads, dtype, compile), in fp32 and in
bf16 autocast, each with and without ``torch.compile`` (the whole model, as ``train/loop.py`` does; the
optimizer step stays eager). Both use ``torch.optim.AdamW(fused=True)`` where the device has the fused
kernel (ours through ``build_optimizer``), lr 3e-3, betas (0.9, 0.95), weight decay on matrices.
Decoding tokens/s runs ``generate_ids`` on batch 1 with and without the KV cache.

Two things move the numbers on a small shared CPU: other processes (the load average is printed; the models
take turns step by step so both see the same machine), and glibc's allocator, which maps every tensor of
32 MiB or more (the logits and their gradients) fresh from the OS on every step; on a VM those page faults
cost about 10 ms per 32 MiB. ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184`` in the environment
removes that cost for both models (nanoGPT's fp32 loss allocates more of them, so it gains more).
Never run in CI. Example: ``python benchmarks/train_throughput.py --quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt_ref import GPT, GPTConfig  # noqa: E402

from slmforge.config import TrainConfig, preset  # noqa: E402
from slmforge.model.lm import LM  # noqa: E402
from slmforge.serve.generate import generate_ids  # noqa: E402
from slmforge.train.optim import build_optimizer  # noqa: E402


def matched_gpt_config(cfg, num_params: int) -> GPTConfig:
    """Same vocab, d_model, depth and head count; the MLP width (a multiple of 64) that best matches ``num_params``."""
    base = GPTConfig(vocab_size=cfg.vocab_size, block_size=cfg.max_seq_len, d_model=cfg.d_model,
                     num_layers=cfg.num_layers, num_heads=cfg.attn.num_heads, mlp_hidden=0)
    fixed = (cfg.vocab_size + cfg.max_seq_len) * cfg.d_model + cfg.d_model  # wte (tied), wpe, ln_f
    per_layer = 4 * cfg.d_model**2 + 2 * cfg.d_model  # attention, two LayerNorms
    mlp = (num_params - fixed - cfg.num_layers * per_layer) / (2 * cfg.d_model * cfg.num_layers)
    base.mlp_hidden = max(64, round(mlp / 64) * 64)
    return base


def build(name: str, cfg, gpt_cfg: GPTConfig, train_cfg: TrainConfig):
    torch.manual_seed(0)
    if name == "slmforge":
        model = LM(cfg)
        return model, build_optimizer(model, train_cfg)
    model = GPT(gpt_cfg)
    # nanoGPT's groups: decay on every matrix (the tied embedding included), none on gains.
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=train_cfg.lr_peak,
                            betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8, fused=True)
    return model, opt


def train_tokens_per_second(runs: dict, args, amp: bool, compile_model: bool, vocab: int) -> dict[str, float]:
    """runs: name -> (model, optimizer). The models take turns step by step, so a slow spell of a shared
    machine hits both alike."""
    step_fns = {name: torch.compile(model) if compile_model else model for name, (model, _) in runs.items()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, (_, opt) in runs.items():
            t0 = time.perf_counter()
            with autocast:
                _, loss = step_fns[name](inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: args.batch_size * args.seq_len / statistics.median(t) for name, t in times.items()}


def decode_tokens_per_second(model, args, use_cache: bool, repeats: int = 3) -> float:
    """New tokens per second of ``generate_ids`` (prefill included), the median of ``repeats`` runs."""
    prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    generate_ids(model, prompt, 8, use_cache=use_cache)  # warm-up
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate_ids(model, prompt, args.new_tokens, use_cache=use_cache)
        seconds.append(time.perf_counter() - t0)
    return args.new_tokens / statistics.median(seconds)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="10m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--quick", action="store_true", help="5 timed steps, 2 warm-up, 64 decoded tokens")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.new_tokens = min(args.steps, 5), min(args.warmup, 2), min(args.new_tokens, 64)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = preset(args.preset)
    train_cfg = TrainConfig()
    num_params = LM(cfg).num_params()
    gpt_cfg = matched_gpt_config(cfg, num_params)
    gpt_params = GPT(gpt_cfg).num_params()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size} x seq {args.seq_len}, {args.steps} timed steps after {args.warmup} warm-up, AdamW fused=True for both, "
          f"load average {os.getloadavg()[0]:.2f} (other processes on the CPU skew the numbers)\n")
    print("| model | layers | d_model | heads (kv) | FFN | parameters |")
    print("|---|---|---|---|---|---|")
    print(f"| slmforge {args.preset} | {cfg.num_layers} | {cfg.d_model} | {cfg.attn.num_heads} "
          f"({cfg.attn.num_kv_heads}) | SwiGLU {cfg.ffn_dim} | {num_params:,} |")
    print(f"| nanoGPT-style | {gpt_cfg.num_layers} | {gpt_cfg.d_model} | {gpt_cfg.num_heads} ({gpt_cfg.num_heads}) "
          f"| GELU {gpt_cfg.mlp_hidden} | {gpt_params:,} ({gpt_params / num_params - 1:+.1%}) |\n")

    print("| dtype | compile | slmforge tokens/s | nanoGPT tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for compile_model in [False] if args.skip_compile else [False, True]:
            torch._dynamo.reset()
            runs = {name: build(name, cfg, gpt_cfg, train_cfg) for name in ("slmforge", "nanogpt")}
            speeds = train_tokens_per_second(runs, args, dtype == "bf16", compile_model, cfg.vocab_size)
            ratio = speeds["slmforge"] / speeds["nanogpt"]
            print(f"| {dtype} | {'yes' if compile_model else 'no'} | {speeds['slmforge']:,.0f} "
                  f"| {speeds['nanogpt']:,.0f} | {ratio:.2f}x |", flush=True)

    if args.skip_decode:
        return
    torch.manual_seed(0)
    model = LM(cfg)
    print(f"\nDecoding (slmforge {args.preset}, fp32, eager, batch 1, prompt {args.prompt_len} + "
          f"{args.new_tokens} new tokens, greedy)\n")
    print("| KV cache | tokens/s |")
    print("|---|---|")
    speeds = {c: decode_tokens_per_second(model, args, c) for c in (True, False)}
    for use_cache, tps in speeds.items():
        print(f"| {'yes' if use_cache else 'no'} | {tps:,.1f} |")
    print(f"\ncache speed-up: {speeds[True] / speeds[False]:.2f}x; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
