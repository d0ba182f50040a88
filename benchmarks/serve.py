"""Serving throughput of ``slmforge.serve.server``: requests/s and completion tokens/s at 1 and 8 concurrent clients.

The server runs in a child process (so the clients do not share its GIL) on a random-weight model of a preset
(``--preset tiny`` or ``10m``), with a byte-level BPE of the preset's vocabulary trained on TinyStories (cached
under runs/bench_serve/), or on a trained run folder (``--run``). asyncio clients send ``--requests`` requests
drawn in turn from a fixed set of 16 TinyStories prompts (14 to 200 characters), greedy, ``max_tokens`` fixed;
each client sends its next request as soon as it has its answer. Rows: max_batch 8 at concurrency 1 (the
single-client latency), max_batch 1 at concurrency 8 (one request at a time: the baseline), max_batch 8 at
concurrency 8 (batched). Completion tokens are the server's own count (``usage``); a random model can stop early
at EOS, but greedy answers are the same in every row, so the rows do the same work.
Never run in CI. Example: ``python benchmarks/serve.py --preset 10m`` (smoke: ``--requests 8 --max-tokens 8``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import time
from pathlib import Path

import httpx

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "validation_sample.txt"
CACHE = Path("runs/bench_serve")


def prompts() -> list[str]:
    lines = [line.strip() for line in DATA.read_text().splitlines() if line.strip()]
    return [line[: 14 + 12 * i] for i, line in enumerate(lines[:16])]


def tokenizer_for(vocab_size: int) -> Path:
    from slmforge.tokens.tokenizer import train_tokenizer

    path = CACHE / f"tokenizer_{vocab_size}.json"
    if not path.exists():
        train_tokenizer(DATA.read_text().split("\n\n"), vocab_size, path)
    return path


def run_server(args, max_batch: int, port: int) -> None:
    """Child process: build the model and serve it on loopback until terminated."""
    import torch
    import uvicorn

    from slmforge.serve.server import build_app

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        from slmforge.checkpoint import load_for_inference

        model, tokenizer, _ = load_for_inference(args.run, args.device)
    else:
        from slmforge.config import preset
        from slmforge.tokens.tokenizer import Tokenizer
        from slmforge.model.lm import LM

        torch.manual_seed(0)
        cfg = preset(args.preset)
        model, tokenizer = LM(cfg).to(args.device).eval(), Tokenizer.load(tokenizer_for(cfg.vocab_size))
    app = build_app(model, tokenizer, "bench", max_batch=max_batch, batch_window_s=args.window_ms / 1000)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def load(url: str, concurrency: int, num_requests: int, max_tokens: int, stream: bool) -> dict:
    """Closed loop: ``concurrency`` clients share ``num_requests`` requests."""
    texts, todo, latencies, tokens = prompts(), list(range(num_requests)), [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> None:
            body = {"model": "bench", "prompt": texts[i % len(texts)], "max_tokens": max_tokens, "temperature": 0,
                    "stream": stream, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            # Streamed, the usage comes in the last chunk before "data: [DONE]".
            usage = json.loads(r.text.split("data: ")[-2])["usage"] if stream else r.json()["usage"]
            latencies.append(time.perf_counter() - t0)
            tokens.append(usage["completion_tokens"])

        async def client_loop() -> None:
            while todo:
                await one(todo.pop())

        # Warm-up: one round at this concurrency (a long-running server's batch size has settled too).
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        latencies.clear()
        tokens.clear()
        before = (await client.get("/health")).json()
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
        after = (await client.get("/health")).json()
    batches = after["num_batches"] - before["num_batches"]
    return {"requests_per_s": num_requests / seconds, "tokens_per_s": sum(tokens) / seconds,
            "latency_p50_ms": 1000 * statistics.median(latencies),
            "mean_batch": (after["num_rows"] - before["num_rows"]) / batches}


def measure(args, max_batch: int, concurrencies: list[int]) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = mp.get_context("spawn").Process(target=run_server, args=(args, max_batch, port), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                httpx.get(url + "/health").raise_for_status()
                break
            except httpx.TransportError:
                if not server.is_alive() or time.time() > deadline:
                    raise RuntimeError("the benchmark server did not start") from None
                time.sleep(0.2)
        return [{"max_batch": max_batch, "concurrency": c,
                 **asyncio.run(load(url, c, args.requests, args.max_tokens, args.stream))} for c in concurrencies]
    finally:
        server.terminate()
        server.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "10m"])
    ap.add_argument("--run", default="", help="serve this run folder instead of a random-weight preset")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream", action="store_true", help="streamed responses (server-sent events)")
    ap.add_argument("--threads", type=int, default=0, help="server torch threads; 0 = torch's default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--window-ms", type=float, default=20.0, help="the server's batch_window_s, in milliseconds")
    args = ap.parse_args()
    if not args.run:
        from slmforge.config import preset

        tokenizer_for(preset(args.preset).vocab_size)  # train it once, here, not in the server
    results = measure(args, 8, [1, 8]) + measure(args, 1, [8])
    results.sort(key=lambda r: (r["concurrency"], -r["max_batch"]))
    print(f"model {args.run or args.preset}, {args.requests} requests, max_tokens {args.max_tokens}, greedy, "
          f"{'streamed' if args.stream else 'not streamed'}")
    print(f"{'max_batch':>9} {'clients':>7} {'req/s':>8} {'tok/s':>9} {'p50 ms':>8} {'mean batch':>10}")
    for r in results:
        print(f"{r['max_batch']:>9} {r['concurrency']:>7} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['latency_p50_ms']:>8.1f} {r['mean_batch']:>10.2f}")


if __name__ == "__main__":
    main()
