"""Serving throughput and latency of ``slmforge serve``: continuous against static batching, 1, 8 and 32 clients.

The server runs in a child process (so the clients do not share its GIL) on a trained run folder (``--run``, e.g.
runs/tiny_cpu) or a random-weight model of a preset (``--preset tiny`` or ``10m``, with a byte-level BPE of the
preset's vocabulary trained on TinyStories, cached under runs/bench_serve/). For each scheduler
(``batching=continuous|static``, same ``max_batch``) and each number of clients, asyncio clients arrive staggered
(client i starts ``i * --stagger-ms`` after the first) and each sends ``--per-client`` streamed requests one after
another, drawn in turn from 16 TinyStories prompts (14 to 200 characters) with ``max_tokens`` cycling from an
eighth of ``--max-tokens`` to all of it (answers of different lengths: what static batching waits for), greedy.
Reported per row: requests/s and completion tokens/s over the measured window, p50 and p99 latency (request sent
to last chunk), p50 and p99 time to first token (request sent to the first text chunk), and rows per forward (the
server's tokens decoded / (decoding steps + prefills)). Every answer is checked: the same prompt and max_tokens
give the same text in every row and mode, and with ``--check`` (default) the text ``generate.stream_text`` gives
that prompt alone in this process. ``--inproc`` drives the model worker itself (``serve.worker.Worker``) from client
threads in this process, no HTTP: the scheduler's own gain, apart from the HTTP stack and the load generator,
which on a 2-core machine share the cores with the model. Never run in CI.
Example: ``python benchmarks/serve.py --run runs/tiny_cpu``
(smoke: ``--per-client 1 --max-tokens 8 --clients 1 8``).
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


def request(i: int, max_tokens: int) -> tuple[int, int]:
    """Request i's (prompt index, max_tokens): max_tokens cycles over 8 lengths, from max_tokens / 8 up."""
    return i % 16, max(1, max_tokens * (1 + (5 * i) % 8) // 8)


def tokenizer_for(vocab_size: int) -> Path:
    from slmforge.tokens.tokenizer import train_tokenizer

    path = CACHE / f"tokenizer_{vocab_size}.json"
    if not path.exists():
        train_tokenizer(DATA.read_text().split("\n\n"), vocab_size, path)
    return path


def load_model(args):
    import torch

    if args.run:
        from slmforge.checkpoint import load_for_inference

        return load_for_inference(args.run, args.device)[:2]
    from slmforge.config import preset
    from slmforge.model.lm import LM
    from slmforge.tokens.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = preset(args.preset)
    return LM(cfg).to(args.device).eval(), Tokenizer.load(tokenizer_for(cfg.vocab_size))


def run_server(args, batching: str, port: int) -> None:
    """Child process: build the model and serve it on loopback until terminated, as ``slmforge serve`` does
    (``server.run_app``: the model loop on the main thread, HTTP on another)."""
    import torch

    from slmforge.serve.server import build_app, run_app

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args)
    app = build_app(model, tokenizer, "bench", max_batch=args.max_batch, batch_window_s=args.window_ms / 1000,
                    max_queue=1024, batching=batching, start_worker=False)
    run_app(app, "127.0.0.1", port, log_level="warning")


async def one(client: httpx.AsyncClient, i: int, max_tokens: int, texts: list[str]) -> dict:
    """Send request i, streamed -> its latency, time to first token, text and completion tokens."""
    p, n = request(i, max_tokens)
    body = {"model": "bench", "prompt": texts[p], "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, pieces, usage = time.perf_counter(), None, [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                first = first or time.perf_counter()
                pieces.append(chunk["choices"][0]["text"])
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    return {"key": (p, n), "text": "".join(pieces), "latency": end - t0, "ttft": (first or end) - t0,
            "tokens": usage["completion_tokens"]}


async def load(url: str, clients: int, args) -> dict:
    """``clients`` clients arrive ``stagger`` apart; each sends ``per_client`` requests, one after another."""
    texts, done = prompts(), []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(one(client, i, args.max_tokens, texts) for i in range(min(clients, 4))))  # warm-up
        before = (await client.get("/health")).json()

        async def client_loop(c: int) -> None:
            await asyncio.sleep(c * args.stagger_ms / 1000)
            for k in range(args.per_client):
                done.append(await one(client, c * args.per_client + k, args.max_tokens, texts))

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(clients)))
        seconds = time.perf_counter() - t0
        after = (await client.get("/health")).json()
    return {"seconds": seconds, "done": done, "tokens": after["num_tokens"] - before["num_tokens"],
            "forwards": after["num_steps"] - before["num_steps"] + after["num_batches"] - before["num_batches"]}


