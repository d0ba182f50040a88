"""The synthesizer's own cost per request, with a teacher that answers instantly.

Three rows per concurrency:
  raw client     AsyncOpenAI over an in-process httpx2.MockTransport, N calls under a semaphore: the floor that
                 any client of the openai package pays (request building, JSON, response models)
  synthesize     the whole job over the same mock transport: planning, prompt rendering, our retry wrapper,
                 parsing and the math check, one os.write per record, progress accounting
  procedural     the whole job with the offline teacher (no HTTP at all)
"overhead" is synthesize minus raw client, per request: what slmforge adds on top of the openai package. A real
teacher takes 0.5-30 s per request, so a few hundred microseconds here is noise; the point is to catch a
regression that makes the synthesizer itself the bottleneck at high concurrency.

    OMP_NUM_THREADS=1 python benchmarks/synth_overhead.py --requests 2000 --concurrency 1 8 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import httpx2
import openai

from slmforge.config import merge
from slmforge.synth.jobs import SynthJob, synthesize
from slmforge.synth.teacher import OpenAITeacher

ANSWER = ("Question: Tom has 12 apples and buys 5 more at the market. How many apples does he have now?\n"
          "Solution: He has 12 + 5 = <<12+5=17>>17 apples.\n#### 17")
BODY = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "mock", "choices": [
    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ANSWER}}],
    "usage": {"prompt_tokens": 90, "completion_tokens": 40, "total_tokens": 130}}).encode()


def _client() -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.MockTransport(
        lambda req: httpx2.Response(200, content=BODY, headers={"content-type": "application/json"})))


async def _raw(n: int, concurrency: int) -> float:
    client = openai.AsyncOpenAI(base_url="http://mock/v1", api_key="none", max_retries=0, http_client=_client())
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            await client.chat.completions.create(model="mock", max_tokens=512, messages=[
                {"role": "user", "content": f"Write problem {i}."}], extra_headers={"X-Request-Id": str(i)})

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    return time.perf_counter() - start


def _job(n: int, concurrency: int, out: str, teacher: str) -> SynthJob:
    return merge(SynthJob(), dict(name="bench", template="math", out_dir=out, topics=[f"t{i}" for i in range(n)],
                                  audiences=["grade 3"], styles=["two steps"], teacher=dict(
                                      name=teacher, base_url="http://mock/v1", model="mock",
                                      concurrency=concurrency)))


def _synth(n: int, concurrency: int, teacher: str) -> float:
    with tempfile.TemporaryDirectory() as out:
        job = _job(n, concurrency, out, teacher)
        mock = OpenAITeacher(job.teacher, http_client=_client()) if teacher == "openai" else None
        start = time.perf_counter()
        summary = synthesize(job, progress=False, teacher=mock)
        seconds = time.perf_counter() - start
        assert summary["written"] == n, summary
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    args = p.parse_args()
    n = args.requests
    _synth(min(n, 50), 8, "openai")  # warm imports and caches
    print(f"{'mode':<14}{'conc':>6}{'requests':>10}{'seconds':>10}{'req/s':>10}{'ms/req':>9}{'overhead ms':>13}")
    for c in args.concurrency:
        raw = asyncio.run(_raw(n, c))
        rows = [("raw client", raw), ("synthesize", _synth(n, c, "openai")), ("procedural", _synth(n, c, "procedural"))]
        for name, seconds in rows:
            extra = f"{1e3 * (seconds - raw) / n:13.3f}" if name == "synthesize" else f"{'':13}"
            print(f"{name:<14}{c:>6}{n:>10}{seconds:>10.2f}{n / seconds:>10.0f}{1e3 * seconds / n:>9.3f}{extra}")


if __name__ == "__main__":
    main()
