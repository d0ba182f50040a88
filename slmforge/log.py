"""Progress messages of the stages: one prefixed line each, flushed at once (they interleave with progress bars)."""

from __future__ import annotations


def log(msg: str) -> None:
    print(f"[slmforge] {msg}", flush=True)
