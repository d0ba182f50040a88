"""Teachers: an async client for any OpenAI-compatible chat endpoint, with our retry policy, and an offline one.

``TEACHERS`` maps a name to a class built from a ``TeacherConfig``; each has
``async complete(request) -> Completion`` and counts its retries and token usage:
  openai      any server speaking the chat-completions API (OpenAI, vLLM, llama.cpp, ``slmforge serve``).
              Base URL and model come from the config, else $OPENAI_BASE_URL and $SLMFORGE_TEACHER_MODEL. The
              key comes from ``api_key_file``, else the variable ``api_key_env`` names, else $OPENAI_API_KEY
              (``api_key`` given directly works too; config dumps mask it, see ``config.loading.masked``).
  procedural  no server, for trying a job offline: answers with ``procedural.py``'s verifiable generators in
              the format the template asks for (its field labels, in order). Word problems (math, exercises)
              are set in the job's topic with the topic's items where it knows them ("a bakery": cupcakes,
              ...); a textbook section is headed by the topic and opens with such a worked example, the rest
              generic (an invented entity's facts, stories); a rewrite keeps the passage as it is; a grounded
              question is a cloze on a sentence of the passage. Usage counts words, not tokens.

Retry policy (``OpenAITeacher``). The openai package's own retries are off (``max_retries=0``) so that one place
decides. Retried: HTTP 429 (waiting at least its Retry-After / retry-after-ms), 408, 409, 5xx, an attempt
running past ``timeout`` seconds (the whole attempt, not the gap between bytes, so a trickling server cannot
hold a slot forever), a dropped or refused connection, and a body that is not a chat completion. The wait
before retry k (k = 0, 1, ...) is "full jitter" (Brooker, "Exponential Backoff And Jitter", AWS Architecture
Blog 2015): uniform(0, min(backoff_max, backoff_base * 2^k)), which spreads a burst of failed clients out
instead of synchronising them. A request gives up after ``max_retries`` retries (``RetriesExhausted``: left
for the next run); once the run has spent ``max_total_retries`` retries, any further failure raises
``RetryBudgetExhausted`` so a dead or overloaded server stops the job rather than spinning. Other 4xx
answers are the request's own fault and would fail again: 400/413/422 raise ``RequestRejected`` (the job
records a reject), 401/403/404 raise ``TeacherSetupError`` (wrong key, model or URL: the job stops).
``concurrency`` bounds requests in flight with a semaphore, held only during an attempt (not while
backing off), so one request sleeping on a 429 does not idle a slot.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmforge.registry import lookup
from slmforge.synth import procedural


@dataclass
class TeacherConfig:
    name: str = "openai"  # TEACHERS key: "openai" or "procedural"
    base_url: str = ""  # "" -> $OPENAI_BASE_URL
    model: str = ""  # "" -> $SLMFORGE_TEACHER_MODEL
    api_key: str = ""  # better not: saved and printed masked, but seen in shell history; use api_key_env or _file
    api_key_env: str = ""  # environment variable holding the key; "" = $OPENAI_API_KEY ("none" when unset)
    api_key_file: str = ""  # file holding the key (its first line); read when the job starts, never saved
    concurrency: int = 8  # requests in flight
    timeout: float = 120.0  # seconds per attempt
    max_retries: int = 6  # per request
    max_total_retries: int = 1000  # per run of a job
    backoff_base: float = 1.0  # seconds; the wait before retry k is at most backoff_base * 2^k ...
    backoff_max: float = 60.0  # ... and at most this
    max_retry_after: float = 300.0  # a longer Retry-After is cut to this
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0  # jitter and the procedural teacher


@dataclass
class Request:
    id: str
    template: str  # template name
    procedural: str  # the PROCEDURAL_ANSWERS entry that answers this template offline
    messages: list[dict]
    seed: dict  # the seed item: {"topic", "audience", "style"} or {"doc_id", "passage"}
    sample: int = 0
    fields: list[str] = field(default_factory=list)  # the template's field labels, in order (offline answers use them)


@dataclass
class Completion:
    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    finish_reason: str | None = None


class RequestRejected(Exception):
    """The server refused this request for a reason that retrying will not fix (HTTP 400, 413, 422)."""


class TeacherSetupError(ValueError):
    """Wrong key, model or URL (HTTP 401, 403, 404): every request would fail, so the job stops."""


class RetriesExhausted(Exception):
    """One request failed ``max_retries + 1`` times; it is left for the next run."""


class RetryBudgetExhausted(Exception):
    """The run spent ``max_total_retries`` retries; the job stops issuing requests."""


def resolve_api_key(cfg: TeacherConfig) -> str:
    """The key: ``api_key``, else the first line of ``api_key_file``, else $``api_key_env`` (which must be set),
    else $OPENAI_API_KEY, else "none" (local servers ignore it). Errors name the key, never its value."""
    if cfg.api_key:
        if cfg.api_key == "***" or cfg.api_key.endswith("...****"):
            raise ValueError("teacher.api_key holds a masked key (copied from a saved config.yaml?); give the real "
                             "one with teacher.api_key_env=VAR or teacher.api_key_file=PATH")
        return cfg.api_key
    if cfg.api_key_file:
        try:
            lines = Path(cfg.api_key_file).read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"teacher.api_key_file={cfg.api_key_file}: cannot read it "
                             f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"teacher.api_key_file={cfg.api_key_file}: the file is empty; put the key on line 1")
        return lines[0].strip()
    if cfg.api_key_env:
        if not os.environ.get(cfg.api_key_env):
            raise ValueError(f"teacher.api_key_env={cfg.api_key_env}: ${cfg.api_key_env} is not set (or empty)")
        return os.environ[cfg.api_key_env]
    return os.environ.get("OPENAI_API_KEY") or "none"


def backoff_delay(retry: int, cfg: TeacherConfig, rng: random.Random, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``retry`` (0-based): full jitter, and never less than Retry-After."""
    delay = rng.uniform(0.0, min(cfg.backoff_max, cfg.backoff_base * 2.0 ** retry))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cfg.max_retry_after))
    return delay


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); None if absent or garbled."""
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        if re.fullmatch(r"\s*\d+(\.\d*)?\s*", value):
            return float(value)
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class _Accounting:
    """Retries (total and by reason) and token usage shared by all requests of one run."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.retries = 0
        self.retry_reasons: Counter = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def add_usage(self, c: Completion) -> Completion:
        self.prompt_tokens += c.prompt_tokens
        self.completion_tokens += c.completion_tokens
        return c


