"""The model worker of ``slmforge.serve.server``: one thread that owns the model and decodes queued jobs in batches.

Design. The HTTP side (``server.py``) is asyncio; the model runs on one ``Worker`` thread that owns it, so it
never runs from two threads at once (and that thread sets torch's inference mode). A request is validated and
tokenized on the event loop, becomes ``n`` ``Job``s (one per choice) and goes into the worker's queue
(``batching.JobQueue``). Each row of a batch samples with its own temperature, top-p and seeded generator, and a
row that finishes (EOS, a stop token or string, ``max_tokens``, its deadline, or a client gone away) leaves the
batch. A job's ``tool`` (``tools.py``, the calculator) reads its ids after each token and queues ids that its row
feeds next instead of sampled ones. Rows decode as they would alone, so batching changes no result (the tests
check it). A job sends its events, ("text", piece) ... ("done", finish_reason, num_tokens), through its ``emit``
callback, which the server points at its request's asyncio queue with ``call_soon_threadsafe``.
Two schedulers (``batching``): "continuous" (the default; ``batching.py``) lets waiting jobs join the running batch
at every step boundary, up to ``max_batch`` rows, so a request waits at most one decoding step and its own
prefill for its first token; "static" takes the first job waiting plus the others already queued, up to
``max_batch``, and decodes them in one left-padded batch (``generate.PaddedDecoder``) that nothing joins until its
last row has finished; after a batch of k > 1 rows it waits up to ``batch_window_s`` for k jobs. Every model
batches either way, whatever its mixers: the padding lives in the model's caches (``LM.init_cache(num_pad=...)``).
Images (a vision run): a job carries its images' encoder features and its prompt's image slots; they enter the
model at the prefill only (rows without images have no slots), and the caches carry them from there, so jobs
with and without images share batches in either scheduler.
Limits. ``submit`` refuses jobs (``QueueFull``) when ``max_queue`` jobs already wait; the server answers 429. A
job past its ``deadline`` (``time.monotonic()``) finishes at the worker's next step, waiting or decoding (static:
when it is taken from the queue), with the text decoded so far and finish_reason "length", as if max_tokens were
reached; a cancelled job (its client hung up) leaves the batch at the next step and is never decoded further.
``stop(grace_s)`` refuses new jobs (``ShuttingDown``, 503), lets the jobs in flight and waiting finish, and ends
those still running after ``grace_s`` as at their deadline, so every stream ends cleanly.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from slmforge.log import log
from slmforge.serve.batching import JobQueue, QueueFull, RunningBatch, ShuttingDown, prompt_images, unmergeable
from slmforge.serve.generate import PaddedDecoder, sample_next
from slmforge.serve.tools import Tool, force

__all__ = ["Job", "QueueFull", "ShuttingDown", "Worker"]


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
    deadline: float = float("inf")  # time.monotonic() after which the job ends with finish_reason "length"
    tool: Tool | None = None  # tools.py: ids to force after each token (the calculator)
    images: torch.Tensor | None = None  # (N, P, F): its images' encoder features, fed at the prefill only
    image_slots: list[bool] | None = None  # per prompt id: an image slot (N * P of them, in order)
    strip_leading: bool = False  # the text starts after its leading spaces (the plain vision template's " answer")
    index: int = 0  # which of its request's n choices
    queued: float = 0.0  # time.monotonic() when it was submitted
    new: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)  # queued by ``tool``, fed before sampling resumes
    emitted: str = ""
    num_tokens: int = 0
    done: bool = False  # its "done" event was sent

    def push(self, token: int, decode: Callable[[list[int]], str]) -> bool:
        """Take one sampled token and emit the text that is now certain; True when the job has finished.

        Like ``generate.stream_text``: stop tokens and strings are not emitted, and the end of the text is held
        back while it may be the start of a stop string or an incomplete UTF-8 character.
        """
        self.num_tokens += 1
        if token in self.stop_ids:
            return self._finish(self._text(decode), "stop")
        self.new.append(token)
        if self.tool is not None and not self.forced:
            self.forced = self.tool(self.new)
        text = self._text(decode)
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

    def choices(self, n: int, seed: int | None) -> list[Job]:
        """This job (choice 0) and ``n - 1`` copies of it, choice i with its own generator seeded ``seed + i``."""
        copies = [dataclasses.replace(self, index=i, new=[], forced=[], generator=None if seed is None else
                                      torch.Generator(self.generator.device).manual_seed((seed + i) % 2**63))
                  for i in range(1, n)]
        return [self, *copies]

    def expire(self, decode: Callable[[list[int]], str]) -> None:
        """End at the deadline: the text so far, finish_reason "length"."""
        self._finish(self._text(decode), "length")

    def _text(self, decode: Callable[[list[int]], str]) -> str:
        text = decode(self.new)
        # Spaces only: a newline first is the plain template's end of the answer (a stop string), never stripped.
        return text.lstrip(" ") if self.strip_leading else text

    def _finish(self, text: str, reason: str) -> bool:
        if len(text) > len(self.emitted):
            self.emit(("text", text[len(self.emitted):]))
        self.emit(("done", reason, self.num_tokens))
        self.done = True
        return True


class Worker:
    """The one thread that runs the model; ``submit`` jobs from any thread.

    Counters: ``num_batches`` (static: batches; continuous: prefills of joining jobs), ``num_rows`` (rows started),
    ``num_steps`` (decoding steps after a prefill), ``num_cancelled`` (jobs dropped because their client left),
    ``num_expired`` (jobs ended at their deadline), ``num_tokens`` (tokens decoded), ``active_rows`` (rows in the
    batch now).
    """

    def __init__(self, model, tokenizer, max_batch: int = 8, batch_window_s: float = 0.02, max_queue: int = 64,
                 batching: str = "continuous"):
        if batching not in ("continuous", "static"):
            raise ValueError(f"batching={batching!r}: expected continuous or static")
        self.model, self.tokenizer = model.eval(), tokenizer
        if batching == "continuous" and (cache := unmergeable(model)) is not None:
            log(f"serve: continuous batching cannot merge a {cache}; batching=static")
            batching = "static"
        self.max_batch, self.max_queue, self.batching = max_batch, max_queue, batching
        self.batch_window_s = batch_window_s
        self.queue = JobQueue(max_queue)
        self.thread = threading.Thread(target=self._run, name="slmforge-model", daemon=True)
        self._started, self._done = False, threading.Event()  # the model loop began / has returned
        self.num_batches = self.num_rows = self.num_cancelled = self.num_expired = self.num_tokens = 0
        self.num_steps = self.active_rows = 0
        self._last_batch_size = 1
        self._grace = float("inf")  # stop(): every job ends by then

    def start(self) -> None:
        """Run the model loop on a thread of its own."""
        self._started = True
        self.thread.start()

    def run_here(self) -> None:
        """Run the model loop on the calling thread until ``stop`` has let the jobs finish.

        ``server.run_app`` runs it on the main thread, the one that loaded the model, so that the process has one
        OpenMP thread team: a second team (the worker thread's, once the main thread has run a parallel op) makes
        libgomp throttle its spin-waiting when the teams outnumber the cores, and every parallel op then pays a
        wake-up: a float32 linear of 20 rows takes 90-130 us instead of 22 on 2 cores, a decoding step of the
        demo model twice as long.
        """
        self._started = True
        self._run()

    def stop(self, grace_s: float = 10.0) -> None:
        """Refuse new jobs, finish the others, ending those still running after ``grace_s`` seconds; returns once
        the model loop has (from any thread but the loop's own)."""
        self._grace = time.monotonic() + grace_s
        self.queue.close()
        if self._started:
            self._done.wait()

    def submit(self, *jobs: Job) -> None:
        """Queue ``jobs`` (a request's choices), all or none: ``QueueFull`` when ``max_queue`` jobs already wait,
        ``ShuttingDown`` after ``stop``."""
        for job in jobs:
            job.queued = time.monotonic()
        self.queue.put(list(jobs))

    def _usable(self, job: Job) -> bool:
        """False (and counted) for a job that was cancelled or is past its deadline; an expired job ends now."""
        if job.cancelled:
            self.num_cancelled += 1
            return False
        if time.monotonic() > min(job.deadline, self._grace):
            self.num_expired += 1
            job.expire(self.tokenizer.decode)
            return False
        return True

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                if self.batching == "continuous":
                    return self._run_continuous()
                while (jobs := self._take()) is not None:
                    try:
                        self.run_batch(jobs)
                    except Exception as e:  # a failing batch must not take the worker (and the server) down
                        _fail(jobs, e)
        finally:
            self._done.set()

    def _run_continuous(self) -> None:
        """Until stopped with nothing left: let waiting jobs join the batch, then decode one step."""
        batch = RunningBatch(self.model)
        while batch.jobs or self.queue.wait():
            self.queue.drop(self._usable)
            joining = self.queue.take(self.max_batch - len(batch.live())) if self._join_now(batch) else []
            try:
                self._join(batch, joining)
                if batch.jobs:
                    self._advance(batch)
            except Exception as e:  # a failing step must not take the worker (and the server) down
                _fail([job for job in batch.jobs if job is not None] + joining, e)
                batch = RunningBatch(self.model)
            self.active_rows = len(batch.live())

    def _join_now(self, batch: RunningBatch) -> bool:
        """Whether the waiting jobs join now: at once into an empty batch, else once they number a quarter of the
        rows decoding or the oldest has waited ``batch_window_s`` (a prefill costs about a decoding step, so
        prefilling jobs one by one as they come would double the forwards of a busy batch)."""
        live = len(batch.live())
        oldest = self.queue.oldest()
        return oldest is not None and (4 * self.queue.qsize() >= live or
                                       time.monotonic() - oldest.queued >= self.batch_window_s)

    def _join(self, batch: RunningBatch, jobs: list[Job]) -> None:
        """Prefill ``jobs``, give each its first token and merge those that go on into ``batch``."""
        jobs = [job for job in jobs if self._usable(job)]
        if not jobs:
            return
        self.num_batches += 1
        self.num_rows += len(jobs)
        logits, caches, index = batch.prefill(jobs)
        nxt = force(_sample(logits, jobs), [j.forced for j in jobs])  # (J,)
        self.num_tokens += len(jobs)
        alive = [r for r, (job, token) in enumerate(zip(jobs, nxt.tolist())) if self._step(job, token)]
        rows = torch.tensor(alive, dtype=torch.long, device=nxt.device)
        batch.add([jobs[r] for r in alive], caches, index[rows], nxt[rows])

    def _advance(self, batch: RunningBatch) -> None:
        """One decoding step of every row in ``batch``; the rows that finish leave it."""
        logits = batch.step()
        jobs = batch.jobs  # None: a finished row, still in the batch
        nxt = force(_sample(logits, jobs), [[] if j is None else j.forced for j in jobs])  # (B,)
        self.num_steps += 1
        self.num_tokens += len(jobs) - jobs.count(None)
        batch.end([r for r, (job, token) in enumerate(zip(jobs, nxt.tolist()))
                   if job is not None and not self._step(job, token)], nxt)

    def _take(self) -> list[Job] | None:
        """Static batching: wait for a job, then add the jobs already waiting; None = stopped with nothing left.

        After a batch of several rows, wait up to ``batch_window_s`` until as many jobs have come as that batch had.
        """
        jobs: list[Job] = []
        while not jobs:
            if not self.queue.wait():
                return None
            jobs = [job for job in self.queue.take(1) if self._usable(job)]
        deadline = time.monotonic() + self.batch_window_s
        while len(jobs) < self.max_batch:
            wait = deadline - time.monotonic() if len(jobs) < self._last_batch_size else 0.0
            if not self.queue.wait(max(0.0, wait)):
                break
            jobs += [job for job in self.queue.take(1) if self._usable(job)]
        self._last_batch_size = len(jobs)
        return jobs

    def run_batch(self, jobs: list[Job]) -> None:
        """Static batching: decode ``jobs`` together until each has finished or been cancelled."""
        self.num_batches += 1
        self.num_rows += len(jobs)
        self.active_rows = len(jobs)
        try:
            images, slots = prompt_images(jobs)
            decoder = PaddedDecoder(self.model, [j.ids for j in jobs], max(j.max_tokens for j in jobs),
                                    images=images, image_slots=slots)
            logits = decoder.prefill()  # (B, V)
            while True:
                nxt = force(_sample(logits, jobs), [j.forced for j in jobs])  # (B,)
                self.num_tokens += len(jobs)
                alive = [r for r, (job, token) in enumerate(zip(jobs, nxt.tolist())) if self._step(job, token)]
                if not alive:
                    return
                nxt, jobs = decoder.keep(alive, nxt), [jobs[r] for r in alive]
                self.active_rows = len(jobs)
                logits = decoder.step(nxt)
                self.num_steps += 1
        finally:
            self.active_rows = 0

    def _step(self, job: Job, token: int) -> bool:
        """Give ``job`` its next token; False when it leaves the batch (finished, cancelled or expired)."""
        if not self._usable(job):  # cancelled while its step ran (or, then, past its deadline)
            return False
        return not job.push(token, self.tokenizer.decode) and self._usable(job)


def _fail(jobs: list[Job], e: Exception) -> None:
    """Send an error to each of ``jobs`` that has not finished."""
    for job in dict.fromkeys(jobs):
        if not job.done:
            job.emit(("error", f"{type(e).__name__}: {e}"))


def _sample(logits: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
    """logits (B, V) -> next ids (B,), each row with its own job's settings and generator (None: greedy)."""
    if all(j is None or j.temperature <= 0 for j in jobs):
        return logits.argmax(-1)
    return torch.cat([sample_next(logits[r : r + 1], 0 if j is None else j.temperature, 0, 1 if j is None else j.top_p,
                                  None if j is None else j.generator) for r, j in enumerate(jobs)])
