"""Progress of long work, fit for where it is shown: a tqdm bar on a terminal, periodic plain lines elsewhere.

A tqdm bar redraws itself with carriage returns; in a log file (a batch job, ``2> log``, ``| tee``) the redraws
pile up into one huge line. ``progress_bar(...)`` returns tqdm when the stream is a terminal and otherwise a
``PlainProgress`` with the same small interface (``update``, ``set_postfix``, ``close``, iteration, ``with``,
``n`` and ``total``), which prints one line at most every ``SLMFORGE_PROGRESS_SECONDS`` seconds (default 30)
and one when it closes::

    train: 400/1200 (33%), 2.51 it/s, 159 s, loss=2.731, tok_s=6421
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm import tqdm

DEFAULT_SECONDS = 30.0


def progress_bar(iterable: Iterable | None = None, total: float | None = None, desc: str = "", unit: str = "it",
             unit_scale: bool = False, initial: float = 0, disable: bool = False, file: TextIO | None = None,
             **tqdm_kwargs: Any):
    """A tqdm bar on a terminal, else a ``PlainProgress``; the arguments are tqdm's (others go to tqdm only).

    ``disable`` shows nothing either way. ``file`` defaults to stderr, looked up now (so a redirect counts).
    """
    file = file if file is not None else sys.stderr
    if not disable and _is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                    file=file, **tqdm_kwargs)
    return PlainProgress(iterable, total, desc, unit, unit_scale, initial, file, quiet=disable)


def _is_terminal(file: TextIO) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def interval_seconds() -> float:
    """Seconds between two plain progress lines: ``$SLMFORGE_PROGRESS_SECONDS``, default 30."""
    raw = os.environ.get("SLMFORGE_PROGRESS_SECONDS", "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_SECONDS
    except ValueError:
        raise ValueError(f"SLMFORGE_PROGRESS_SECONDS={raw!r}: expected a number of seconds, e.g. 30") from None
    if seconds < 0:
        raise ValueError(f"SLMFORGE_PROGRESS_SECONDS={raw!r}: expected a number of seconds >= 0")
    return seconds


class PlainProgress:
    """tqdm's interface as whole lines: one at most every ``interval_seconds()`` and one at ``close``."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", unit_scale: bool = False, initial: float = 0, file: TextIO | None = None,
                 quiet: bool = False):
        self.iterable, self.desc, self.unit, self.unit_scale = iterable, desc, unit, unit_scale
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.initial = total, initial, initial
        self.file, self.quiet, self.closed = file, quiet, False
        self.printed_n: float | None = None  # n at the last line printed
        self.postfix: dict[str, str] = {}
        self.interval = interval_seconds()
        self.start = self.last_print = time.monotonic()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_print >= self.interval:
            self.last_print = now
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in items.items()}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.printed_n != self.n:  # the last periodic line may already say it all
                self._print(time.monotonic())

    def line(self, now: float) -> str:
        """``desc: n/total (pct%), rate unit/s, elapsed s, key=value ...``."""
        elapsed = now - self.start
        done = self._amount(self.n)
        if self.total:
            done = f"{done}/{self._amount(self.total)} ({self.n / self.total:.0%})"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts = [done, f"{self._amount(rate)}/s" if self.unit_scale else f"{rate:.3g} {self.unit}/s",
                 f"{elapsed:.0f} s", *(f"{k}={v}" for k, v in self.postfix.items())]
        return f"{self.desc}: " * bool(self.desc) + ", ".join(parts)

    def _amount(self, x: float) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(x, self.unit)
        return f"{x:g}" if isinstance(x, float) else str(x)

    def _print(self, now: float) -> None:
        self.printed_n = self.n
        if not self.quiet and self.file is not None:
            print(self.line(now), file=self.file, flush=True)
