"""The OpenAI-compatible server on loopback: concurrency and batching, streaming through the ``openai`` client,
OpenAI-shaped errors that leave the server up, API keys, client disconnects, and results equal to
``generate.stream_text`` on the same prompt alone."""

import dataclasses
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from slmforge.config import SSMConfig
from slmforge.model.lm import LM
from slmforge.serve.generate import stream_text
from slmforge.serve.server import CHAT_STOP_TOKENS, Job, Worker, build_app, running_server

KEY = "sk-test"
NAME = "tiny-test"
PROMPTS = ["Tom has 3 apples", "A", "Question: how many pens does Mia have left after she gives away two", "7 + 5 ="]


@pytest.fixture(scope="module")
def server(loaded):
    app = build_app(*loaded, model_name=NAME, api_key=KEY, max_batch=8)
    with running_server(app) as url:
        yield url, app.state.worker


def _alone(loaded, prompt: str, max_tokens: int, chat: bool = False, **kw) -> str:
    """The reference: ``stream_text`` on the prompt alone, greedy unless told otherwise."""
    model, tok = loaded
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        kw["stop_ids"] = [tok.token_id(t) for t in CHAT_STOP_TOKENS]
    kw = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, **kw}
    return "".join(stream_text(model, tok, prompt, max_tokens, **kw))


