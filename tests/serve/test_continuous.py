"""Continuous batching (serve/batching.py, worker.py): requests that join a running batch at step boundaries get
what each gets decoded alone (greedy and seeded, every mixer, the calculator per row); n choices; a bounded queue;
deadlines of waiting jobs; graceful shutdown; the static scheduler still selectable."""

import dataclasses
import json
import threading
import time

import httpx
import pytest
import torch

from slmforge.config import AttnConfig, ModelConfig, SSMConfig
from slmforge.model.lm import LM
from slmforge.serve.batching import JobQueue, QueueFull, ShuttingDown
from slmforge.serve.generate import generate_batch, stream_text
from slmforge.serve.server import build_app, running_server
from slmforge.serve.tools import Calculator
from slmforge.serve.worker import Job, Worker
from tests.conftest import memorize

NAME = "tiny-test"
# Lengths differ both ways: some joiners are longer than the running rows (those get shifted), some shorter.
PROMPTS = ["A", "Question: how many pens does Mia have left after she gives away two of them", "Tom has 3",
           "7 + 5 =", "Ann reads a book of ninety pages in three days; how many", "x"]
CASES = [dict(max_tokens=30), dict(max_tokens=9), dict(max_tokens=20, temperature=0.9, top_p=0.8, seed=3),
         dict(max_tokens=14), dict(max_tokens=5), dict(max_tokens=12, temperature=1.0, seed=11)]


def _alone(model, tok, prompt: str, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           seed: int | None = None) -> str:
    return "".join(stream_text(model, tok, prompt, max_tokens, temperature, 0, top_p, seed=seed))


def _job(tok, prompt: str, case: dict, **kw) -> Job:
    seed = case.get("seed")
    return Job([tok.eos_id] + tok.encode(prompt), case["max_tokens"], temperature=case.get("temperature", 0.0),
               top_p=case.get("top_p", 1.0), stop_ids=(tok.eos_id,),
               generator=None if seed is None else torch.Generator().manual_seed(seed), **kw)


def _staggered(worker: Worker, jobs: list[Job], after: int = 2, timeout: float = 60) -> tuple[list[list], int]:
    """Submit jobs[0], then each next one once the one before has decoded ``after`` tokens (or finished), from the
    worker's own events: every job joins a batch that is already decoding. -> (each job's events, the most rows
    seen decoding at once)."""
    events: list[list] = [[] for _ in jobs]
    finished = [threading.Event() for _ in jobs]
    widest = [0]

    def emit(i: int):
        def on(event: tuple) -> None:
            events[i].append(event)
            widest[0] = max(widest[0], worker.active_rows)
            if event[0] in ("done", "error"):
                finished[i].set()
            if i + 1 < len(jobs) and jobs[i + 1].emit is None and (jobs[i].num_tokens >= after or finished[i].is_set()):
                jobs[i + 1].emit = emit(i + 1)
                worker.submit(jobs[i + 1])
        return on

    jobs[0].emit = emit(0)
    worker.start()
    try:
        worker.submit(jobs[0])
        for f in finished:
            assert f.wait(timeout), "a job did not finish"
    finally:
        worker.stop()
    return events, widest[0]


def _text(events: list) -> str:
    return "".join(e[1] for e in events if e[0] == "text")


@pytest.mark.parametrize("layers", ["attn", "attn,ssm,linear,hymba"])
def test_staggered_joins_equal_each_prompt_alone(loaded, layers):
    """Six requests of different lengths and settings join one after another while the others decode; each answer
    is what ``stream_text`` gives that prompt alone (greedy, and seeded sampling with its own generator)."""
    model, tok = loaded
    if layers != "attn":
        model = LM(dataclasses.replace(model.cfg, layers=layers, num_layers=4,
                                       ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=8))).eval()
    want = [_alone(model, tok, p, c["max_tokens"], c.get("temperature", 0.0), c.get("top_p", 1.0), c.get("seed"))
            for p, c in zip(PROMPTS, CASES)]
    worker = Worker(model, tok, max_batch=8)
    events, widest = _staggered(worker, [_job(tok, p, c) for p, c in zip(PROMPTS, CASES)])
    assert [_text(e) for e in events] == want
    assert all(e[-1][0] == "done" for e in events)
    # Each joined on a prefill of its own while others decoded: one batch, not six.
    assert worker.num_batches == len(PROMPTS) and widest >= 3
    assert worker.num_steps < sum(c["max_tokens"] for c in CASES) - len(CASES)


