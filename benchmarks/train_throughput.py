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
Utilisation is model FLOPs per second (``slmforge.plan.flops_per_token`` for slmforge, the same formula in
``GPT.flops_per_token`` for the reference: 2 per matmul weight, the tied head a matmul, the full s x s attention
term, training 3x the forward) over this CPU's float32 GEMM ceiling (``machine.gemm_flops``: the best of torch.mm
and oneDNN on square matmuls at torch's thread count), measured before and after the training rows, the better
taken. It is what ``slmforge train`` reports as ``mfu`` on a CPU. bf16 rows are against the same float32 ceiling.

``--isa both`` runs the whole measurement twice, in child processes, natively and with AVX-512 hidden
(``SLMFORGE_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``: oneDNN and MKL use AVX2 code, and
bf16 counts as not native), and prints the two side by side: fp32 eager, fp32 compiled and bf16 eager. On a CPU
without native bf16 a bf16 row times 1 warm-up and 2 steps (a step can take tens of seconds there).
Never run in CI. Examples: ``python benchmarks/train_throughput.py --quick``,
``python benchmarks/train_throughput.py --quick --isa both``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt_ref import GPT, GPTConfig  # noqa: E402

from slmforge import AVX2_ENV  # AVX-512 hidden from torch's libraries, numba and slmforge
from slmforge.config import TrainConfig, preset  # noqa: E402
from slmforge.model.lm import LM  # noqa: E402
from slmforge.model.ops import machine  # noqa: E402
from slmforge.plan import flops_per_token  # noqa: E402
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


