"""An OpenAI-compatible HTTP server for slmforge checkpoints: chat and text completions, streamed or not.

Endpoints: ``/v1/chat/completions``, ``/v1/completions`` (both with ``stream: true`` as server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), ``/v1/models`` and ``/health``. Errors are JSON in OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``.

Design. The HTTP side is asyncio (FastAPI on uvicorn); the model runs on one ``Worker`` thread that owns it, so it
never runs from two threads at once (and that thread sets torch's inference mode). A request is validated and
tokenized on the event loop, becomes a ``Job`` and goes into the worker's queue. The worker takes the first job
waiting plus the others already queued, up to ``max_batch``, and decodes them in one left-padded batch
(``generate.PaddedDecoder``), streamed or not, greedy or sampled: each row samples with its own temperature, top-p
and seeded generator, and a row that finishes (EOS, a stop token or string, ``max_tokens``, or a client gone away)
leaves the batch. Rows decode as they would alone, so batching changes no result (the tests check it). A job sends
its events, ("text", piece) ... ("done", finish_reason, num_tokens), to its request's asyncio queue with
``call_soon_threadsafe``; a streaming response turns each into a chunk as it comes.
Requests do not join a batch that is already decoding (continuous batching): ``PaddedDecoder`` cannot add rows,
and batching what arrives together already gives the speedup at a handful of clients. Instead, after a batch of
k > 1 rows the worker waits up to ``batch_window_s`` for k jobs, because clients that send their next request just
after their answer would otherwise split into ever smaller batches. Every model batches so, whatever its mixers:
the padding lives in the model's caches (``LM.init_cache(num_pad=...)``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from slmforge.serve.generate import PaddedDecoder, sample_next

CHAT_STOP_TOKENS = ("<|end|>", "<|user|>")


# ---------------------------------------------------------------- the model worker


@dataclass(eq=False)
class Job:
    """One request's generation. ``emit`` receives ("text", str), then ("done", finish_reason, num_tokens)
    or ("error", message); it is called on the worker thread."""

    ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_ids: tuple[int, ...] = ()
    generator: torch.Generator | None = None
    cancelled: bool = False  # set by the request side when its client goes away
    new: list[int] = field(default_factory=list)
    emitted: str = ""
    num_tokens: int = 0

    def push(self, token: int, decode: Callable[[list[int]], str]) -> bool:
        """Take one sampled token and emit the text that is now certain; True when the job has finished.

        Like ``generate.stream_text``: stop tokens and strings are not emitted, and the end of the text is held
        back while it may be the start of a stop string or an incomplete UTF-8 character.
        """
        self.num_tokens += 1
        if token in self.stop_ids:
            return self._finish(decode(self.new), "stop")
        self.new.append(token)
        text = decode(self.new)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            return self._finish(text[:cut], "stop")
        if self.num_tokens == self.max_tokens:
            return self._finish(text, "length")
        safe = len(text) - max((len(s) for s in self.stop), default=0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > len(self.emitted):
            self.emit(("text", text[len(self.emitted):safe]))
            self.emitted = text[:safe]
        return False

    def _finish(self, text: str, reason: str) -> bool:
        if len(text) > len(self.emitted):
            self.emit(("text", text[len(self.emitted):]))
        self.emit(("done", reason, self.num_tokens))
        return True


class Worker:
    """The one thread that runs the model; ``submit`` jobs from any thread."""

    def __init__(self, model, tokenizer, max_batch: int = 8, batch_window_s: float = 0.02):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="slmforge-model", daemon=True)
        self.num_batches = self.num_rows = self.num_cancelled = 0
        self._last_batch_size = 1

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def _run(self) -> None:
        with torch.inference_mode():
            while (jobs := self._take()) is not None:
                try:
                    self.run_batch(jobs)
                except Exception as e:  # a failing batch must not take the worker (and the server) down
                    for job in jobs:
                        job.emit(("error", f"{type(e).__name__}: {e}"))

    def _take(self) -> list[Job] | None:
        """Block for a job, then add the jobs already waiting; None = stop.

        After a batch of several rows, wait up to ``batch_window_s`` until as many jobs have come as that batch had.
        """
        jobs: list[Job] = []
        while not jobs:
            job = self.queue.get()
            if job is None:
                return None
            if not job.cancelled:
                jobs.append(job)
        deadline = time.monotonic() + self.batch_window_s
        while len(jobs) < self.max_batch:
            wait = deadline - time.monotonic() if len(jobs) < self._last_batch_size else 0.0
            try:
                job = self.queue.get(timeout=max(0.0, wait))
            except queue.Empty:
                break
            if job is None:  # finish this batch first, then stop
                self.queue.put(None)
                break
            if not job.cancelled:
                jobs.append(job)
        self._last_batch_size = len(jobs)
        return jobs

    def run_batch(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` together until each has finished or been cancelled."""
        self.num_batches += 1
        self.num_rows += len(jobs)
        decoder = PaddedDecoder(self.model, [j.ids for j in jobs], max(j.max_tokens for j in jobs))
        logits = decoder.prefill()  # (B, V)
        while True:
            nxt = _sample(logits, jobs)  # (B,)
            alive = []
            for r, (job, token) in enumerate(zip(jobs, nxt.tolist())):
                self.num_cancelled += job.cancelled
                if not job.cancelled and not job.push(token, self.tokenizer.decode):
                    alive.append(r)
            if not alive:
                return
            nxt, jobs = decoder.keep(alive, nxt), [jobs[r] for r in alive]
            logits = decoder.step(nxt)


