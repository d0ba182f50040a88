"""Images in ``slmforge serve`` (issue 23): a vision run answers a chat request with a base64 ``image_url`` part as
``vision.describe`` answers the same image (greedy, streamed or not, both prompt templates, both schedulers, rows
with and without images in one batch); bad payloads, URLs to fetch and images sent to a text-only run are 400s in
OpenAI's error shape."""

import base64
import dataclasses
import io
import shutil
import threading

import httpx
import openai
import pytest
import torch
from PIL import Image, ImageDraw

from slmforge.config.model import VisionConfig
from slmforge.model.lm import LM
from slmforge.model.vision import SmallCNN
from slmforge.runs import save_config
from slmforge.serve.generate import stream_text
from slmforge.serve import server as server_module
from slmforge.serve.server import CHAT_STOP_TOKENS, build_app, running_server, serve
from slmforge.serve.vision import (DESCRIBE_PROMPT, answer_ids, default_prompt, describe, image_features,
                                   save_encoder, vision_prompt)
from slmforge.serve.worker import Job, Worker
from slmforge.train.checkpoint import save_checkpoint
from tests.conftest import tiny_run_config
from tests.serve.test_continuous import _staggered, _text

CAPTIONS = {"red": "a red square", "blue": "a blue circle"}
MAX_TOKENS = 24


def _image(colour: str) -> Image.Image:
    img = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(img)
    (draw.rectangle if colour == "red" else draw.ellipse)((6, 6, 25, 25), fill=colour)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _chat(*parts, role: str = "user", **kw) -> dict:
    return {"model": "vis", "messages": [{"role": role, "content": list(parts)}], "max_tokens": MAX_TOKENS,
            "temperature": 0, **kw}


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": DESCRIBE_PROMPT}


TEMPLATES = ("plain", "chat")


@pytest.fixture(scope="module")
def vision_runs(eval_run, loaded, tmp_path_factory) -> dict:
    """Both templates' runs, built once (pytest would rebuild a parametrized fixture as its tests' order demands)."""
    return {template: _vision_run(eval_run, loaded[1], tmp_path_factory.mktemp(template), template)
            for template in TEMPLATES}


@pytest.fixture(scope="module", params=TEMPLATES)
def vision_run(vision_runs, request):
    return vision_runs[request.param]


def _vision_run(eval_run, tok, root, template: str) -> tuple:
    """A tiny vision run folder (config, tokenizer, checkpoint, ``vision/`` encoder) whose model memorized a
    caption per image in ``template``; -> (run folder, model, tokenizer, encoder)."""
    cfg = tiny_run_config(root, name="vis")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, num_layers=1, vision=VisionConfig(feature_dim=16, num_tokens=17, template=template)))
    torch.manual_seed(0)
    encoder = SmallCNN(dim=16, image_size=32).eval().requires_grad_(False)
    with torch.no_grad():  # untrained, its features are tiny (~0.02) and the two images' nearly equal: scaled up
        for p in encoder.parameters():
            p.mul_(3.0)
    model = LM(cfg.model)
    feats = image_features(encoder, [_image(c) for c in CAPTIONS])  # (2, 17, 16)
    prompt, slots = vision_prompt(tok, 17, default_prompt(template), template)
    rows = [prompt + answer_ids(tok, c, template) for c in CAPTIONS.values()]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    targets = torch.tensor([[-100] * len(prompt) + r[len(prompt):] + [-100] * (width - len(r)) for r in rows])
    mask = torch.tensor([slots + [False] * (width - len(slots))] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(tokens[:, :-1], targets=targets[:, 1:], images=feats, image_mask=mask[:, :-1])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    run = cfg.run_dir
    save_checkpoint(run / "checkpoints", 150, model, opt, {})
    save_config(run, cfg)
    shutil.copy(eval_run / "tokenizer.json", run / "tokenizer.json")
    save_encoder(encoder, {"kind": "cnn", "dim": 16, "image_size": 32}, run / "vision")
    return run, model.eval(), tok, encoder


@pytest.fixture(scope="module", params=["continuous", "static"])
def server(vision_run, request):
    """``serve(run)`` (``run_app`` replaced: the app and its worker each run on a thread) -> (base URL, worker)."""
    apps = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_module, "run_app", lambda app, *a, **kw: apps.append(app))
        serve(vision_run[0], model_name="vis", batching=request.param)
    assert apps[0].state.worker.batching == request.param
    apps[0].state.worker.start()  # serve's app leaves it to run_app; the lifespan's shutdown stops it
    with running_server(apps[0]) as url:
        yield url, apps[0].state.worker


def _parts(vision_run, image: dict) -> list[dict]:
    """The content of a request for ``describe``'s answer: the image and the template's default prompt."""
    return [image, TEXT] if vision_run[1].cfg.vision.template == "chat" else [image]


def _described(vision_run, colour: str) -> str:
    _, model, tok, encoder = vision_run
    return describe(model, tok, encoder, [_image(colour)], max_new_tokens=MAX_TOKENS)[0]


def test_image_answers_equal_describe_streamed_or_not(server, vision_run):
    url, worker = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    for colour, caption in CAPTIONS.items():
        want = _described(vision_run, colour)
        assert want == caption  # the model reads the image: each gets its own caption
        body = _chat(*_parts(vision_run, _image_part(_url(_png(_image(colour))))))
        full = client.chat.completions.create(**body)
        chunks = list(client.chat.completions.create(**body, stream=True))
        assert full.choices[0].message.content == want
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert full.choices[0].finish_reason == "stop"
        template = vision_run[1].cfg.vision.template
        assert full.usage.prompt_tokens == len(vision_prompt(vision_run[2], 17, default_prompt(template),
                                                             template)[0])
        if template == "chat":  # the slots go at the front of the user turn wherever the part is: the same answer
            body["messages"][0]["content"].reverse()
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
            assert r.json()["choices"][0]["message"]["content"] == want


