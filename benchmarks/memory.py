"""Memory and speed of each token mixer against sequence length: training peak, decoding state, tokens/s.

For each mixer (attention, SSM, gated linear attention, Hymba, and the interleaved hybrid attn,ssm,ssm) and each
length, one batch-1 sequence goes through forward + backward (loss and all gradients), and we report
- peak memory of forward + backward above what the model and its input already hold: on CPU the peak resident
  set (Linux VmHWM, reset through /proc/self/clear_refs just before the step) in a fresh subprocess per point, so
  no point inherits another's allocator state; on CUDA ``torch.cuda.max_memory_allocated``;
- decoding-state bytes per sequence in bf16 (``slmforge.info.state_bytes``, equal to the real caches'
  tensor sizes, checked in tests/test_info.py): attention's KV cache grows with the length, the SSM and
  linear-attention states do not;
- tokens/s of forward + backward (the fastest of ``--repeats`` steps, after a short warm-up).
Prints a markdown table and writes memory.json and memory.png (log-log, one line per mixer) to ``--out``.
The default model (d_model 256, 3 layers, vocab 512, fp32) needs a few GB at 16k tokens on CPU.
Never run in CI. Example: ``python benchmarks/memory.py`` (``--quick`` for a smoke run of a few seconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MIXERS = {"attention": "attn", "ssm": "ssm", "linear": "linear", "hymba": "hymba", "hybrid": "attn,ssm,ssm"}
LENGTHS = [1024, 2048, 4096, 8192, 16384]


def bench_config(layers: str, seq_len: int, d_model: int = 256, num_layers: int = 3):
    from slmforge.config import AttnConfig, ModelConfig

    return ModelConfig(vocab_size=512, d_model=d_model, num_layers=num_layers, max_seq_len=seq_len, layers=layers,
                       attn=AttnConfig(num_heads=max(1, d_model // 64), num_kv_heads=max(1, d_model // 128)))


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (CPU peak memory needs Linux)")


def measure_point(cfg, seq_len: int, device: str = "cpu", dtype: str = "fp32", repeats: int = 1) -> dict:
    """Forward + backward of one (1, seq_len) sequence in this process: peak bytes above the model and seconds.

    Run it in a fresh process (``measure``): the CPU peak is a process-wide high-water mark.
    """
    import gc

    import torch

    from slmforge.model.lm import LM

    torch.manual_seed(0)
    model = LM(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len + 1), device=device)
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=dtype == "bf16")

    def step(t: int) -> float:
        model.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            _, loss = model(tokens[:, :t], targets=tokens[:, 1 : t + 1])
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step(min(seq_len, 64))  # warm-up: thread pools, kernels; small, so it leaves little memory behind
    # torch.utils.checkpoint (the recurrent mixers' recompute on long sequences) imports torch._dynamo on its first
    # call: ~1 s and ~75 MiB of code, once per process whatever the length. Loaded here, before the baseline, so that
    # the peak is the step's own memory.
    import torch._dynamo  # noqa: F401
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = [step(seq_len)]
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        seconds = [step(seq_len)]
        peak = (_proc_kib("VmHWM") - base) * 1024
    seconds += [step(seq_len) for _ in range(repeats - 1)]
    return {"peak_bytes": peak, "seconds": min(seconds), "tokens_per_second": seq_len / min(seconds)}


def measure(cfg, seq_len: int, device: str = "cpu", dtype: str = "fp32", repeats: int = 1,
            timeout_s: float | None = None) -> dict:
    """``measure_point`` in a fresh Python process; an out-of-memory or a crash comes back as ``{"error": ...}``."""
    from slmforge.config import to_dict

    point = json.dumps({"cfg": to_dict(cfg), "seq_len": seq_len, "device": device, "dtype": dtype,
                        "repeats": repeats})
    try:
        proc = subprocess.run([sys.executable, __file__, "--point", point], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_point(point: str) -> None:
    from slmforge.config import ModelConfig, from_dict

    p = json.loads(point)
    print(json.dumps(measure_point(from_dict(ModelConfig, p["cfg"]), p["seq_len"], p["device"], p["dtype"],
                                   p["repeats"])))


def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def format_table(rows: list[dict]) -> str:
    lines = ["| mixer | tokens | peak fwd+bwd (MiB) | decoding state, bf16 (MiB) | tokens/s fwd+bwd |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mixer']} | {r['tokens']:,} | {r['error']} | {_mib(r['state_bytes'])} | |")
        else:
            lines.append(f"| {r['mixer']} | {r['tokens']:,} | {_mib(r['peak_bytes'])} | {_mib(r['state_bytes'])} | "
                         f"{r['tokens_per_second']:,.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mixer in dict.fromkeys(r["mixer"] for r in rows):
        mine = [r for r in rows if r["mixer"] == mixer]
        ok = [r for r in mine if "error" not in r]
        axes[0].plot([r["tokens"] for r in ok], [r["peak_bytes"] / 2**20 for r in ok], "o-", label=mixer)
        axes[1].plot([r["tokens"] for r in mine], [r["state_bytes"] / 2**20 for r in mine], "o-", label=mixer)
    for ax, title in zip(axes, ("training: peak memory of forward + backward", "decoding state per sequence (bf16)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="MiB", title=title)
        lengths = sorted({r["tokens"] for r in rows})
        ax.set_xticks(lengths, [f"{t:,}" for t in lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--point", help=argparse.SUPPRESS)  # internal: one measurement in this (fresh) process
    ap.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS))
    ap.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_memory")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, 256 and 2,048 tokens (the latter with the recurrent mixers' recompute): a smoke run")
    args = ap.parse_args()
    if args.point:
        return _run_point(args.point)
    if args.quick:
        args.lengths, args.d_model, args.layers, args.repeats = [256, 2048], 64, 3, 1

    from tqdm import tqdm

    from slmforge.info import state_bytes
    from slmforge.runs import write_json

    rows = []
    points = [(m, t) for m in args.mixers for t in args.lengths]
    for mixer, tokens in tqdm(points, desc="memory benchmark"):
        cfg = bench_config(MIXERS[mixer], tokens, args.d_model, args.layers)
        result = measure(cfg, tokens, args.device, args.dtype, args.repeats)
        rows.append({"mixer": mixer, "layers": cfg.layers, "tokens": tokens,
                     "state_bytes": state_bytes(cfg, tokens, "bf16")["total"], **result})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"d_model": args.d_model, "num_layers": args.layers, "device": args.device, "dtype": args.dtype,
             "batch_size": 1, "repeats": args.repeats}
    write_json(out / "memory.json", {"setup": setup, "rows": rows})
    plot(rows, out / "memory.png")
    print(f"d_model {args.d_model}, {args.layers} layers, vocab 512, batch 1, {args.dtype} on {args.device}\n")
    print(format_table(rows))
    print(f"\nwrote {out / 'memory.json'} and {out / 'memory.png'}")


if __name__ == "__main__":
    main()
