"""An OpenAI-compatible HTTP server for slmforge checkpoints: chat and text completions, streamed or not.

Endpoints: ``/v1/chat/completions``, ``/v1/completions`` (both with ``stream: true`` as server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), ``/v1/models`` and ``/health``. Errors are JSON in OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``.

Design. The HTTP side is asyncio (FastAPI on uvicorn); the model runs on one ``Worker`` thread that owns it
(``worker.py`` describes how it batches and decodes). A request is validated and tokenized on the event loop
(``_Api``), becomes a ``Job`` and goes into the worker's queue. The job sends its events, ("text", piece) ...
("done", finish_reason, num_tokens), to its request's asyncio queue with ``call_soon_threadsafe``; a streaming
response turns each into a chunk as it comes.
"""

from __future__ import annotations

import asyncio
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
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from slmforge.checkpoint import load_for_inference
from slmforge.serve.worker import Job, Worker

__all__ = ["CHAT_STOP_TOKENS", "APIError", "ChatRequest", "CompletionRequest", "Job", "Worker", "build_app",
           "running_server", "serve"]

CHAT_STOP_TOKENS = ("<|end|>", "<|user|>")


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


class _Api:
    """The request side of one app: checks, turns requests into jobs and the worker's events into responses."""

    def __init__(self, worker: Worker, tokenizer, model_name: str, api_key: str | None, context_length: int,
                 device: torch.device):
        self.worker, self.tokenizer, self.model_name, self.api_key = worker, tokenizer, model_name, api_key
        self.context_length, self.device = context_length, device
        self.created = int(time.time())
        self.chat_stop_ids = tuple(tokenizer.token_id(t) for t in CHAT_STOP_TOKENS)

    async def check_key(self, request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if self.api_key is not None and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server has '{self.model_name}'.",
                           param="model", code="model_not_found")

    def make_job(self, req: _Request, text: str, param: str, max_tokens: int | None,
                 stop_ids: tuple[int, ...]) -> Job:
        self.check_model(req.model)
        if req.n != 1:
            raise APIError(400, "Only n=1 is supported.", param="n")
        # Token shards start every document after EOS, as ``generate.stream_text`` does.
        ids = [self.tokenizer.eos_id] + self.tokenizer.encode(text)
        context_length = self.context_length
        max_tokens = max_tokens or max(1, context_length - len(ids))
        if len(ids) + max_tokens > context_length:
            raise APIError(400, f"This model's maximum context length is {context_length} tokens; you asked for "
                                f"{len(ids) + max_tokens} ({len(ids)} in the {param}, {max_tokens} to generate).",
                           param=param, code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        generator = torch.Generator(self.device).manual_seed(req.seed) if req.seed is not None else None
        return Job(ids, max_tokens, temperature=req.temperature, top_p=req.top_p, stop=[s for s in stop if s],
                   stop_ids=(self.tokenizer.eos_id, *stop_ids), generator=generator)

    async def events(self, job: Job):
        """Submit ``job`` and yield its events as the worker sends them, up to its "done" or "error"."""
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                job.cancelled = True

        job.emit = emit
        self.worker.submit(job)
        try:
            while (event := await inbox.get())[0] == "text":
                yield event
            yield event
        finally:
            # Also runs when a client disconnects mid-stream (the response task is cancelled): the worker then
            # drops the row at its next step.
            job.cancelled = True

    async def collect(self, job: Job) -> tuple[str, str]:
        """Run ``job`` to the end -> (text, finish_reason)."""
        pieces = []
        async for event in self.events(job):
            if event[0] == "error":
                raise APIError(500, event[1], "server_error")
            if event[0] == "done":
                return "".join(pieces), event[1]
            pieces.append(event[1])

    def stream(self, job: Job, head: dict, choice: Callable[[str, str | None], dict], req: _Request,
               first: dict | None = None) -> StreamingResponse:
        """Server-sent events: ``first``, one chunk per text piece, the finish chunk, usage if asked, [DONE]."""
        def chunk(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        async def body():
            if first is not None:
                yield chunk([first])
            async for event in self.events(job):
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

    async def chat_completions(self, req: ChatRequest):
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(part.text for part in m.content)} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:  # an unknown role
            raise APIError(400, str(e), param="messages") from None
        job = self.make_job(req, text, "messages", req.max_completion_tokens or req.max_tokens, self.chat_stop_ids)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return self.stream(job, {**head, "object": "chat.completion.chunk"}, lambda piece, reason: {
                "index": 0, "delta": {} if reason else {"content": piece}, "logprobs": None, "finish_reason": reason},
                req, first={"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})
        text, reason = await self.collect(job)
        return {**head, "object": "chat.completion", "usage": _usage(job), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}]}

    async def completions(self, req: CompletionRequest):
        job = self.make_job(req, req.prompt, "prompt", req.max_tokens, ())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name}

        def choice(piece: str, reason: str | None) -> dict:
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}

        if req.stream:
            return self.stream(job, head, choice, req)
        text, reason = await self.collect(job)
        return {**head, "usage": _usage(job), "choices": [choice(text, reason)]}

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "slmforge"}]}

    async def health(self):
        return {"status": "ok", "model": self.model_name, "num_batches": self.worker.num_batches,
                "num_rows": self.worker.num_rows}


async def _invalid(request, e: RequestValidationError):
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


def _add_exception_handlers(app: FastAPI) -> None:
    """Every error as JSON in OpenAI's shape."""
    app.add_exception_handler(APIError, lambda request, e: e.response())
    # Unknown routes and methods (404, 405), and any bug: still JSON in OpenAI's shape.
    app.add_exception_handler(HTTPException, lambda request, e: APIError(e.status_code, str(e.detail)).response())
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
              context_length: int | None = None, batch_window_s: float = 0.02) -> FastAPI:
    """The FastAPI app serving ``model``; its worker starts and stops with the app (``app.state.worker``).

    ``context_length`` (default ``model.cfg.max_seq_len``) bounds prompt tokens + max_tokens.
    """
    worker = Worker(model, tokenizer, max_batch, batch_window_s)
    api = _Api(worker, tokenizer, model_name, api_key, context_length or model.cfg.max_seq_len,
               next(model.parameters()).device)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="slmforge", lifespan=lifespan)
    app.state.worker = worker
    _add_exception_handlers(app)
    _add_routes(app, api)
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

    model, tokenizer, cfg = load_for_inference(checkpoint, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    app = build_app(model, tokenizer, model_name or cfg.name, api_key or os.environ.get("SLMFORGE_API_KEY"),
                    max_batch)
    uvicorn.run(app, host=host, port=port)

