"""An OpenAI-compatible HTTP server for slmforge checkpoints: chat and text completions, streamed or not.

Endpoints: ``/v1/chat/completions``, ``/v1/completions`` (both with ``stream: true`` as server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), ``/v1/models`` and ``/health``. Errors are JSON in OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``.

Design. The HTTP side is asyncio (FastAPI on uvicorn); the model runs on one ``Worker`` thread that owns it
(``worker.py`` describes how it batches and decodes). A request is validated on the event loop (``_Api``),
tokenized on a thread (``asyncio.to_thread``, so a long text never blocks ``/health``), becomes a ``Job`` and
goes into the worker's queue. The job sends its events, ("text", piece) ...
("done", finish_reason, num_tokens), to its request's asyncio queue with ``call_soon_threadsafe``; a streaming
response turns each into a chunk as it comes. A non-streaming request watches its connection while it waits: a
client that hangs up cancels its job, which leaves the batch at the worker's next step.

Limits (``build_app`` arguments, ``slmforge serve`` keys), each answered in OpenAI's error shape:
``max_body_bytes`` (413 before the body is read), prompt length (400 ``context_length_exceeded``, at once
when the text has more characters than the context could hold at the tokenizer's longest token, else after
tokenizing), ``max_queue`` (429 with ``Retry-After`` when that many jobs already wait), ``request_timeout_s``
(the answer ends there with the text so far and finish_reason "length", streamed or not), ``max_stop`` stop
strings of at most ``max_stop_chars`` characters, ``n`` <= ``max_batch`` (choice i is a job of its own, seeded
``seed + i``) and 0 <= ``seed`` < 2**63 (400 naming the field); ``batching`` picks the worker's scheduler.
Chat content and completion prompts are tokenized as text: ``<|end|>`` in them is never a control token.
``tools="calculator"`` (a server setting) runs the GSM8K calculator (``tools.py``) in every answer; a request's
``"tools": "calculator"`` in its own. ``/`` is the chat web page (``webpage.py``).

Images (a vision run, ``serve/vision.py``): a user message's content may hold one OpenAI ``image_url`` part, a
base64 data URL (``data:image/png;base64,...``; the server fetches nothing, so an http(s) URL is a 400), one image
per request. Its encoder features (the run's frozen ``vision/`` encoder, loaded at start) fill P image slots laid
out as ``vision.vision_prompt`` lays them, the layout the projector was trained on (``model.vision.template``), with
no leading EOS: chat, at the front of that user turn, whatever the part's place among the text parts; plain (a base
model's stage 1), the request is that one user message, the prompt the slots and its text, and the answer its first
line without the leading space, as ``vision.describe`` gives it. A corrupt, huge or non-image payload, an image
anywhere but a user message, a second image, or any image sent to a run without a vision part is a 400 naming the
part (``messages[i].content[j].image_url``). The default ``max_body_bytes`` leaves room for an image of about
730 KB (base64 adds a third); the encoder reads images at its own small size anyway.

long: over 400 lines since the limits and images came in; each check sits next to the request handling it guards.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import Callable, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from slmforge.checkpoint import find_checkpoint, load_for_inference
from slmforge.tokens.tokenizer import CHAT_ROLES
from slmforge.serve.tools import check_tools, make_tool
from slmforge.serve.vision import image_features, load_encoder, read_image, vision_prompt
from slmforge.serve.webpage import add_webpage
from slmforge.serve.worker import Job, QueueFull, Worker

__all__ = ["CHAT_STOP_TOKENS", "APIError", "ChatRequest", "CompletionRequest", "Job", "Worker", "build_app",
           "running_server", "serve"]

CHAT_STOP_TOKENS = ("<|end|>", "<|user|>")


class APIError(Exception):
    """A request that fails with HTTP ``status``, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, self.status, headers=self.headers)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, penalties, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # torch generators take 64-bit seeds
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    tools: str | list | None = None  # "calculator": the calculator in this answer; OpenAI's tool lists: ignored

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        # Some clients send every field, unset ones as null; those get the defaults.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("tools")
    @classmethod
    def _known_tool(cls, tools):
        if isinstance(tools, str):
            check_tools(tools)
        return tools