def load_inproc(worker, tokenizer, clients: int, args) -> dict:
    """``load`` without HTTP: client threads submit ``Job``s (ids as the server's /v1/completions makes them) to
    ``worker`` and wait for each to finish; latency and TTFT as there (the first text event)."""
    import threading

    from slmforge.serve.worker import Job

    texts, done, lock = prompts(), [], threading.Lock()

    def one_job(i: int) -> dict:
        p, n = request(i, args.max_tokens)
        finished, pieces, first = threading.Event(), [], []
        t0 = time.perf_counter()

        def emit(event: tuple) -> None:
            if event[0] == "text":
                if not first:
                    first.append(time.perf_counter())
                pieces.append(event[1])
            else:
                usage.append(event[2] if event[0] == "done" else 0)
                finished.set()

        usage: list[int] = []
        worker.submit(Job([tokenizer.eos_id] + tokenizer.encode_text(texts[p]), n, emit=emit,
                          stop_ids=(tokenizer.eos_id,)))
        finished.wait()
        end = time.perf_counter()
        return {"key": (p, n), "text": "".join(pieces), "latency": end - t0, "ttft": (first[0] if first else end) - t0,
                "tokens": usage[0]}

    def client_loop(c: int) -> None:
        time.sleep(c * args.stagger_ms / 1000)
        for k in range(args.per_client):
            r = one_job(c * args.per_client + k)
            with lock:
                done.append(r)

    for i in range(min(clients, 4)):  # warm-up
        one_job(i)
    before = (worker.num_tokens, worker.num_steps + worker.num_batches)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - t0, "done": done, "tokens": worker.num_tokens - before[0],
            "forwards": worker.num_steps + worker.num_batches - before[1]}


def measure_inproc(args) -> list[dict]:
    """``measure`` with one ``Worker`` per scheduler in this process instead of a server."""
    import torch

    from slmforge.serve.worker import Worker

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args)
    workers = {b: Worker(model, tokenizer, max_batch=args.max_batch, batch_window_s=args.window_ms / 1000,
                         max_queue=1024, batching=b) for b in args.batching}
    try:
        for w in workers.values():
            w.start()
        runs: dict[tuple[str, int], list[dict]] = {}
        for c in args.clients:
            for _ in range(args.repeat):
                for batching, w in workers.items():
                    runs.setdefault((batching, c), []).append(load_inproc(w, tokenizer, c, args))
        return [summary(b, c, runs[b, c]) for b in args.batching for c in args.clients]
    finally:
        for w in workers.values():
            w.stop()


def summary(batching: str, clients: int, runs: list[dict]) -> dict:
    """The runs of one row pooled: requests/s over their total time, percentiles over all their requests."""
    done, seconds = [r for run in runs for r in run["done"]], sum(run["seconds"] for run in runs)
    latency, ttft = sorted(r["latency"] for r in done), sorted(r["ttft"] for r in done)
    return {"batching": batching, "clients": clients, "requests": len(done), "requests_per_s": len(done) / seconds,
            "tokens_per_s": sum(r["tokens"] for r in done) / seconds,
            "latency_p50_ms": 1000 * statistics.median(latency), "latency_p99_ms": 1000 * pct(latency, 0.99),
            "ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * pct(ttft, 0.99),
            "rows_per_forward": sum(run["tokens"] for run in runs) / max(1, sum(run["forwards"] for run in runs)),
            "_texts": [(r["key"], r["text"]) for r in done]}


