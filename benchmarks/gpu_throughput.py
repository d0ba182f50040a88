"""Training tokens/s and MFU of the presets on one GPU, bf16 autocast, with and without torch.compile.

    python benchmarks/gpu_throughput.py --presets 100m 300m --seq-len 2048 --batch-size 8

MFU uses the exact training FLOPs per token from ``slmforge.plan.flops_per_token`` (PaLM convention,
full attention term) over the GPU's dense bf16 peak from ``slmforge.plan.GPUS``. Random token ids: this
measures the model and optimizer, not the data pipeline. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slmforge.config import TrainConfig, preset
from slmforge.model.lm import LM
from slmforge.plan import GPUS, flops_per_token
from slmforge.train import distributed
from slmforge.train.optim import build_optimizer


def measure(name: str, seq_len: int, batch_size: int, compile: bool, steps: int, warmup: int, ckpt: bool) -> dict:
    cfg = preset(name)
    device = torch.device("cuda")
    model = LM(cfg).to(device)
    train_model = distributed.parallelize(model, distributed.DistInfo(), "none", compile, ckpt, device)
    opt = build_optimizer(model, TrainConfig())
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train_model(x, targets=x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens_per_second = batch_size * seq_len / dt
    gpu_name = torch.cuda.get_device_name().lower()
    peak = next((g.peak_flops for k, g in GPUS.items() if k in gpu_name), float("nan"))
    mfu = flops_per_token(cfg, seq_len)["train"] * tokens_per_second / peak
    mem = torch.cuda.max_memory_allocated() / 2**30
    del model, train_model, opt
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return dict(preset=name, compile=compile, tokens_per_second=tokens_per_second, mfu=mfu, mem=mem)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["100m", "300m"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--activation-checkpointing", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_throughput.py needs a CUDA GPU; see benchmarks/train_throughput.py for the CPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, seq {args.seq_len}, "
          f"batch {args.batch_size}, bf16 autocast\n")
    print("| preset | compile | tokens/s | MFU | peak memory GiB |")
    print("|---|---|---:|---:|---:|")
    for name in args.presets:
        for compile in (False, True):
            r = measure(name, args.seq_len, args.batch_size, compile, args.steps, args.warmup,
                        args.activation_checkpointing)
            print(f"| {name} | {'on' if compile else 'off'} | {r['tokens_per_second']:,.0f} | {r['mfu']:.1%} | "
                  f"{r['mem']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