class _ImageURL(BaseModel):
    url: str
    detail: str | None = None  # OpenAI's "low" / "high" / "auto": the encoder has one size


class _Part(BaseModel):
    """A content part, {"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}; one
    model rather than a union of two, so that a bad part's error names its own field."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: _ImageURL | None = None

    @model_validator(mode="after")
    def _has_its_field(self):
        if getattr(self, self.type) is None:
            raise ValueError(f"type {self.type!r} needs a {self.type!r} field")
        return self


class _Message(BaseModel):
    role: str
    content: str | list[_Part]


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str


class _Api:
    """The request side of one app: checks, turns requests into jobs and the worker's events into responses."""

    def __init__(self, worker: Worker, tokenizer, model_name: str, api_key: str | None, context_length: int,
                 device: torch.device, limits: dict, encoder: torch.nn.Module | None = None):
        self.worker, self.tokenizer, self.model_name, self.api_key = worker, tokenizer, model_name, api_key
        self.context_length, self.device, self.limits = context_length, device, limits
        self.encoder = encoder  # a vision run's frozen image encoder; None: the model reads text only
        self.template = worker.model.cfg.vision.template  # how its prompts lay out an image (vision_prompt)
        self.created = int(time.time())
        self.tool = None  # tools.py's calculator with build_app's tools="calculator"
        self.chat_stop_ids = tuple(tokenizer.token_id(t) for t in CHAT_STOP_TOKENS)
        # Every token covers at most this many bytes, so a text of more characters than
        # context_length * max_token_chars cannot fit, whatever it tokenizes to.
        self.max_token_chars = max(len(t) for t in tokenizer.hf.get_vocab(with_added_tokens=True))
        tokenizer.encode_text("")  # builds its text-only encoder now, not on two threads at once

    async def check_key(self, request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if self.api_key is not None and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_request(self, req: _Request, param: str, num_chars: int) -> list[str]:
        """Checks that need no tokenizing: model, n, stop strings, a cheap bound on the prompt -> stop strings."""
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server has '{self.model_name}'.",
                           param="model", code="model_not_found")
        if req.n > self.worker.max_batch:
            raise APIError(400, f"n: at most {self.worker.max_batch} choices (max_batch), got {req.n}.", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        max_stop, max_chars = self.limits["max_stop"], self.limits["max_stop_chars"]
        if len(stop) > max_stop:
            raise APIError(400, f"stop: at most {max_stop} stop strings, got {len(stop)}.", param="stop")
        if any(len(s) > max_chars for s in stop):
            raise APIError(400, f"stop: each stop string may have at most {max_chars} characters, got "
                                f"{max(map(len, stop))}.", param="stop")
        if num_chars > self.context_length * self.max_token_chars:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens; the {param} "
                                f"has {num_chars} characters, more than that many tokens can hold.",
                           param=param, code="context_length_exceeded")
        return [s for s in stop if s]

    async def make_job(self, req: _Request, param: str, num_chars: int, encode: Callable[[], tuple],
                       max_tokens: int | None, stop_ids: tuple[int, ...]) -> list[Job]:
        """``encode`` (run on a thread) -> the prompt's ids and the ``Job`` fields it sets (images, image_slots,
        strip_leading, and stop strings added to the request's)."""
        stop = self.check_request(req, param, num_chars)
        ids, fields = await asyncio.to_thread(encode)
        stop += fields.pop("stop", [])
        context_length = self.context_length
        max_tokens = max_tokens or max(1, context_length - len(ids))
        if len(ids) + max_tokens > context_length:
            raise APIError(400, f"This model's maximum context length is {context_length} tokens; you asked for "
                                f"{len(ids) + max_tokens} ({len(ids)} in the {param}, {max_tokens} to generate).",
                           param=param, code="context_length_exceeded")
        generator = torch.Generator(self.device).manual_seed(req.seed) if req.seed is not None else None
        return Job(ids, max_tokens, temperature=req.temperature, top_p=req.top_p, stop=stop,
                   stop_ids=(self.tokenizer.eos_id, *stop_ids), generator=generator,
                   tool=self.tool or (make_tool(req.tools, self.tokenizer) if isinstance(req.tools, str) else None),
                   deadline=time.monotonic() + self.limits["request_timeout_s"], **fields).choices(req.n, req.seed)

    def submit(self, jobs: list[Job]) -> asyncio.Queue:
        """Queue a request's ``jobs`` (429 when the worker's queue is full, 503 when it is stopping); returns the
        asyncio queue their events arrive in, as (choice index, event)."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()

        def emitter(job: Job) -> Callable[[tuple], None]:
            def emit(event: tuple) -> None:
                try:
                    loop.call_soon_threadsafe(inbox.put_nowait, (job.index, event))
                except RuntimeError:  # the event loop has closed: the server is shutting down
                    job.cancelled = True
            return emit

        for job in jobs:
            job.emit = emitter(job)
        try:
            self.worker.submit(*jobs)
        except QueueFull as e:
            raise APIError(e.status, f"The server is busy ({e}); retry after a second.", e.error_type, code=e.code,
                           headers={"Retry-After": "1"}) from None
        return inbox

    async def events(self, jobs: list[Job], inbox: asyncio.Queue):
        """Yield (index, event) as the worker sends them, until every job's "done", or an "error" (or "gone":
        client left)."""
        running = len(jobs)
        try:
            while running:
                index, event = await inbox.get()
                yield index, event
                if event[0] in ("error", "gone"):
                    return
                running -= event[0] == "done"
        finally:
            # Also runs when a client disconnects mid-stream (the response task is cancelled): the worker then
            # drops the rows at its next step.
            for job in jobs:
                job.cancelled = True

    async def collect(self, jobs: list[Job], request: Request) -> list[tuple[str, str]]:
        """Run ``jobs`` to the end -> (text, finish_reason) of each, cancelling them if the client hangs up."""
        inbox = self.submit(jobs)

        async def watch() -> None:  # the body has been read: the next message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass
            inbox.put_nowait((0, ("gone",)))

        watcher = asyncio.create_task(watch())
        pieces, reasons = [[] for _ in jobs], [""] * len(jobs)
        try:
            async for index, event in self.events(jobs, inbox):
                if event[0] == "text":
                    pieces[index].append(event[1])
                reasons[index] = event[1] if event[0] == "done" else reasons[index]
        finally:
            watcher.cancel()
        if event[0] == "error":
            raise APIError(500, event[1], "server_error")
        if event[0] == "gone":
            raise APIError(499, "The client closed the request.")  # nobody reads it
        return [("".join(p), reason) for p, reason in zip(pieces, reasons)]

    def stream(self, jobs: list[Job], head: dict, choice: Callable[[str, str | None, int], dict], req: _Request,
               first: Callable[[int], dict] | None = None) -> StreamingResponse:
        """Server-sent events: ``first`` of each choice, a chunk per text piece and per finish, usage if asked,
        [DONE]."""
        inbox = self.submit(jobs)  # before the response starts, so that a full queue is still a 429

        def chunk(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        async def body():
            if first is not None:
                yield chunk([first(i) for i in range(len(jobs))])
            async for index, event in self.events(jobs, inbox):
                if event[0] == "error":
                    yield f"data: {json.dumps({'error': APIError(500, event[1], 'server_error').body})}\n\n"
                elif event[0] == "text":
                    yield chunk([choice(event[1], None, index)])
                else:
                    yield chunk([choice("", event[1], index)])
            if event[0] == "done" and (req.stream_options or {}).get("include_usage"):
                yield chunk([], usage=_usage(jobs))
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def chat_completions(self, req: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content if part.type == "text")} for m in req.messages]
        bad = next((m.role for m in req.messages if m.role not in CHAT_ROLES), None)
        if bad is not None:
            raise APIError(400, f"messages: unknown role {bad!r}; expected one of {', '.join(CHAT_ROLES)}.",
                           param="messages")
        images = self.image_parts(req)
        # The template adds 3 control tokens per message at most (role, end, the assistant's role).
        num_chars = sum(len(m["content"]) for m in messages) + 3 * len(messages) * self.max_token_chars
        jobs = await self.make_job(req, "messages", num_chars, lambda: self.chat_prompt(messages, images),
                                   req.max_completion_tokens or req.max_tokens, self.chat_stop_ids)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return self.stream(jobs, {**head, "object": "chat.completion.chunk"}, lambda piece, reason, i: {
                "index": i, "delta": {} if reason else {"content": piece}, "logprobs": None, "finish_reason": reason},
                req, first=lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None})
        results = await self.collect(jobs, request)
        return {**head, "object": "chat.completion", "usage": _usage(jobs), "choices": [{
            "index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(results)]}

    def image_parts(self, req: ChatRequest) -> dict[int, tuple[str, str]]:
        """The image parts of ``req``, checked without decoding them -> {message index: (param, base64 data)}."""
        found: dict[int, tuple[str, str]] = {}
        for i, message in enumerate(req.messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                if part.type != "image_url":
                    continue
                param = f"messages[{i}].content[{j}].image_url"
                head, comma, data = part.image_url.url.partition(",")
                problem = ("this model has no vision part; it reads text only" if self.encoder is None else
                           "images are read in user messages only" if message.role != "user" else
                           "at most one image per request" if found else
                           "this vision run reads an image with its text alone (model.vision.template=plain): send "
                           "one user message" if self.template == "plain" and len(req.messages) > 1 else
                           "only base64 data URLs (data:image/png;base64,...) are accepted; this server fetches "
                           "nothing from the internet" if not head.startswith("data:") else
                           "a data URL must be base64-encoded (data:<type>;base64,<data>)"
                           if not (comma and head.endswith(";base64")) else None)
                if problem is not None:
                    raise APIError(400, f"{param}: {problem}.", param=param)
                found[i] = (param, data)
        return found

    def chat_prompt(self, messages: list[dict], images: dict[int, tuple[str, str]]) -> tuple[list[int], dict]:
        """The chat prompt -> (ids, ``Job`` fields). Text only: EOS first, as token shards start every document
        (``generate.stream_text``); with an image, ``vision_prompt``'s layout (module docstring)."""
        tok = self.tokenizer
        if not images:
            return [tok.eos_id] + tok.encode_chat(messages), {}
        if self.template == "plain":  # a single user message (image_parts)
            features = self.read_image(*images[0])  # (1, P, F)
            ids, slots = vision_prompt(tok, features.shape[1], messages[0]["content"], "plain")
            return ids, {"images": features.to(self.device), "image_slots": slots, "stop": ["\n"],
                         "strip_leading": True}
        ids, slots, features = [], [], []
        for i, message in enumerate(messages):
            turn = tok.encode_chat([message], add_generation_prompt=False)  # role, text, end
            num_slots = 0
            if i in images:
                features.append(self.read_image(*images[i]))
                num_slots = features[-1].shape[1]
            ids += [turn[0], *[tok.pad_id] * num_slots, *turn[1:]]
            slots += [False, *[True] * num_slots, *[False] * (len(turn) - 1)]
        ids.append(tok.token_id(CHAT_ROLES["assistant"]))
        return ids, {"images": torch.cat(features).to(self.device), "image_slots": slots + [False]}

    def read_image(self, param: str, data: str) -> torch.Tensor:
        """A base64 image -> its encoder features (1, P, F); a bad payload is a 400 naming ``param``."""
        try:
            image = read_image(base64.b64decode("".join(data.split()), validate=True), param)
        except binascii.Error as e:
            raise APIError(400, f"{param}: the data URL is not valid base64 ({e}).", param=param) from None
        except ValueError as e:
            raise APIError(400, f"{e}.", param=param) from None
        return image_features(self.encoder, [image])

    async def completions(self, req: CompletionRequest, request: Request):
        def encode() -> tuple:  # token shards start every document after EOS, as ``generate.stream_text`` does
            return [self.tokenizer.eos_id] + self.tokenizer.encode_text(req.prompt), {}

        jobs = await self.make_job(req, "prompt", len(req.prompt), encode, req.max_tokens, ())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}

        def choice(piece: str, reason: str | None, index: int = 0) -> dict:
            return {"index": index, "text": piece, "logprobs": None, "finish_reason": reason}

        if req.stream:
            return self.stream(jobs, head, choice, req)
        results = await self.collect(jobs, request)
        return {**head, "usage": _usage(jobs), "choices": [choice(*result, i) for i, result in enumerate(results)]}

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "slmforge"}]}

    async def health(self):
        worker = self.worker
        return {"status": "ok", "model": self.model_name, "num_batches": worker.num_batches,
                "num_rows": worker.num_rows, "active_rows": worker.active_rows, "queued": worker.queue.qsize(),
                "num_cancelled": worker.num_cancelled, "num_expired": worker.num_expired,
                "batching": worker.batching, "num_steps": worker.num_steps, "num_tokens": worker.num_tokens}


