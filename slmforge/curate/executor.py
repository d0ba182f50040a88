"""Where the data stages run: ``executor=local`` (this process, one shard after another) or ``executor=ray``.

``executor(cfg, label, shard_index)`` is a context manager around a run of dedup, filter or tokenize; it yields an
``Executor`` whose ``map(fn, items)`` gives ``fn(item)`` for every item, in item order: the builtin ``map`` for
``local``, Ray tasks for ``ray`` (at most two per CPU in flight, so a stream of batches stays bounded). The stages
hand it their existing per-shard functions (``dedup`` stage A and C per shard, B as one task; ``steps.run_shard``
for filter and decontamination; ``tokens.shards`` batches of documents) and write what the tasks return on the
driver exactly as the local run does, so the outputs are the same bytes.

``ray_address`` empty starts a local Ray cluster (``ray_num_cpus`` CPUs, 0 = all of this machine) and shuts it down
afterwards; ``auto`` or ``HOST:PORT`` connects to a running cluster (``ray start --head``), whose nodes must see the
inputs and ``out_dir`` at the same paths (a shared file system) and have slmforge installed. A session the caller
already opened (``ray.init`` before) is used as it is and left open. Ray is imported only here and only for
``executor=ray``; it is the optional extra ``slmforge[ray]``.

A task runs in the driver's working directory, so relative paths (and the configs and reports that record them)
are those of the local run. A user error in a task (a ``ValueError`` or ``OSError``, such as no documents read)
is raised again on the driver as itself, so the CLI prints its one line.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

from slmforge.log import log

ExecutorName = Literal["local", "ray"]


@dataclass
class Executor:
    map: Callable[[Callable, Iterable], Iterator]  # map(fn, items): fn(item) for each item, in order
    num_cpus: int  # the default number of shards: 1 locally, the Ray cluster's CPUs
    remote: bool = False  # whether map runs its calls in other processes (Ray tasks)


@contextmanager
def executor(cfg: Any, label: str, shard_index: int | None = None) -> Iterator[Executor]:
    """The executor ``cfg.executor`` names (``cfg`` has ``executor``, ``ray_address`` and ``ray_num_cpus``)."""
    if cfg.executor == "local":
        yield Executor(map, 1)
        return
    if shard_index is not None:
        raise ValueError(f"{label}: --shard-index runs one task of a job array (executor=local); with executor=ray "
                         f"every shard runs as a Ray task: drop --shard-index or set executor=local")
    with ray_session(cfg.ray_address, cfg.ray_num_cpus, label) as pool:
        yield Executor(pool.map, pool.num_cpus, remote=True)


def _import_ray(label: str):
    try:
        import ray
    except ImportError:
        raise ValueError(f"{label}: executor=ray needs Ray: pip install 'slmforge[ray]' (or set executor=local)") \
            from None
    return ray


@contextmanager
def ray_session(address: str = "", num_cpus: int = 0, label: str = "ray") -> Iterator["RayMap"]:
    """A ``RayMap`` on the cluster at ``address`` (empty: a new local one with ``num_cpus``, 0 = all CPUs)."""
    ray = _import_ray(label)
    started = not ray.is_initialized()
    if started:
        if address and num_cpus:
            raise ValueError(f"{label}: ray_num_cpus sizes a new local Ray cluster; the cluster at "
                             f"ray_address={address} has its own CPUs: drop ray_num_cpus")
        try:
            if address:
                ray.init(address=address)
            else:
                ray.init(address="local", num_cpus=num_cpus or None, include_dashboard=False)
        except ConnectionError as exc:
            raise ValueError(f"{label}: no Ray cluster at ray_address={address} ({exc}); start one with "
                             f"`ray start --head`, or leave ray_address empty for a local one") from None
    try:
        pool = RayMap(ray, max(1, int(ray.cluster_resources().get("CPU", 1))))
        log(f"{label}: Ray cluster at {address or 'a new local instance'}, {pool.num_cpus} CPUs")
        yield pool
    finally:
        if started:
            ray.shutdown()


class RayMap:
    """``map(fn, items, in_cwd=True)`` as Ray tasks: ``fn`` is stored once in the object store, each item is one
    task (at most two per CPU in flight), and the results come back in item order."""

    def __init__(self, ray, num_cpus: int):
        self.ray, self.num_cpus = ray, num_cpus
        self._task = ray.remote(_run_task)

    def map(self, fn: Callable, items: Iterable, in_cwd: bool = True) -> Iterator:
        """``in_cwd``: run each task in the driver's working directory (it reads or writes files)."""
        fn_ref, cwd, pending = self.ray.put(fn), os.getcwd() if in_cwd else None, deque()
        try:
            for item in items:
                pending.append(self._task.remote(fn_ref, item, cwd))
                if len(pending) >= 2 * self.num_cpus:
                    yield self._get(pending.popleft())
            while pending:
                yield self._get(pending.popleft())
        finally:
            self._drop(pending)

    def _drop(self, refs) -> None:
        """After an error or an interrupt: cancel the tasks not collected, and collect them quietly (a failed
        task's result that nobody reads is printed by Ray with its traceback)."""
        for ref in refs:
            self.ray.cancel(ref)
        for ref in refs:
            try:
                self.ray.get(ref)
            except Exception:  # cancelled, or failed as the first one did
                pass

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, (ValueError, OSError)):  # a user error: its own one line
                raise exc.cause from None
            raise


def _run_task(fn: Callable, item, cwd: str | None):
    """One Ray task: ``fn(item)``, in ``cwd`` when given."""
    if cwd is None:
        return fn(item)
    here = os.getcwd()
    try:
        os.chdir(cwd)
    except OSError:
        raise ValueError(f"executor=ray: the Ray worker on {socket.gethostname()} has no folder {cwd}: every node "
                         f"needs the inputs and out_dir on a shared file system at the driver's paths") from None
    try:
        return fn(item)
    finally:
        os.chdir(here)