def _sample(logits: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
    """logits (B, V) -> next ids (B,), each row with its own job's settings and generator."""
    if all(j.temperature <= 0 for j in jobs):
        return logits.argmax(-1)
    return torch.cat([sample_next(logits[r : r + 1], j.temperature, 0, j.top_p, j.generator)
                      for r, j in enumerate(jobs)])


# ---------------------------------------------------------------- the HTTP API


class APIError(Exception):
    """A request that fails with HTTP ``status``, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, self.status)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, penalties, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        # Some clients send every field, unset ones as null; those get the defaults.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: str
    content: str | list[_TextPart]


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str


def build_app(model, tokenizer, model_name: str, api_key: str | None = None, max_batch: int = 8,
              context_length: int | None = None, batch_window_s: float = 0.02) -> FastAPI:
    """The FastAPI app serving ``model``; its worker starts and stops with the app (``app.state.worker``).

    ``context_length`` (default ``model.cfg.max_seq_len``) bounds prompt tokens + max_tokens.
    """
    worker = Worker(model, tokenizer, max_batch, batch_window_s)
    context_length = context_length or model.cfg.max_seq_len
    device = next(model.parameters()).device
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="slmforge", lifespan=lifespan)
    app.state.worker = worker
    app.add_exception_handler(APIError, lambda request, e: e.response())
    # Unknown routes and methods (404, 405), and any bug: still JSON in OpenAI's shape.
    app.add_exception_handler(HTTPException, lambda request, e: APIError(e.status_code, str(e.detail)).response())
    app.add_exception_handler(Exception, lambda request, e: APIError(500, f"{type(e).__name__}: {e}",
                                                                     "server_error").response())

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        """Malformed JSON, missing fields and out-of-range values: 400 (FastAPI's default is 422)."""
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            message, param = f"invalid JSON at character {first['loc'][-1]}: {first['ctx']['error']}", None
        else:
            param = ".".join(str(p) for p in first["loc"][1:]) or None
            # No field named: not a JSON object, or (FastAPI's CSRF guard) sent without Content-Type: application/json
            message = f"{param}: {first['msg']}" if param else \
                f"the body must be a JSON object sent with Content-Type: application/json ({first['msg']})"
        return APIError(400, message, param=param, code=first["type"]).response()

    async def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if api_key is not None and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server has '{model_name}'.",
                           param="model", code="model_not_found")

    def make_job(req: _Request, text: str, param: str, max_tokens: int | None, stop_ids: tuple[int, ...]) -> Job:
        check_model(req.model)
        if req.n != 1:
            raise APIError(400, "Only n=1 is supported.", param="n")
        # Token shards start every document after EOS, as ``generate.stream_text`` does.
        ids = [tokenizer.eos_id] + tokenizer.encode(text)
        max_tokens = max_tokens or max(1, context_length - len(ids))
        if len(ids) + max_tokens > context_length:
            raise APIError(400, f"This model's maximum context length is {context_length} tokens; you asked for "
                                f"{len(ids) + max_tokens} ({len(ids)} in the {param}, {max_tokens} to generate).",
                           param=param, code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        generator = torch.Generator(device).manual_seed(req.seed) if req.seed is not None else None
        return Job(ids, max_tokens, temperature=req.temperature, top_p=req.top_p, stop=[s for s in stop if s],
                   stop_ids=(tokenizer.eos_id, *stop_ids), generator=generator)

    async def events(job: Job):
        """Submit ``job`` and yield its events as the worker sends them, up to its "done" or "error"."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                job.cancelled = True

        job.emit = emit
        worker.submit(job)
        try:
            while (event := await inbox.get())[0] == "text":
                yield event
            yield event
        finally:
            # Also runs when a client disconnects mid-stream (the response task is cancelled): the worker then
            # drops the row at its next step.
            job.cancelled = True

    async def collect(job: Job) -> tuple[str, str]:
        """Run ``job`` to the end -> (text, finish_reason)."""
        pieces = []
        async for event in events(job):
            if event[0] == "error":
                raise APIError(500, event[1], "server_error")
            if event[0] == "done":
                return "".join(pieces), event[1]
            pieces.append(event[1])

    def stream(job: Job, head: dict, choice: Callable[[str, str | None], dict], req: _Request,
               first: dict | None = None) -> StreamingResponse:
        """Server-sent events: ``first``, one chunk per text piece, the finish chunk, usage if asked, [DONE]."""
        def chunk(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        async def body():
            if first is not None:
                yield chunk([first])
            async for event in events(job):
                if event[0] == "error":
                    yield f"data: {json.dumps({'error': APIError(500, event[1], 'server_error').body})}\n\n"
                elif event[0] == "text":
                    yield chunk([choice(event[1], None)])
                else:
                    yield chunk([choice("", event[1])])
                    if (req.stream_options or {}).get("include_usage"):
                        yield chunk([], usage=_usage(job))
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])
    chat_stop_ids = tuple(tokenizer.token_id(t) for t in CHAT_STOP_TOKENS)

    @router.post("/chat/completions")
    async def chat_completions(req: ChatRequest):
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content)} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:  # an unknown role
            raise APIError(400, str(e), param="messages") from None
        job = make_job(req, text, "messages", req.max_completion_tokens or req.max_tokens, chat_stop_ids)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            return stream(job, {**head, "object": "chat.completion.chunk"}, lambda piece, reason: {
                "index": 0, "delta": {} if reason else {"content": piece}, "logprobs": None, "finish_reason": reason},
                req, first={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})
        text, reason = await collect(job)
        return {**head, "object": "chat.completion", "usage": _usage(job), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}]}

    @router.post("/completions")
    async def completions(req: CompletionRequest):
        job = make_job(req, req.prompt, "prompt", req.max_tokens, ())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def choice(piece: str, reason: str | None) -> dict:
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}

        if req.stream:
            return stream(job, head, choice, req)
        text, reason = await collect(job)
        return {**head, "usage": _usage(job), "choices": [choice(text, reason)]}

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "slmforge"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "num_batches": worker.num_batches, "num_rows": worker.num_rows}

    app.include_router(router)
    return app


def _usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": job.num_tokens,
            "total_tokens": len(job.ids) + job.num_tokens}


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


def serve(checkpoint, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_batch: int = 8, device: str | None = None) -> None:
    """Load a run or checkpoint folder and serve it until interrupted. The API key defaults to $SLMFORGE_API_KEY."""
    import uvicorn

    from slmforge.checkpoint import load_for_inference

    model, tokenizer, cfg = load_for_inference(checkpoint, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    app = build_app(model, tokenizer, model_name or cfg.name, api_key or os.environ.get("SLMFORGE_API_KEY"),
                    max_batch)
    uvicorn.run(app, host=host, port=port)