async def _invalid(request, e: RequestValidationError):
    """Malformed JSON, missing fields and out-of-range values: 400 (FastAPI's default is 422)."""
    # A union (message content: a string or a list of parts) fails once per branch: the deepest error says most.
    first = max(e.errors(), key=lambda error: len(error["loc"]))
    if first["type"] == "json_invalid":
        message, param = f"invalid JSON at character {first['loc'][-1]}: {first['ctx']['error']}", None
    else:
        # Without the union's branch names ("str", "list[_Part]").
        param = ".".join(str(p) for p in first["loc"][1:] if p != "str" and "[" not in str(p)) or None
        # No field named: not a JSON object, or (FastAPI's CSRF guard) sent without Content-Type: application/json
        message = f"{param}: {first['msg']}" if param else \
            f"the body must be a JSON object sent with Content-Type: application/json ({first['msg']})"
    return APIError(400, message, param=param, code=first["type"]).response()


def _http_error(e: HTTPException, max_body_bytes: int) -> APIError:
    if e.status_code == 413:
        return APIError(413, f"The request body is larger than this server's limit of {max_body_bytes} bytes "
                             f"(max_body_bytes).", code="request_too_large")
    return APIError(e.status_code, str(e.detail))


class _BodyLimit:
    """ASGI middleware: a body over ``max_body_bytes`` gets 413, at once from its Content-Length (the body is never
    read), else as soon as the bytes received pass the limit (a chunked body)."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        length = Headers(scope=scope).get("content-length", "") if scope["type"] == "http" else ""
        if length.isdigit() and int(length) > self.max_body_bytes:
            too_large = _http_error(HTTPException(413), self.max_body_bytes).response()
            too_large.headers["connection"] = "close"
            return await too_large(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413)
            return message

        await self.app(scope, limited if scope["type"] == "http" else receive, send)


def _add_exception_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """Every error as JSON in OpenAI's shape."""
    app.add_exception_handler(APIError, lambda request, e: e.response())
    # Unknown routes and methods (404, 405), a body too large (413), and any bug: still JSON in OpenAI's shape.
    app.add_exception_handler(HTTPException, lambda request, e: _http_error(e, max_body_bytes).response())
    app.add_exception_handler(Exception, lambda request, e: APIError(500, f"{type(e).__name__}: {e}",
                                                                     "server_error").response())
    app.add_exception_handler(RequestValidationError, _invalid)