def pct(values: list[float], q: float) -> float:
    """The q-quantile of sorted ``values`` (nearest rank)."""
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def start_server(args, batching: str) -> tuple[mp.Process, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = mp.get_context("spawn").Process(target=run_server, args=(args, batching, port), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            httpx.get(url + "/health").raise_for_status()
            return server, url
        except httpx.TransportError:
            if not server.is_alive() or time.time() > deadline:
                raise RuntimeError("the benchmark server did not start") from None
            time.sleep(0.2)


def measure(args) -> list[dict]:
    """One server per scheduler, both up; each row's runs alternate between them (a busy machine drifts)."""
    servers = {}
    try:
        for batching in args.batching:
            servers[batching] = start_server(args, batching)
        runs: dict[tuple[str, int], list[dict]] = {}
        for c in args.clients:
            for _ in range(args.repeat):
                for batching, (_, url) in servers.items():
                    runs.setdefault((batching, c), []).append(asyncio.run(load(url, c, args)))
        return [summary(b, c, runs[b, c]) for b in args.batching for c in args.clients]
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.join()


def check(args, results: list[dict]) -> str:
    """Every (prompt, max_tokens) has one answer in every row; with --check, the one it gets decoded alone."""
    seen: dict[tuple[int, int], set[str]] = {}
    for r in results:
        for key, text in r.pop("_texts"):
            seen.setdefault(key, set()).add(text)
    differ = [k for k, v in seen.items() if len(v) > 1]
    if differ:
        return f"NOT EQUAL: {len(differ)} of {len(seen)} (prompt, max_tokens) got different answers across rows"
    if not args.check:
        return f"equal across rows and modes ({len(seen)} distinct requests)"
    from slmforge.serve.generate import stream_text

    model, tokenizer = load_model(args)
    texts = prompts()
    alone = {k: "".join(stream_text(model, tokenizer, texts[k[0]], k[1], 0.0, 0, 1.0)) for k in seen}
    wrong = [k for k, v in seen.items() if v != {alone[k]}]
    return (f"NOT EQUAL to alone: {len(wrong)} of {len(seen)}" if wrong else
            f"every answer equals its prompt decoded alone ({len(seen)} distinct requests, all rows and modes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "10m"])
    ap.add_argument("--run", default="", help="serve this run folder instead of a random-weight preset")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--per-client", type=int, default=3, help="requests each client sends, one after another")
    ap.add_argument("--stagger-ms", type=float, default=50.0, help="client i starts i * this after client 0")
    ap.add_argument("--max-tokens", type=int, default=64, help="the longest answer; max_tokens cycles up to it")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's max_batch, in both modes")
    ap.add_argument("--batching", nargs="+", default=["static", "continuous"], choices=["static", "continuous"])
    ap.add_argument("--repeat", type=int, default=1, help="runs per row, alternating between the schedulers")
    ap.add_argument("--threads", type=int, default=0, help="server torch threads; 0 = torch's default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--window-ms", type=float, default=20.0, help="static batching's batch_window_s, in ms")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the decoded-alone reference")
    ap.add_argument("--inproc", action="store_true", help="drive the model worker in this process, no HTTP")
    args = ap.parse_args()
    if not args.run:
        from slmforge.config import preset

        tokenizer_for(preset(args.preset).vocab_size)  # train it once, here, not in the server
    results = measure_inproc(args) if args.inproc else measure(args)
    verdict = check(args, results)
    transport = "in-process worker, no HTTP" if args.inproc else "HTTP"
    print(f"{transport}: model {args.run or args.preset}, max_batch {args.max_batch}, {args.per_client} streamed "
          f"requests per client, clients {args.stagger_ms:g} ms apart, max_tokens {args.max_tokens // 8}-{args.max_tokens}, greedy, "
          f"{args.repeat} run(s) per row")
    print(f"{'batching':>10} {'clients':>7} {'req/s':>7} {'tok/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'TTFT p50':>8} {'TTFT p99':>8} {'rows/fwd':>8}")
    for r in results:
        print(f"{r['batching']:>10} {r['clients']:>7} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>7.1f} "
              f"{r['latency_p50_ms']:>7.0f} {r['latency_p99_ms']:>7.0f} {r['ttft_p50_ms']:>8.0f} "
              f"{r['ttft_p99_ms']:>8.0f} {r['rows_per_forward']:>8.2f}")
    for c in args.clients:
        rows = {r["batching"]: r for r in results if r["clients"] == c}
        if len(rows) == 2:
            print(f"{c} clients: continuous / static requests/s = "
                  f"{rows['continuous']['requests_per_s'] / rows['static']['requests_per_s']:.2f}x")
    print(verdict)


if __name__ == "__main__":
    main()
