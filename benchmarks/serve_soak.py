"""Soak test of ``slmforge serve``: mixed good, oversized, malformed and abandoned requests from many clients.

Starts ``slmforge serve`` as a child process on loopback (a free port) on a run folder (default runs/tiny_cpu),
then runs ``--clients`` threads for ``--duration`` seconds; each draws its next request from a fixed mix:

    good       a completion or chat request, max_tokens 32 (streamed one time in four)     -> 200
    oversized  a 2 MB body (over max_body_bytes)                                           -> 413
    long       a 200,000-character prompt under the body limit                             -> 400 context_length_exceeded
    malformed  broken JSON, seed 2**70, 5 stop strings, a wrong type                       -> 400
    abandoned  max_tokens 200, the client hangs up after 0.3 s                             -> (none; the row is dropped)

A full queue answers 429 (counted per kind); the client then waits its Retry-After before its next request. Meanwhile /health is polled every 0.5 s from a process of its own. Prints a table: requests
served, statuses by kind, p50/p99 latency of the good ones, peak server RSS (VmHWM from /proc), the server's
count of cancelled jobs, and the worst /health latency and whether it stayed under 1 s. Loopback only; never run
in CI. Example: ``python benchmarks/serve_soak.py --duration 60``.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx

KINDS = {"good": 0.6, "oversized": 0.1, "long": 0.1, "malformed": 0.1, "abandoned": 0.1}
PROMPTS = ["Question: Tom has 3 apples and buys 4 more. How many apples does he have?", "Once upon a time",
           "Mia had 12 pens. She gave 5 to Sam.", "7 + 5 ="]
MALFORMED = [b'{"model": "soak", "prompt": ', json.dumps({"model": "soak", "prompt": "hi", "seed": 2**70}).encode(),
             json.dumps({"model": "soak", "prompt": "hi", "stop": list("abcde")}).encode(),
             json.dumps({"model": "soak", "prompt": "hi", "max_tokens": "many"}).encode()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "slmforge", "serve", args.run, f"port={port}", "model_name=soak",
           f"max_batch={args.max_batch}", f"max_queue={args.max_queue}"]
    env = {k: v for k, v in os.environ.items() if k != "SLMFORGE_API_KEY"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not answer /health within 120 s")


def vm_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def request(client: httpx.Client, kind: str, rng: random.Random) -> tuple[str, float]:
    """Send one request of ``kind`` -> (outcome: the status code or "hung up", seconds)."""
    headers = {"Content-Type": "application/json"}
    prompt = rng.choice(PROMPTS)
    timeout = 120.0
    if kind == "good":
        if rng.random() < 0.5:
            body = {"model": "soak", "prompt": prompt, "max_tokens": 32, "temperature": 0.7, "seed": rng.randrange(99)}
            path = "/v1/completions"
        else:
            body = {"model": "soak", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32}
            path = "/v1/chat/completions"
        body["stream"] = rng.random() < 0.25
        content = json.dumps(body).encode()
    else:
        path = "/v1/completions"
        content = {"oversized": lambda: OVERSIZED, "long": lambda: LONG, "malformed": lambda: rng.choice(MALFORMED),
                   "abandoned": lambda: json.dumps({"model": "soak", "prompt": prompt, "max_tokens": 200}).encode()}[
            kind]()
        timeout = 0.3 if kind == "abandoned" else timeout
    t0 = time.perf_counter()
    try:
        r = client.post(path, content=content, headers=headers, timeout=timeout)
        outcome = str(r.status_code)
        if r.status_code == 429:  # a polite client waits as told before its next request
            time.sleep(float(r.headers.get("retry-after", 1)))
    except httpx.TimeoutException:
        outcome = "hung up"
    except httpx.TransportError as e:
        outcome = f"transport error ({type(e).__name__})"
    return outcome, time.perf_counter() - t0


OVERSIZED = json.dumps({"model": "soak", "prompt": "apples and pens " * (2 * 2**20 // 16)}).encode()
LONG = json.dumps({"model": "soak", "prompt": "apples and pens " * (200_000 // 16)}).encode()


def client_loop(url: str, seed: int, end: float, counts: collections.Counter, latencies: list, lock) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    with httpx.Client(base_url=url) as client:
        while time.monotonic() < end:
            kind = rng.choices(kinds, weights)[0]
            outcome, seconds = request(client, kind, rng)
            with lock:
                counts[kind, outcome] += 1
                if kind == "good" and outcome == "200":
                    latencies.append(seconds)


def health_loop(url: str, end: float, out) -> None:
    """In a process of its own, so that the 32 client threads' GIL does not count in its latencies."""
    worst, failures = [0.0], []
    with httpx.Client(base_url=url) as client:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                ok = client.get("/health", timeout=5).status_code == 200
            except httpx.TransportError:
                ok = False
            worst[0] = max(worst[0], time.perf_counter() - t0)
            if not ok:
                failures.append(time.monotonic())
            time.sleep(max(0.0, 0.5 - (time.perf_counter() - t0)))
    out.put((worst, failures))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(args, counts, latencies, worst, failures, rss, health) -> None:
    print(f"\nserve soak: {args.run}, {args.clients} clients, {args.duration:.0f} s, max_batch {args.max_batch}, "
          f"max_queue {args.max_queue}\n")
    print(f"{'kind':<11} {'requests':>9}  outcomes")
    for kind in KINDS:
        outcomes = {o: n for (k, o), n in sorted(counts.items()) if k == kind}
        print(f"{kind:<11} {sum(outcomes.values()):>9}  " + ", ".join(f"{o}: {n}" for o, n in outcomes.items()))
    by_status = collections.Counter()
    for (_, outcome), n in counts.items():
        by_status[outcome] += n
    print(f"\n{'requests sent':<36} {sum(counts.values())}")
    print(f"{'requests served (200)':<36} {by_status['200']}")
    for status in sorted(s for s in by_status if s.startswith("4")):
        print(f"{'  ' + status + ' responses':<36} {by_status[status]}")
    print(f"{'  hung up by the client':<36} {by_status['hung up']}")
    print(f"{'good: p50 / p99 latency':<36} {percentile(latencies, 0.5) * 1000:.0f} ms / "
          f"{percentile(latencies, 0.99) * 1000:.0f} ms")
    print(f"{'server jobs cancelled (client left)':<36} {health.get('num_cancelled')}")
    print(f"{'server RSS: start / peak (VmHWM)':<36} {rss[0] / 1024:.0f} MB / {rss[1] / 1024:.0f} MB")
    print(f"{'/health: worst latency':<36} {worst[0] * 1000:.0f} ms ({len(failures)} failed polls)")
    print(f"{'/health stayed < 1 s':<36} {'yes' if worst[0] < 1.0 and not failures else 'NO'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/tiny_cpu", help="run folder to serve")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=16, help="the server's max_queue (small, so 429s show)")
    args = p.parse_args()
    proc, url = start_server(args)
    try:
        rss_start = vm_kb(proc.pid, "VmRSS")
        end = time.monotonic() + args.duration
        counts, latencies, lock, polled = collections.Counter(), [], threading.Lock(), mp.Queue()
        poller = mp.Process(target=health_loop, args=(url, end, polled))
        poller.start()
        threads = [threading.Thread(target=client_loop, args=(url, i, end, counts, latencies, lock))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        worst, failures = polled.get(timeout=60)
        poller.join()
        health = httpx.get(url + "/health", timeout=10).json()
        report(args, counts, latencies, worst, failures, (rss_start, vm_kb(proc.pid, "VmHWM")), health)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