def _add_routes(app: FastAPI, api: _Api) -> None:
    """``/v1/...`` behind the API key check, and ``/health``."""
    router = APIRouter(prefix="/v1", dependencies=[Depends(api.check_key)])
    router.post("/chat/completions")(api.chat_completions)
    router.post("/completions")(api.completions)
    router.get("/models")(api.models)
    app.get("/health")(api.health)
    app.include_router(router)


def build_app(model, tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 8,
              context_length: int | None = None, batch_window_s: float = 0.02, max_body_bytes: int = 1_000_000,
              max_queue: int = 64, request_timeout_s: float = 60.0, max_stop: int = 4,
              max_stop_chars: int = 64, tools: str = "", batching: str = "continuous",
              encoder: torch.nn.Module | None = None, start_worker: bool = True) -> FastAPI:
    """The FastAPI app serving ``model``; its worker starts (on a thread of its own; ``start_worker=False``: the
    caller runs it, ``run_app``) and stops with the app (``app.state.worker``).

    ``context_length`` (default ``model.cfg.max_seq_len``) bounds prompt tokens + max_tokens; the limits are
    described in the module docstring. ``encoder``: a vision run's image encoder (``vision.load_encoder``), for
    requests with images.
    """
    worker = Worker(model, tokenizer, max_batch, batch_window_s, max_queue, batching)
    limits = {"request_timeout_s": request_timeout_s, "max_stop": max_stop, "max_stop_chars": max_stop_chars}
    api = _Api(worker, tokenizer, model_name, api_key, context_length or model.cfg.max_seq_len,
               next(model.parameters()).device, limits, encoder)
    api.tool = make_tool(tools, tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        if start_worker:
            worker.start()
        yield
        worker.stop()

    app = FastAPI(title="slmforge", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(_BodyLimit, max_body_bytes=max_body_bytes)
    _add_exception_handlers(app, max_body_bytes)
    _add_routes(app, api)
    add_webpage(app)  # the chat page at /
    return app


def _usage(jobs: list[Job]) -> dict:
    completion = sum(job.num_tokens for job in jobs)
    return {"prompt_tokens": len(jobs[0].ids), "completion_tokens": completion,
            "total_tokens": len(jobs[0].ids) + completion}


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run ``app`` with uvicorn on a background thread; yield its base URL. Port 0 picks a free port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="slmforge-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join()


def run_app(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` (``build_app(..., start_worker=False)``) until SIGINT or SIGTERM: uvicorn on a thread, the
    model loop (``Worker.run_here``) on this one, the thread that loaded the model (``Worker.run_here`` says why).

    A signal starts uvicorn's graceful shutdown (a second one forces it); its lifespan then stops the worker, which
    finishes the jobs in flight, and this returns. A server that cannot start (a port in use) stops the worker too,
    and this raises OSError.
    """
    import signal

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    http = threading.Thread(target=server.run, name="slmforge-http", daemon=True)

    def on_signal(signum, frame) -> None:
        server.force_exit = server.should_exit
        server.should_exit = True

    def watch() -> None:  # uvicorn ended without its lifespan's shutdown (it could not start): end the loop
        http.join()
        app.state.worker.stop(0.0)

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        threading.Thread(target=watch, name="slmforge-http-watch", daemon=True).start()
        app.state.worker.run_here()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        server.should_exit = True
        http.join()
    if not server.started:
        raise OSError(f"slmforge serve: could not serve on {host}:{port} (uvicorn's message above says why)")


def serve(checkpoint, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_batch: int = 8, device: str | None = None, **limits) -> None:
    """Load a run or checkpoint folder (and a vision run's image encoder) and serve it until interrupted. The API
    key defaults to $SLMFORGE_API_KEY; ``limits``: ``build_app``'s max_body_bytes, max_queue, request_timeout_s,
    max_stop, max_stop_chars, tools, batching."""
    model, tokenizer, cfg = load_for_inference(checkpoint, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = load_encoder(find_checkpoint(checkpoint)[0].root) if cfg.model.vision.feature_dim else None
    app = build_app(model, tokenizer, model_name or cfg.name, api_key or os.environ.get("SLMFORGE_API_KEY"),
                    max_batch, encoder=encoder, start_worker=False, **limits)
    run_app(app, host, port)