def _post(url: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


def _in_threads(fn, n: int) -> None:
    """Call fn(0), ..., fn(n - 1) at once, each on its own thread."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_models_and_health(server):
    url, _ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == [NAME]


def test_batched_rows_equal_each_prompt_alone(loaded):
    """Worker.run_batch on prompts of different lengths and settings (greedy, seeded sampling, a stop string,
    different max_tokens) gives each row what ``stream_text`` gives for that prompt alone."""
    model, tok = loaded
    cases = [dict(max_tokens=12), dict(max_tokens=5), dict(max_tokens=12, temperature=0.9, top_p=0.8, seed=3),
             dict(max_tokens=12, temperature=1.0, seed=11)]
    want = [_alone(loaded, p, c["max_tokens"], **{k: v for k, v in c.items() if k != "max_tokens"})
            for p, c in zip(PROMPTS, cases)]
    # A stop string taken from the middle of prompt 0's greedy continuation cuts it there.
    stop = want[0][3:5]
    want[0] = _alone(loaded, PROMPTS[0], 12, stop=[stop])
    events = [[] for _ in PROMPTS]
    jobs = [Job([tok.eos_id] + tok.encode(p), c["max_tokens"], events[i].append, c.get("temperature", 0.0),
                c.get("top_p", 1.0), stop=[stop] if i == 0 else [], stop_ids=(tok.eos_id,),
                generator=torch.Generator().manual_seed(c["seed"]) if "seed" in c else None)
            for i, (p, c) in enumerate(zip(PROMPTS, cases))]
    worker = Worker(model, tok)
    with torch.inference_mode():
        worker.run_batch(jobs)
    got = ["".join(e[1] for e in ev if e[0] == "text") for ev in events]
    assert got == want
    assert events[0][-1][:2] == ("done", "stop") and events[1][-1] == ("done", "length", 5)


def test_32_concurrent_clients_are_batched_and_answered(server, loaded):
    url, worker = server
    batches_before = worker.num_batches
    results: dict[int, httpx.Response] = {}

    def client(i: int) -> None:
        results[i] = _post(url, "/v1/completions", {"model": NAME, "prompt": PROMPTS[i % 4], "max_tokens": 8,
                                                     "temperature": 0})

    _in_threads(client, 32)
    assert sorted(results) == list(range(32)) and all(r.status_code == 200 for r in results.values())
    want = [_alone(loaded, p, 8) for p in PROMPTS]
    assert [r.json()["choices"][0]["text"] for _, r in sorted(results.items())] == want * 8
    # Requests that arrived together shared batches.
    assert worker.num_batches - batches_before < 32


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_openai_client_stream_equals_non_stream_and_alone(server, loaded, path):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    prompt, kw = PROMPTS[0], dict(model=NAME, max_tokens=16, temperature=0)
    if path == "/v1/chat/completions":
        messages = [{"role": "user", "content": prompt}]
        full = client.chat.completions.create(messages=messages, **kw)
        chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **kw))
        text, streamed = full.choices[0].message.content, "".join(c.choices[0].delta.content or ""
                                                                   for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        full = client.completions.create(prompt=prompt, **kw)
        chunks = list(client.completions.create(prompt=prompt, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        text, streamed = full.choices[0].text, "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text == _alone(loaded, prompt, 16, chat=path == "/v1/chat/completions")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    usage = full.usage
    assert chunks[-1].usage.total_tokens == usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if full.choices[0].finish_reason == "length":
        assert usage.completion_tokens == 16
    raw = _post(url, path, {**kw, "stream": True, **({"messages": messages} if "chat" in path
                                                      else {"prompt": prompt})})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n")


def test_stop_and_seed_fields(server, loaded):
    url, _ = server
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0}
    stop = _alone(loaded, PROMPTS[2], 12)[4:6]
    for given in (stop, [stop, "never in the text"]):
        got = _post(url, "/v1/completions", {**body, "stop": given}).json()["choices"][0]
        assert (got["text"], got["finish_reason"]) == (_alone(loaded, PROMPTS[2], 12, stop=[stop]), "stop")
    sampled = {**body, "temperature": 0.9, "seed": 5}
    texts = [_post(url, "/v1/completions", sampled).json()["choices"][0]["text"] for _ in range(2)]
    assert texts[0] == texts[1] == _alone(loaded, PROMPTS[2], 12, temperature=0.9, seed=5)


BAD = {  # case: (body, API key, status)
    "malformed json": (b'{"model": "tiny-test", "prompt": ', KEY, 400),
    "missing prompt": ({"model": NAME}, KEY, 400),
    "wrong type": ({"model": NAME, "prompt": "hi", "max_tokens": "many"}, KEY, 400),
    "bad temperature": ({"model": NAME, "prompt": "hi", "temperature": -1}, KEY, 400),
    "n>max_batch": ({"model": NAME, "prompt": "hi", "n": 9}, KEY, 400),
    "unknown model": ({"model": "gpt-5", "prompt": "hi"}, KEY, 404),
    "prompt too long": ({"model": NAME, "prompt": " ".join(["apples and pens"] * 40)}, KEY, 400),
    "prompt + max_tokens too long": ({"model": NAME, "prompt": "hi", "max_tokens": 64}, KEY, 400),
    "no key": ({"model": NAME, "prompt": "hi"}, None, 401),
    "bad key": ({"model": NAME, "prompt": "hi"}, "sk-nope", 401),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_errors_and_server_survives(server, case):
    url, _ = server
    body, key, status = BAD[case]
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    r = httpx.post(url + "/v1/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                   headers=headers, timeout=60)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.json()["error"]["message"]
    ok = _post(url, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_bad_chat_role_and_unknown_route(server):
    url, _ = server
    r = _post(url, "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _post(url, "/v1/nothing", {})
    assert r.status_code == 404 and "error" in r.json()


def test_client_disconnect_mid_stream_frees_the_worker(server, loaded):
    url, worker = server
    cancelled = worker.num_cancelled
    # Slow every decoding step down, so the client surely leaves before the 60 tokens are done.
    slow = loaded[0].tok_emb.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    body = {"model": NAME, "prompt": "A", "max_tokens": 60, "stream": True, "temperature": 0}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60) as r:
            first = next(r.iter_lines())
            assert json.loads(first.removeprefix("data: "))["object"] == "text_completion"
        deadline = time.time() + 10
        while worker.num_cancelled == cancelled and time.time() < deadline:
            time.sleep(0.01)
    finally:
        slow.remove()
    assert worker.num_cancelled == cancelled + 1
    assert _post(url, "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_every_mixer_is_served_in_batches(loaded):
    """A model with SSM, linear-attention and Hymba layers batches too (the padding lives in its caches): prompts of
    different lengths decode in one batch, each row as it would alone."""
    _, tok = loaded
    cfg = dataclasses.replace(loaded[0].cfg, layers="attn,ssm,linear,hymba", num_layers=4,
                              ssm=SSMConfig(state_dim=8, head_dim=16, chunk_size=8))
    model = LM(cfg).eval()
    worker = Worker(model, tok, max_batch=8)
    assert worker.max_batch == 8
    events = [[] for _ in PROMPTS]
    jobs = [Job([tok.eos_id] + tok.encode(p), 6, events[i].append, stop_ids=(tok.eos_id,))
            for i, p in enumerate(PROMPTS)]
    with torch.inference_mode():
        worker.run_batch(jobs)
    assert (worker.num_batches, worker.num_rows) == (1, len(PROMPTS))
    got = ["".join(e[1] for e in ev if e[0] == "text") for ev in events]
    assert got == [_alone((model, tok), p, 6) for p in PROMPTS]