def train_tokens_per_second(runs: dict, args, amp: bool, compile_model: bool, vocab: int, steps: int,
                            warmup: int) -> dict[str, float]:
    """runs: name -> (model, optimizer). The models take turns step by step, so a slow spell of a shared
    machine hits both alike."""
    step_fns = {name: torch.compile(model) if compile_model else model for name, (model, _) in runs.items()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, (_, opt) in runs.items():
            t0 = time.perf_counter()
            with autocast:
                _, loss = step_fns[name](inputs, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
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


BOTH_SETTINGS = "fp32,fp32+compile,bf16"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="10m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    p.add_argument("--dtypes", default="fp32,bf16", help="each with and without compile (see --settings)")
    p.add_argument("--settings", default="", help="rows to time, e.g. fp32,fp32+compile,bf16 (overrides --dtypes; "
                   f"--isa both defaults to {BOTH_SETTINGS})")
    p.add_argument("--isa", choices=("native", "avx2", "both"), default="native",
                   help="native: this CPU as it is; avx2: with AVX-512 hidden; both: the two side by side")
    p.add_argument("--gemm-size", type=int, default=1024, help="square matmul size of the GEMM ceiling")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=192)
    p.add_argument("--quick", action="store_true", help="5 timed steps, 2 warm-up, 64 decoded tokens")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--json", help=argparse.SUPPRESS)  # a child's results, for --isa avx2/both
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.new_tokens = min(args.steps, 5), min(args.warmup, 2), min(args.new_tokens, 64)
    if not args.settings:
        args.settings = BOTH_SETTINGS if args.isa == "both" else ",".join(
            f"{d}{c}" for d in args.dtypes.split(",") for c in ("", "+compile"))
    if args.skip_compile:
        args.settings = ",".join(s for s in args.settings.split(",") if not s.endswith("+compile"))
    return args


def machine_summary(args) -> dict:
    flags = sorted(set(machine.KEY_FLAGS) & machine.cpu_flags())
    return {"label": "AVX-512 hidden" if machine.avx512_hidden() else "native", "cpu": machine.cpu_model(),
            "threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": flags, "native_bf16": machine.native_bf16(), "gemm": [machine.gemm_flops(args.gemm_size)]}


def measure_rows(args, cfg, gpt_cfg, train_cfg) -> list[dict]:
    """tokens/s of both models for every setting; utilisation is added once the ceiling is final."""
    flops = {"slmforge": flops_per_token(cfg, args.seq_len)["train"],
             "nanogpt": GPT(gpt_cfg).flops_per_token(args.seq_len)}
    rows = []
    for setting in args.settings.split(","):
        dtype, _, compiled = setting.partition("+")
        steps, warmup = args.steps, args.warmup
        if dtype == "bf16" and not machine.native_bf16():  # emulated bf16: a step can take tens of seconds
            steps, warmup = min(steps, 2), min(warmup, 1)
        torch._dynamo.reset()
        runs = {name: build(name, cfg, gpt_cfg, train_cfg) for name in ("slmforge", "nanogpt")}
        speeds = train_tokens_per_second(runs, args, dtype == "bf16", bool(compiled), cfg.vocab_size, steps, warmup)
        rows.append({"dtype": dtype, "compile": bool(compiled), "steps": steps, "tokens_per_second": speeds,
                     "model_flops": {name: flops[name] * tps for name, tps in speeds.items()}})
        print(f"  {setting}: slmforge {speeds['slmforge']:,.0f} tokens/s, nanoGPT {speeds['nanogpt']:,.0f} "
              f"({steps} timed steps)", file=sys.stderr, flush=True)
    return rows


def print_machine(m: dict) -> None:
    ceiling = max(m["gemm"])
    print(f"{m['label']}: {m['cpu']}, {m['threads']} threads, torch CPU capability {m['capability']}, "
          f"native bf16 {'yes' if m['native_bf16'] else 'no'}; ISA flags: {' '.join(m['flags']) or '-'}")
    print(f"  fp32 GEMM ceiling {ceiling / 1e9:,.1f} GFLOP/s (best of torch.mm and oneDNN, square "
          f"{m['gemm_size']}; before / after the rows: {' / '.join(f'{g / 1e9:,.1f}' for g in m['gemm'])})")


def row_cells(row: dict, ceiling: float) -> list[str]:
    tps, fl = row["tokens_per_second"], row["model_flops"]
    return [f"{tps['slmforge']:,.0f}", f"{tps['nanogpt']:,.0f}", f"{tps['slmforge'] / tps['nanogpt']:.2f}x",
            f"{fl['slmforge'] / ceiling:.0%}", f"{fl['nanogpt'] / ceiling:.0%}"]


def print_table(results: list[dict]) -> None:
    """One table, the settings (native, AVX-512 hidden) side by side."""
    head = ["slmforge tokens/s", "nanoGPT tokens/s", "ratio", "slmforge of ceiling", "nanoGPT of ceiling"]
    cols = ["dtype", "compile"] + [f"{r['label']}: {h}" if len(results) > 1 else h for r in results for h in head]
    print("| " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * (len(cols) - 2))
    for i, row in enumerate(results[0]["rows"]):
        cells = [row["dtype"], "yes" if row["compile"] else "no"]
        for r in results:
            cells += row_cells(r["rows"][i], max(r["gemm"]))
        print("| " + " | ".join(cells) + " |", flush=True)


def measure_here(args) -> dict:
    cfg = preset(args.preset)
    train_cfg = TrainConfig()
    num_params = LM(cfg).num_params()
    gpt_cfg = matched_gpt_config(cfg, num_params)
    gpt_params = GPT(gpt_cfg).num_params()
    result = machine_summary(args)
    result["rows"] = measure_rows(args, cfg, gpt_cfg, train_cfg)
    result["gemm"].append(machine.gemm_flops(args.gemm_size))
    result.update(gemm_size=args.gemm_size, load=os.getloadavg()[0], models=[
        f"| slmforge {args.preset} | {cfg.num_layers} | {cfg.d_model} | {cfg.attn.num_heads} "
        f"({cfg.attn.num_kv_heads}) | SwiGLU {cfg.ffn_dim} | {num_params:,} |",
        f"| nanoGPT-style | {gpt_cfg.num_layers} | {gpt_cfg.d_model} | {gpt_cfg.num_heads} ({gpt_cfg.num_heads}) "
        f"| GELU {gpt_cfg.mlp_hidden} | {gpt_params:,} ({gpt_params / num_params - 1:+.1%}) |"])
    return result


def measure_in_child(argv: list[str], label: str, env: dict) -> dict:
    """This script, run again with ``env`` added (torch's libraries read the ISA when they load)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [a for a in argv if a not in ("--isa", "both", "avx2") and not a.startswith("--isa=")]
        cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--isa", "native", "--skip-decode",
               "--json", str(out)]
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def print_header(args, results: list[dict]) -> None:
    print(f"torch {torch.__version__}, batch {args.batch_size} x seq {args.seq_len}, {args.steps} timed steps after "
          f"{args.warmup} warm-up (median), AdamW fused=True for both, load average at the end "
          f"{' / '.join(format(r['load'], '.2f') for r in results)} (other processes on the CPU skew the numbers)\n")
    print("| model | layers | d_model | heads (kv) | FFN | parameters |")
    print("|---|---|---|---|---|---|")
    print("\n".join(results[0]["models"]) + "\n")
    for r in results:
        print_machine(r)
    print("\nutilisation: model FLOPs/s (same formula for both models) over the fp32 GEMM ceiling\n")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa != "native":
        if args.isa == "both":
            argv = argv + ["--settings", args.settings]
        runs = [("native", {})] * (args.isa == "both") + [("AVX-512 hidden", AVX2_ENV)]
        results = [measure_in_child(argv, label, env) for label, env in runs]
        print_header(args, results)
        print_table(results)
        return
    result = measure_here(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result))
        return
    print_header(args, [result])
    print_table([result])
    if not args.skip_decode:
        print_decode(args)


def print_decode(args) -> None:
    cfg = preset(args.preset)
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
