"""Greedy decoding speed: our ``generate_ids`` against transformers' ``generate`` on the same exported model.

The model has SmolLM2-135M's shape (d_model 576, 30 layers, 9 heads, 3 kv heads, FFN 1536, vocab 49152, tied
embeddings, RoPE theta 1e5) and random weights. It is written with ``export_hf`` and loaded back as a
``LlamaForCausalLM``, so both sides run the very same weights (float32, then cast to bf16 for the bf16 rows). For each batch size both generate
``--new-tokens`` tokens after a ``--prompt-len`` random prompt, with EOS disabled so every row runs to the end.
Prefill is timed on its own (a 1-token generation); decode tokens/s = batch * (new - 1) / (total - prefill).
The two take turns run by run, so a slow spell of a shared machine hits both alike, and the fastest of
``--repeats`` runs is reported (as ``timeit`` does: noise only ever adds time), with the fraction of generated
tokens on which the two agree (near-ties of random logits can flip).
Never run in CI. Example: ``python benchmarks/decode.py`` (``--quick`` for a 4-layer smoke run).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time

import torch

from slmforge.config import AttnConfig, ModelConfig
from slmforge.model.lm import LM
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--quick", action="store_true", help="4 layers instead of 30")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], nargs="+", default=["fp32", "bf16"],
                    help="weights and activations of both engines (bf16: the usual inference dtype; on a CPU with "
                         "AVX512-BF16 both reach oneDNN's bf16 kernels)")
    ap.add_argument("--json", default="", help="also write the numbers here")
    args = ap.parse_args()
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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {model32.num_params() / 1e6:.1f}M "
          f"parameters, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; load average {load[0]:.2f}")
    results = []
    for dtype_name, batch in [(d, b) for d in args.dtype for b in args.batch]:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        model, hf = (model32, hf32) if dtype == torch.float32 else (copy.deepcopy(model32).to(dtype),
                                                                    copy.deepcopy(hf32).to(dtype))
        prompt = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))
        runs = engines(model, hf, args.prompt_len)
        times = {name: {"prefill": [], "total": []} for name in runs}
        outputs = {}
        for name, fn in runs.items():  # warm-up
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
        results.append(row)
    load.append(os.getloadavg()[0])
    print(f"load average at the end: {load[1]:.2f} ({os.cpu_count()} CPUs)")
    print("\n| dtype | batch | engine | prefill s | decode tokens/s | end-to-end tokens/s |\n|---|---|---|---|---|---|")
    for row in results:
        for name in ("slmforge", "transformers"):
            r = row[name]
            print(f"| {row['dtype']} | {row['batch']} | {name} | {r['prefill_s']:.3f} | "
                  f"{r['decode_tokens_per_second']:.1f} | {r['end_to_end_tokens_per_second']:.1f} |")
        speedup = row["slmforge"]["decode_tokens_per_second"] / row["transformers"]["decode_tokens_per_second"]
        print(f"| {row['dtype']} | {row['batch']} | **speed-up** | | **{speedup:.2f}x** | "
              f"(same greedy tokens: {row['agree']:.0%}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "args": vars(args), "load_average": load, "results": results},
                      f, indent=2)


if __name__ == "__main__":
    main()