def test_concurrent_image_and_text_requests(server, vision_run):
    """Image requests (one with n=2) and a text-only request to the vision run at once: each gets its own answer."""
    url, worker = server
    _, model, tok, _ = vision_run
    text_body = {"model": "vis", "messages": [{"role": "user", "content": "Tom has 3 apples"}],
                 "max_tokens": MAX_TOKENS, "temperature": 0}
    bodies = [_chat(*_parts(vision_run, _image_part(_url(_png(_image("red"))))), n=2),
              _chat(*_parts(vision_run, _image_part(_url(_png(_image("blue")))))), text_body]
    results = {}

    def client(i: int) -> None:
        results[i] = httpx.post(url + "/v1/chat/completions", json=bodies[i], timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    texts = [[c["message"]["content"] for c in results[i].json()["choices"]] for i in range(3)]
    ids = [tok.eos_id] + tok.encode_chat(text_body["messages"])
    alone = "".join(stream_text(model, tok, ids, MAX_TOKENS, 0.0, 0, 1.0, new_document=False,
                                stop_ids=[tok.token_id(t) for t in CHAT_STOP_TOKENS]))
    assert texts == [[CAPTIONS["red"]] * 2, [CAPTIONS["blue"]], [alone]]


def _jobs(vision_run) -> tuple[list[Job], list[str]]:
    """Jobs mixing rows with and without images, and what each gets alone."""
    _, model, tok, encoder = vision_run
    stop_ids = (tok.eos_id, *(tok.token_id(t) for t in CHAT_STOP_TOKENS))
    template = model.cfg.vision.template
    prompt, slots = vision_prompt(tok, 17, default_prompt(template), template)
    plain = {"stop": ["\n"], "strip_leading": True} if template == "plain" else {}
    jobs, want = [], []
    for colour in ("red", "blue"):
        text_ids = [tok.eos_id] + tok.encode_chat([{"role": "user", "content": f"Is it {colour}?"}])
        jobs.append(Job(text_ids, MAX_TOKENS, stop_ids=stop_ids))
        want.append("".join(stream_text(model, tok, text_ids, MAX_TOKENS, 0.0, 0, 1.0, new_document=False,
                                        stop_ids=list(stop_ids))))
        jobs.append(Job(prompt, MAX_TOKENS, stop_ids=stop_ids, images=image_features(encoder, [_image(colour)]),
                        image_slots=slots, **plain))
        want.append(CAPTIONS[colour])
    return jobs, want


def test_worker_batches_rows_with_and_without_images(vision_run):
    """Static: one batch of text and image rows; continuous: image and text rows join a running batch."""
    model, tok = vision_run[1], vision_run[2]
    jobs, want = _jobs(vision_run)
    events = [[] for _ in jobs]
    for job, ev in zip(jobs, events):
        job.emit = ev.append
    worker = Worker(model, tok, batching="static")
    with torch.inference_mode():
        worker.run_batch(jobs)
    assert [_text(e) for e in events] == want and worker.num_batches == 1
    jobs, want = _jobs(vision_run)
    events, widest = _staggered(Worker(model, tok, max_batch=8), jobs)
    assert [_text(e) for e in events] == want and widest >= 2


def _error(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return error["message"]


def test_bad_images_are_400s(server):
    url, worker = server
    rows = worker.num_rows
    png = _png(_image("red"))
    param = "messages[0].content[1].image_url"
    huge = io.BytesIO()
    Image.new("L", (4097, 4097)).save(huge, format="PNG")
    cases = [("not a readable image", _url(png[:len(png) // 2])),  # a truncated PNG
             ("not a readable image", _url(b"just some text, not an image", "text/plain")),
             ("pixel limit", _url(huge.getvalue())),
             ("not valid base64", "data:image/png;base64,@@not base64@@"),
             ("must be base64-encoded", "data:image/png," + "x" * 16),
             ("only base64 data URLs", "https://example.com/cat.png")]
    for want, image_url in cases:
        message = _error(httpx.post(url + "/v1/chat/completions", json=_chat(TEXT, _image_part(image_url)),
                                    timeout=60), param)
        assert want in message and message.startswith(param)
    two = _chat(_image_part(_url(png)), _image_part(_url(png)))
    assert "one image" in _error(httpx.post(url + "/v1/chat/completions", json=two, timeout=60), param)
    other = _chat(TEXT, _image_part(_url(png)), role="assistant")
    assert "user messages" in _error(httpx.post(url + "/v1/chat/completions", json=other, timeout=60), param)
    if worker.model.cfg.vision.template == "plain":  # no conversation around the image
        turns = _chat(TEXT, _image_part(_url(png)))
        turns["messages"].insert(0, {"role": "system", "content": "Be brief."})
        r = httpx.post(url + "/v1/chat/completions", json=turns, timeout=60)
        assert "one user message" in _error(r, "messages[1].content[1].image_url")
    # Malformed parts: the error names the part's own field, not the union's string branch.
    for part, field in [({"type": "audio", "audio": "..."}, "type"), ({"type": "image_url", "image_url": "data:"},
                                                                      "image_url")]:
        r = httpx.post(url + "/v1/chat/completions", json=_chat(part), timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == f"messages.0.content.0.{field}", r.text
    assert worker.num_rows == rows  # none reached the model
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_image_to_a_text_only_run_is_400(loaded):
    with running_server(build_app(*loaded, model_name="vis")) as url:
        r = httpx.post(url + "/v1/chat/completions", json=_chat(TEXT, _image_part(_url(_png(_image("red"))))),
                       timeout=60)
        assert "no vision part" in _error(r, "messages[0].content[1].image_url")