class OpenAITeacher(_Accounting):
    """Chat completions over ``AsyncOpenAI`` with the retry policy in the module docstring.

    ``http_client`` (an ``httpx2.AsyncClient``, openai's HTTP library) lets tests and benchmarks plug in a
    mock transport. Each request carries ``X-Request-Id: <request id>`` so server logs (and the tests' fault
    server) can tell attempts of one request apart.
    """

    def __init__(self, cfg: TeacherConfig, http_client: Any = None):
        import openai

        super().__init__(cfg)
        base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL", "")
        self.model = cfg.model or os.environ.get("SLMFORGE_TEACHER_MODEL", "")
        if not base_url or not self.model:
            raise ValueError("teacher 'openai' needs a server and a model: set teacher.base_url and teacher.model "
                             "in the job (or $OPENAI_BASE_URL and $SLMFORGE_TEACHER_MODEL), or use "
                             "teacher.name=procedural to run offline")
        api_key = resolve_api_key(cfg)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=cfg.timeout,
                                         http_client=http_client)
        self.semaphore = asyncio.Semaphore(cfg.concurrency)
        self.rng = random.Random(f"slmforge.teacher:{cfg.seed}")

    async def _attempt(self, request: Request) -> Completion:
        async with self.semaphore:
            response = await asyncio.wait_for(self.client.chat.completions.create(
                model=self.model, messages=request.messages, max_tokens=self.cfg.max_tokens,
                temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                extra_headers={"X-Request-Id": request.id}), self.cfg.timeout)
        choices = getattr(response, "choices", None)
        if not choices or not isinstance(getattr(choices[0].message, "content", None), str):
            raise ValueError("response has no choices[0].message.content")
        usage = getattr(response, "usage", None)
        return Completion(choices[0].message.content, getattr(response, "model", None) or self.model,
                          getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0,
                          finish_reason=choices[0].finish_reason)

    async def complete(self, request: Request) -> Completion:
        import openai

        for retry in itertools.count():
            retry_after = None
            try:
                completion = await self._attempt(request)
                completion.retries = retry
                return self.add_usage(completion)
            except (asyncio.TimeoutError, openai.APITimeoutError):
                reason = "timeout"
            except openai.APIConnectionError:
                reason = "connection"
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in (401, 403, 404):
                    raise TeacherSetupError(f"teacher at {self.client.base_url} answered HTTP {status} for model "
                                            f"{self.model!r}: check teacher.base_url, model and api_key "
                                            f"({str(exc)[:300]})") from None
                if status != 429 and status < 500 and status not in (408, 409):
                    raise RequestRejected(f"http {status}: {str(exc)[:300]}") from None
                reason, retry_after = f"http {status}", parse_retry_after(exc.response.headers)
            except ValueError:  # a body that is not JSON, or JSON that is not a chat completion
                reason = "bad response"
            if retry == self.cfg.max_retries:
                raise RetriesExhausted(f"{reason} after {retry + 1} attempts")
            if self.retries >= self.cfg.max_total_retries:
                raise RetryBudgetExhausted(f"{self.retries} retries spent (teacher.max_total_retries); last: {reason}")
            self.retries += 1
            self.retry_reasons[reason] += 1
            await asyncio.sleep(backoff_delay(retry, self.cfg, self.rng, retry_after))

    async def close(self) -> None:
        await self.client.close()