@pytest.fixture(scope="module")
def calculating(loaded):
    """A 1-layer model that memorized a text whose annotations all say 99 (as tests/serve/test_tools.py)."""
    _, tok = loaded
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=1, max_seq_len=64,
                           attn=AttnConfig(num_heads=4, num_kv_heads=2)))
    ids = torch.tensor([[tok.eos_id] + tok.encode("Tom has <<3*4=99>>99 pens and Ann has <<7+8=99>>99 cats.")
                        + [tok.eos_id]])
    memorize(model, ids)
    return model.eval(), tok


def test_calculator_works_per_row_as_rows_join(calculating):
    model, tok = calculating
    starts = ["Tom", "Tom has <<3*4=99>>99 pens", "Tom has <<3*4=99>>99 pens and Ann", "Tom has"]
    calc = Calculator(tok)
    alone = [tok.decode(generate_batch(model, [[tok.eos_id] + tok.encode(s)], 24, eos_id=tok.eos_id, tool=calc)[0])
             for s in starts]
    events, widest = _staggered(Worker(model, tok), [_job(tok, s, dict(max_tokens=24), tool=calc) for s in starts])
    assert [_text(e) for e in events] == alone and widest >= 2
    assert "<<3*4=12>>" in alone[0] and "<<7+8=15>>" in alone[2]


def test_job_queue_is_bounded_all_or_none_and_closes():
    q = JobQueue(max_queue=2)
    jobs = [Job([1], 1) for _ in range(4)]
    q.put(jobs[:3])  # nothing waits: a request's choices go in together, even more than max_queue
    with pytest.raises(QueueFull):
        q.put(jobs[3:])
    assert q.take(2) == jobs[:2] and q.qsize() == 1
    q.put(jobs[3:])
    with pytest.raises(QueueFull):
        q.put(jobs[:1])
    q.close()
    with pytest.raises(ShuttingDown) as refused:
        q.put(jobs[:1])
    assert refused.value.status == 503 and QueueFull.status == 429
    assert q.wait(0) and q.take(5) == jobs[2:] and not q.wait(0)


def _slow(model, seconds: float):
    return model.tok_emb.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def test_waiting_job_ends_at_its_deadline_while_the_batch_is_full(loaded):
    """max_batch=1: a second job waits behind a long one and ends at its own deadline, not when a row frees."""
    model, tok = loaded
    worker = Worker(model, tok, max_batch=1)
    long_events, short_events, ended = [], [], threading.Event()
    slow = _slow(model, 0.02)
    worker.start()
    try:
        worker.submit(_job(tok, "A", dict(max_tokens=60), emit=long_events.append))
        while not long_events:
            time.sleep(0.01)
        t0 = time.monotonic()
        worker.submit(_job(tok, "Tom", dict(max_tokens=5), emit=lambda e: (short_events.append(e), ended.set()),
                           deadline=t0 + 0.2))
        assert ended.wait(10)
        waited = time.monotonic() - t0
        assert short_events == [("done", "length", 0)] and waited < 0.6
        assert long_events[-1][0] != "done"  # the long job was still decoding
    finally:
        slow.remove()
        worker.stop()
    assert worker.num_expired == 1 and long_events[-1][:2] == ("done", "length")


