"""Greedy decoding speed: our ``generate_ids`` against transformers' ``generate`` on the same exported model.

The model has SmolLM2-135M's shape (d_model 576, 30 layers, 9 heads, 3 kv heads, FFN 1536, vocab 49152, tied
embeddings, RoPE theta 1e5) and random weights. It is written with ``export_hf`` and loaded back as a
``LlamaForCausalLM``, so both sides run the very same weights (float32, then cast to bf16 for the bf16 rows). For each batch size both generate
``--new-tokens`` tokens after a ``--prompt-len`` random prompt, with EOS disabled so every row runs to the end.
Prefill is timed on its own (a 1-token generation); decode tokens/s = batch * (new - 1) / (total - prefill).
The two take turns run by run, so a slow spell of a shared machine hits both alike, and the fastest of
``--repeats`` runs is reported (as ``timeit`` does: noise only ever adds time), with the fraction of generated
tokens on which the two agree (near-ties of random logits can flip).
``--isa both`` runs the whole measurement twice, in child processes, natively and with AVX-512 hidden
(``AVX2_ENV``: oneDNN, MKL and numba's JIT use AVX2 code, slmforge's kernel choice measures again under its own
key; float32 only unless ``--dtype`` says otherwise) and prints both side by side, with the kernels
``model/ops/choice.py`` chose in each (measured in the warm-up, not timed).
Never run in CI. Example: ``python benchmarks/decode.py`` (``--quick`` for a 4-layer smoke run;
``python benchmarks/decode.py --isa both --quick`` for both settings).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from slmforge import AVX2_ENV  # AVX-512 hidden from torch's libraries, numba and slmforge
from slmforge.config import AttnConfig, ModelConfig
from slmforge.model.lm import LM
from slmforge.model.ops import choice, machine
from slmforge.serve.generate import generate_ids
from slmforge.serve.hf import export_hf

SMOLLM2_135M = ModelConfig(vocab_size=49152, d_model=576, num_layers=30, ffn_hidden=1536, max_seq_len=2048,
                           norm_eps=1e-5, tie_embeddings=True,
                           attn=AttnConfig(num_heads=9, num_kv_heads=3, rope_theta=100000.0))


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def engines(model, hf, prompt_len: int):
    def ours(prompt, new):
        return generate_ids(model, prompt, new)[:, prompt_len:]

    def theirs(prompt, new):
        out = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                          eos_token_id=None, attention_mask=torch.ones_like(prompt))
        return out[:, prompt_len:]

    return {"slmforge": ours, "transformers": theirs}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--quick", action="store_true", help="4 layers instead of 30")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=None,
                    help="weights and activations of both engines (bf16: the usual inference dtype; on a CPU with "
                         "AVX512-BF16 both reach oneDNN's bf16 kernels); default fp32 bf16, with --isa avx2/both fp32")
    ap.add_argument("--isa", choices=["native", "avx2", "both"], default="native",
                    help="avx2: in a child process with AVX-512 hidden; both: natively and so, side by side")
    ap.add_argument("--cached-kernels", action="store_true", help="reuse the kernel choices kept in the user's "
                    "cache (default: measure them afresh in this run, as a first run would; a busy machine's are noise)")
    ap.add_argument("--json", default="", help="also write the numbers here")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or (["fp32", "bf16"] if args.isa == "native" else ["fp32"])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.cached_kernels:  # children inherit it; machine.cache_dir() reads it at each use
        os.environ[machine.CACHE_ENV] = tempfile.mkdtemp(prefix="slmforge-kernels-")
        atexit.register(shutil.rmtree, os.environ[machine.CACHE_ENV], True)
    if args.isa != "native":
        settings = [("native", {})] * (args.isa == "both") + [("AVX-512 hidden", AVX2_ENV)]
        reports = [measure_in_child(args, label, env) for label, env in settings]
        print_header(reports, [label for label, _ in settings])
        print_side_by_side(reports, [label for label, _ in settings])
        report = {"settings": [label for label, _ in settings], "reports": reports}
    else:
        report = measure(args)
        print_header([report], ["native"])
        print_table(report["results"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def measure_in_child(args, label: str, env: dict) -> dict:
    """This script with ``--isa native``, run again with ``env`` added; its numbers come back as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--isa", "native", "--json", str(out),
               "--batch", *map(str, args.batch), "--dtype", *args.dtype, "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--cached-kernels"]  # the parent chose the cache folder
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd + ["--quick"] * args.quick, env={**os.environ, **env}, check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def measure(args) -> dict:
    from transformers import LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SMOLLM2_135M if not args.quick else dataclasses.replace(SMOLLM2_135M, num_layers=4)
    torch.manual_seed(0)
    model32 = LM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model32, tmp)
        hf32 = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    hf32.generation_config.eos_token_id = None
    # A busy shared machine slows both sides unevenly; the load average says how busy it was.
    load = [os.getloadavg()[0]]
    results = [measure_row(args, cfg, model32, hf32, dtype_name, batch)
               for dtype_name in args.dtype for batch in args.batch]
    load.append(os.getloadavg()[0])
    return {"config": dataclasses.asdict(cfg), "args": vars(args), "load_average": load, "results": results,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "num_params": model32.num_params(), "cpu": machine.cpu_model(),
            "flags": sorted(set(machine.KEY_FLAGS) & machine.cpu_flags()),
            "kernels": [dataclasses.asdict(c) for c in choice.measurements()]}


