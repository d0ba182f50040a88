"""Continuous batching for ``worker.Worker``: requests join the running batch at step boundaries and leave when done.

``RunningBatch`` holds the rows decoding now: their jobs, one cache per layer (``LM.init_cache``) and the ids each
row feeds next. Its rows are right-aligned: every row's last token sits in the last slot written, and a row
shorter than the longest is left-padded (the caches' ``num_pad``), so one ``LM.forward`` on (B, 1) ids advances
every row by one token, each at its own RoPE position with padding masked (``model/cache.py``).

A step boundary: jobs that wait are prefilled together (``prefill``: one left-padded forward over their distinct
prompts, so the ``n`` choices of one request share it), each samples its first token, and ``add`` merges them
into the batch: new caches wide enough for the longest row (the slots every row pads are dropped, so the width
never exceeds the longest row's tokens) and long enough for every row's remaining tokens, the running rows'
keys and values copied into their last slots and the joiners' beside them; recurrent states (SSM, linear
attention, Hymba's SSM heads) are copied row by row, since padding leaves them unchanged. Then ``step`` decodes
one token for every row and ``keep`` drops the rows that finished. Each row so gets the logits it would get
alone (up to float rounding), whatever joins or leaves around it; the tests compare the answers with
``generate`` one prompt at a time.

A vision run's images enter at the prefill (``prompt_images``: the features of the joining rows' images and
their slots); after it the caches hold them like any other prompt token.

``JobQueue`` is the bounded queue in front of it: ``put`` refuses jobs beyond ``max_queue`` (the server answers
429) and all jobs once closed (a server shutting down: 503), ``drop`` ends waiting jobs that were cancelled or
expired without waiting for a free row.
Shapes: B rows, J joining rows, V vocabulary.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable

import torch

from slmforge.model.cache import KVCache, RecurrentCache
from slmforge.model.hymba import HymbaCache


class QueueFull(Exception):
    """``Worker.submit``: ``max_queue`` jobs are already waiting; the server's answer: ``status`` (with
    ``Retry-After``), ``error_type``, ``code``."""

    status, error_type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class ShuttingDown(QueueFull):
    """``Worker.submit`` after ``Worker.stop``: no new jobs."""

    status, error_type, code = 503, "server_error", "server_shutting_down"


class JobQueue:
    """The jobs waiting for the model, oldest first; ``put`` from any thread, the rest from the worker thread."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.closed = False
        self._jobs: collections.deque = collections.deque()
        self._ready = threading.Condition()

    def qsize(self) -> int:
        return len(self._jobs)

    def put(self, jobs: list) -> None:
        """Queue ``jobs``, all or none: ``QueueFull`` when that would pass ``max_queue`` waiting jobs (a group
        larger than ``max_queue`` goes in when nothing waits), ``ShuttingDown`` once closed."""
        with self._ready:
            if self.closed:
                raise ShuttingDown("the server is shutting down")
            if self._jobs and len(self._jobs) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are already waiting (max_queue={self.max_queue})")
            self._jobs.extend(jobs)
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a job waits (True) or the queue is closed and empty or ``timeout`` passed (False)."""
        with self._ready:
            return self._ready.wait_for(lambda: self._jobs or self.closed, timeout) and bool(self._jobs)

    def oldest(self):
        """The job that has waited longest, or None."""
        with self._ready:
            return self._jobs[0] if self._jobs else None

    def take(self, k: int) -> list:
        """Up to ``k`` jobs, oldest first, without waiting."""
        with self._ready:
            return [self._jobs.popleft() for _ in range(min(k, len(self._jobs)))]

    def drop(self, usable: Callable[[object], bool]) -> None:
        """Remove the waiting jobs for which ``usable(job)`` is False (it ends them)."""
        with self._ready:
            self._jobs = collections.deque(job for job in self._jobs if usable(job))


class RunningBatch:
    """The rows decoding now (module docstring): ``jobs`` (None for a row that has finished), ``caches``, ``ids`` (B,)
    to feed next and ``lengths``, each row's tokens in the caches.

    A finished row stays in the batch, decoding tokens nobody reads, until the next ``add`` rebuilds the caches
    without it or finished rows outnumber the others (``end``): dropping a row copies every cache, and rows leave
    about as often as others join.
    """

    def __init__(self, model):
        self.model = model
        self.jobs: list = []
        self.caches: list | None = None
        self.ids: torch.Tensor | None = None
        self.lengths: list[int] = []

    def live(self) -> list[int]:
        """The rows whose job is still decoding."""
        return [r for r, job in enumerate(self.jobs) if job is not None]

    def prefill(self, jobs: list) -> tuple[torch.Tensor, list, torch.Tensor]:
        """One left-padded forward over the distinct prompts of ``jobs`` -> (logits (J, V) of each job's last
        prompt token, the prompts' caches, (J,) each job's row in them)."""
        device = next(self.model.parameters()).device
        # A request's choices share their images (the same tensor), so a prompt is its ids and its images.
        rows: dict[tuple, int] = {}
        index = torch.tensor([rows.setdefault((tuple(j.ids), id(j.images)), len(rows)) for j in jobs], device=device)
        prompts = list({(tuple(j.ids), id(j.images)): j for j in jobs}.values())  # (J',): one job per row
        width = max(len(j.ids) for j in prompts)
        tokens = torch.tensor([[0] * (width - len(j.ids)) + j.ids for j in prompts], device=device)
        caches = self.model.init_cache(len(rows), width, num_pad=torch.tensor([width - len(j.ids) for j in prompts]))
        images, slots = prompt_images(prompts)
        if images is not None:  # (J', width) slot mask, left-padded as the tokens
            slots = torch.tensor([[False] * (width - len(m)) + m for m in slots], device=device)
        logits = self.model(tokens, cache=caches, last_only=True, images=images, image_mask=slots)[0][:, -1]
        return logits[index], caches, index

    def add(self, jobs: list, caches: list, index: torch.Tensor, ids: torch.Tensor) -> None:
        """Merge ``jobs``, prefilled into ``caches`` (their rows ``index``) and feeding ``ids`` next, into the batch,
        leaving out its finished rows."""
        if not jobs:
            return
        live = self.live()
        lengths = [self.lengths[r] for r in live] + [len(j.ids) for j in jobs]
        everyone = [self.jobs[r] for r in live] + jobs
        width = max(lengths)
        room = max(j.max_tokens - j.num_tokens for j in everyone)  # the most tokens any row may still feed
        num_pad = torch.tensor([width - n for n in lengths], device=ids.device)
        merged = self.model.init_cache(len(everyone), width + room, num_pad=num_pad)
        old = torch.tensor(live, dtype=torch.long, device=ids.device)
        for layer, cache in enumerate(merged):
            if live:
                _copy_rows(cache, self.caches[layer], slice(0, len(live)), old, width)
            _copy_rows(cache, caches[layer], slice(len(live), None), index, width)
        self.ids = ids if not live else torch.cat([self.ids[old], ids])
        self.jobs, self.caches, self.lengths = everyone, merged, lengths

    def step(self) -> torch.Tensor:
        """Feed every row its next id -> the next logits (B, V)."""
        self.lengths = [n + 1 for n in self.lengths]
        return self.model(self.ids[:, None], cache=self.caches)[0][:, -1]

    def end(self, rows: list[int], ids: torch.Tensor) -> None:
        """Rows ``rows`` have finished; every row feeds ``ids`` (B,) next. Drops the finished rows once they
        outnumber the others; an empty batch resets."""
        for r in rows:
            self.jobs[r] = None
        self.ids = ids
        live = self.live()
        if not live:
            self.jobs, self.caches, self.ids, self.lengths = [], None, None, []
        elif 2 * len(live) < len(self.jobs):
            index = torch.tensor(live, device=ids.device)
            for cache in self.caches:
                cache.keep(index)
            self.ids = ids[index]
            self.jobs, self.lengths = [self.jobs[r] for r in live], [self.lengths[r] for r in live]


def prompt_images(jobs: list) -> tuple[torch.Tensor | None, list[list[bool]] | None]:
    """The images of ``jobs``' prompts for one batch: their features (N, P, F) in row order and every row's slot
    mask (all False for a row without images), or (None, None) when none has an image."""
    if all(j.images is None for j in jobs):
        return None, None
    images = torch.cat([j.images for j in jobs if j.images is not None])
    return images, [j.image_slots if j.images is not None else [False] * len(j.ids) for j in jobs]


def _copy_rows(dst, src, rows: slice, index: torch.Tensor, width: int) -> None:
    """Copy ``src``'s rows ``index`` into ``dst``'s rows ``rows``, right-aligned at slot ``width``."""
    for d, s in zip(_parts(dst), _parts(src)):
        if isinstance(d, KVCache):
            n = min(width, s.pos)  # the last n slots hold every real token of these rows
            d.k[rows, :, width - n : width] = s.k[index, :, s.pos - n : s.pos]
            d.v[rows, :, width - n : width] = s.v[index, :, s.pos - n : s.pos]
            if hasattr(d, "index_k"):  # DeepSeek sparse attention's indexer keys (IndexedKVCache)
                d.index_k[rows, width - n : width] = s.index_k[index, s.pos - n : s.pos]
        elif isinstance(d, RecurrentCache):
            d.state[rows] = s.state[index]
            if d.conv is not None:
                d.conv[rows] = s.conv[index]
        else:
            raise TypeError(f"continuous batching cannot merge a {type(d).__name__}; serve with batching=static")
        d.pos = width


def unmergeable(model) -> str | None:
    """None when ``RunningBatch`` can merge every cache of ``model``, else the name of one it cannot."""
    if any(getattr(m, "takes_cache", False) for m in model.modules()):
        return "FlexMoE context routing (its per-row running sums)"
    names = {type(part).__name__ for cache in model.init_cache(1, 1) for part in _parts(cache)}
    return next(iter(sorted(names - MERGEABLE)), None)


MERGEABLE = {"KVCache", "IndexedKVCache", "RecurrentCache"}  # the caches ``_copy_rows`` knows


def _parts(cache) -> tuple:
    """A layer's cache as the KV and recurrent caches it is made of."""
    return (cache.kv, cache.ssm) if isinstance(cache, HymbaCache) else (cache,)