# ---------------------------------------------------------------- offline teacher


def _procedural_section(rng: random.Random, request: Request) -> str:
    """A rewrite keeps the passage whole under a heading of its first words (it adds nothing). Otherwise a section
    headed by the job's topic with a worked example set in it, then a facts paragraph, its questions, and
    stories until it has 130+ words."""
    passage, topic = request.seed.get("passage", "").strip(), request.seed.get("topic", "")
    if passage:
        return f"# {' '.join(passage.split()[:6]).rstrip('.,;:')}\n\n{passage}"
    heading = []
    if topic:
        problem, working = _procedural_exercise(rng, request)
        heading = [f"# {topic[:1].upper()}{topic[1:]}", f"A worked example about {topic}. {problem}", working]
    doc = procedural.facts(rng)
    paragraph, questions = doc.text.split("\n\n", 1)
    parts = [*(heading or [f"# {doc.meta['entity']}"]), paragraph, "## Check your understanding", questions,
             "## A story"]
    while len(" ".join(parts).split()) < 130:
        parts.append(procedural.narrative(rng).text)
    return "\n\n".join(parts)


def _procedural_math(rng: random.Random, request: Request) -> list[str]:
    doc = procedural.arithmetic(rng, request.seed.get("topic", ""))
    return [doc.meta["question"], doc.meta["solution"]]


def _procedural_exercise(rng: random.Random, request: Request) -> list[str]:
    """A word problem set in the topic, its steps worked in words (no calculator annotations) to the answer."""
    doc = procedural.arithmetic(rng, request.seed.get("topic", ""))
    steps = [re.sub(r"<<[^<>]*>>", "", line) for line in doc.meta["solution"].splitlines()[:-1]]
    return [doc.meta["question"], " ".join(steps) + f" The answer is {doc.meta['answer']}."]


def _procedural_qa(rng: random.Random, request: Request) -> list[str]:
    """A cloze question on one sentence of the passage, so the answer is quoted from (grounded in) it."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", request.seed.get("passage", "")) if len(s.split()) >= 4]
    if not sentences:
        return ["What is the passage about?", "The passage is too short.", "Nothing."]
    sentence = rng.choice(sentences)
    words = sentence.split()
    k = max(range(len(words)), key=lambda i: (len(words[i].strip(".,;:!?\"'")), -i))
    answer = words[k].strip(".,;:!?\"'")
    blank = " ".join(words[:k] + ["____"] + words[k + 1:])
    return [f"Which word fills the blank: \"{blank}\"?", f"The passage says \"{sentence}\"", answer]


# name -> (answer, the field labels it writes when the template's own fields do not fit); an answer returns the
# text (no fields) or one value per field, written as "Label: value" lines under the template's field names.
PROCEDURAL_ANSWERS = {"section": (_procedural_section, ()), "gsm8k": (_procedural_math, ("question", "solution")),
                      "exercise": (_procedural_exercise, ("exercise", "solution")),
                      "qa": (_procedural_qa, ("question", "reasoning", "answer"))}


def procedural_answer(rng: random.Random, request: Request) -> str:
    """The offline answer to ``request``, in the format its template asks for (its field names, in order)."""
    answer, labels = lookup(PROCEDURAL_ANSWERS, request.procedural, "procedural answer (the template's 'procedural')")
    values = answer(rng, request)
    if isinstance(values, str):
        return values
    labels = request.fields if len(request.fields) == len(values) else labels
    return "\n".join(f"{label.capitalize()}: {value}" for label, value in zip(labels, values))


class ProceduralTeacher(_Accounting):
    """Offline teacher: the answer depends only on the request id and ``cfg.seed``, so reruns are reproducible."""

    model = "procedural"

    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg)

    async def complete(self, request: Request) -> Completion:
        text = procedural_answer(random.Random(f"{self.cfg.seed}:{request.id}"), request)
        prompt_words = sum(len(str(m["content"]).split()) for m in request.messages)
        return self.add_usage(Completion(text, self.model, prompt_words, len(text.split()), finish_reason="stop"))

    async def close(self) -> None:
        pass


TEACHERS = {"openai": OpenAITeacher, "procedural": ProceduralTeacher}