def measure_row(args, cfg, model32, hf32, dtype_name: str, batch: int) -> dict:
    """Both engines at one dtype and batch size: the best of ``--repeats`` runs, taken in turn."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model, hf = (model32, hf32) if dtype == torch.float32 else (copy.deepcopy(model32).to(dtype),
                                                                copy.deepcopy(hf32).to(dtype))
    prompt = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))
    runs = engines(model, hf, args.prompt_len)
    times = {name: {"prefill": [], "total": []} for name in runs}
    outputs = {}
    for name, fn in runs.items():  # warm-up (slmforge's kernel choice is measured here, the first time)
        fn(prompt, 2)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name]["prefill"].append(timed(lambda: fn(prompt, 1))[0])
            total, outputs[name] = timed(lambda: fn(prompt, args.new_tokens))
            times[name]["total"].append(total)
    agree = (outputs["slmforge"] == outputs["transformers"]).float().mean().item()
    row = {"dtype": dtype_name, "batch": batch, "agree": agree}
    for name, t in times.items():
        prefill, total = min(t["prefill"]), min(t["total"])
        row[name] = {"prefill_s": prefill, "total_s": total,
                     "decode_tokens_per_second": batch * (args.new_tokens - 1) / (total - prefill),
                     "end_to_end_tokens_per_second": batch * args.new_tokens / total}
    row["speedup"] = row["slmforge"]["decode_tokens_per_second"] / row["transformers"]["decode_tokens_per_second"]
    return row


def print_header(reports: list[dict], labels: list[str]) -> None:
    r = reports[0]
    args = r["args"]
    print(f"{r['cpu']}, torch {r['torch']}, {r['threads']} threads, {r['num_params'] / 1e6:.1f}M parameters, "
          f"prompt {args['prompt_len']}, {args['new_tokens']} new tokens, greedy")
    for label, rep in zip(labels, reports):
        load = " -> ".join(f"{x:.2f}" for x in rep["load_average"])
        print(f"{label}: ISA flags {' '.join(rep['flags']) or '-'}; load average {load} ({os.cpu_count()} CPUs); "
              f"kernels: {kernel_summary(rep['kernels'])}")


def kernel_summary(kernels: list[dict]) -> str:
    """The choices of model/ops/choice.py, counted per path and row class: ``decode 1: onednn x4, gemv x1``."""
    groups: dict[str, Counter] = {}
    for c in kernels:
        groups.setdefault(c["path"] if c["path"] == "train" else f"{c['path']} {c['rows']}", Counter())[c["kernel"]] += 1
    return "; ".join(f"{g}: " + ", ".join(f"{k} x{n}" for k, n in counts.most_common())
                     for g, counts in groups.items()) or "-"


def print_table(results: list[dict]) -> None:
    print("\n| dtype | batch | engine | prefill s | decode tokens/s | end-to-end tokens/s |\n|---|---|---|---|---|---|")
    for row in results:
        for name in ("slmforge", "transformers"):
            r = row[name]
            print(f"| {row['dtype']} | {row['batch']} | {name} | {r['prefill_s']:.3f} | "
                  f"{r['decode_tokens_per_second']:.1f} | {r['end_to_end_tokens_per_second']:.1f} |")
        print(f"| {row['dtype']} | {row['batch']} | **speed-up** | | **{row['speedup']:.2f}x** | "
              f"(same greedy tokens: {row['agree']:.0%}) |")


def print_side_by_side(reports: list[dict], labels: list[str]) -> None:
    """Decode tokens/s of both engines and the speed-up, one column per setting."""
    print("\n| dtype | batch | engine | " + " | ".join(f"decode tokens/s, {label}" for label in labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for rows in zip(*(rep["results"] for rep in reports)):
        head = f"| {rows[0]['dtype']} | {rows[0]['batch']} |"
        for name in ("slmforge", "transformers"):
            print(f"{head} {name} | " + " | ".join(f"{r[name]['decode_tokens_per_second']:.1f}" for r in rows) + " |")
        print(f"{head} **speed-up** | " + " | ".join(f"**{r['speedup']:.2f}x** (same tokens {r['agree']:.0%})"
                                                   for r in rows) + " |")


if __name__ == "__main__":
    main()