def test_stop_ends_running_rows_cleanly_and_refuses_new_jobs(loaded):
    model, tok = loaded
    worker = Worker(model, tok)
    events = []
    slow = _slow(model, 0.02)
    worker.start()
    try:
        worker.submit(_job(tok, "A", dict(max_tokens=200), emit=events.append))
        while not events:
            time.sleep(0.01)
        t0 = time.monotonic()
        worker.stop(grace_s=0.2)
        assert time.monotonic() - t0 < 2
    finally:
        slow.remove()
    assert events[-1][:2] == ("done", "length") and 0 < events[-1][2] < 200
    with pytest.raises(ShuttingDown):
        worker.submit(_job(tok, "A", dict(max_tokens=2)))


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def test_n_choices_streamed_and_not(loaded):
    """n=3: each choice is its own row, seeded ``seed + i``; streamed chunks carry the choice index."""
    model, tok = loaded
    body = {"model": NAME, "prompt": "Tom has", "max_tokens": 8, "temperature": 1.0, "seed": 5, "n": 3}
    want = [_alone(model, tok, "Tom has", 8, 1.0, 1.0, 5 + i) for i in range(3)]
    with running_server(build_app(model, tok, NAME, max_batch=4)) as url:
        r = _post(url, body)
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == want
        assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
        ids = [tok.eos_id] + tok.encode("Tom has")
        new = [generate_batch(model, [ids], 8, tok.eos_id, 1.0, generator=torch.Generator().manual_seed(5 + i))[0]
               for i in range(3)]
        usage = {"prompt_tokens": len(ids), "completion_tokens": sum(len(n) + (len(n) < 8) for n in new)}
        assert r.json()["usage"] == {**usage, "total_tokens": len(ids) + usage["completion_tokens"]}
        streamed = _post(url, {**body, "stream": True, "stream_options": {"include_usage": True}})
        chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
        texts = ["", "", ""]
        for c in chunks:
            for choice in c["choices"]:
                texts[choice["index"]] += choice["text"]
        assert texts == want and chunks[-1]["usage"] == r.json()["usage"]
        error = _post(url, {**body, "n": 5})
        assert error.status_code == 400 and error.json()["error"]["param"] == "n"
        chat = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "n": 2, "max_tokens": 4,
                          "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}, timeout=60).json()
        assert [c["index"] for c in chat["choices"]] == [0, 1]
        assert chat["choices"][0]["message"] == chat["choices"][1]["message"]  # greedy: the same answer


def test_shutdown_finishes_a_stream_in_flight(loaded):
    """Leaving ``running_server`` (uvicorn's graceful shutdown, then the worker's stop) lets a streamed answer
    decoding at that moment finish: every chunk, the finish reason and [DONE]."""
    model, tok = loaded
    body = {"model": NAME, "prompt": "A", "max_tokens": 40, "temperature": 0, "stream": True}
    lines, started = [], threading.Event()
    slow = _slow(model, 0.02)
    try:
        with running_server(build_app(model, tok, NAME)) as url:
            def client():
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        lines.append(line)
                        started.set()

            thread = threading.Thread(target=client)
            thread.start()
            assert started.wait(30)
        thread.join(30)
    finally:
        slow.remove()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == _alone(model, tok, "A", 40)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_static_batching_stays_selectable(loaded):
    model, tok = loaded
    with running_server(build_app(model, tok, NAME, batching="static")) as url:
        r = _post(url, {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0})
        assert r.json()["choices"][0]["text"] == _alone(model, tok, PROMPTS[2], 6)
        assert httpx.get(url + "/health").json()["batching"] == "static"
    with pytest.raises(ValueError, match="batching='dynamic'"):
        Worker(model, tok, batching="dynamic")


def test_a_cache_it_cannot_merge_falls_back_to_static(loaded, monkeypatch):
    from slmforge.serve import batching

    model, tok = loaded
    assert batching.unmergeable(model) is None
    monkeypatch.setattr(batching, "MERGEABLE", {"RecurrentCache"})
    assert batching.unmergeable(model) == "KVCache"
    assert Worker(model, tok).batching == "static"
