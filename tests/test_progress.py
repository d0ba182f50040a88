"""progress_bar(): tqdm on a terminal, periodic plain lines (no carriage returns) in a log file."""

import io

import pytest
from tqdm import tqdm

from slmforge import progress as progress_module
from slmforge.progress import PlainProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """A stand-in for time.monotonic that moves only when told to."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_a_terminal_gets_tqdm_and_a_log_file_gets_plain_lines():
    bar = progress_bar(total=3, desc="work", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(total=3, desc="work", file=io.StringIO()), PlainProgress)


def test_plain_lines_at_most_every_interval_and_at_the_end(clock, monkeypatch):
    monkeypatch.delenv("SLMFORGE_PROGRESS_SECONDS", raising=False)  # the default: 30 s
    out = io.StringIO()
    with progress_bar(total=10, desc="train", file=out) as bar:
        for seconds in (10, 20, 31, 40, 55, 62, 70, 80, 90, 100):  # lines due at 31 and 62 s
            clock.now = 1000.0 + seconds
            bar.set_postfix(loss=f"{seconds / 10:.3f}", step=seconds)
            bar.update(1)
        assert (bar.n, bar.total) == (10, 10)
    text = out.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        "train: 3/10 (30%), 0.0968 it/s, 31 s, loss=3.100, step=31",
        "train: 6/10 (60%), 0.0968 it/s, 62 s, loss=6.200, step=62",
        "train: 10/10 (100%), 0.1 it/s, 100 s, loss=10.000, step=100",
    ]


def test_interval_from_the_environment_and_iteration(clock, monkeypatch):
    monkeypatch.setenv("SLMFORGE_PROGRESS_SECONDS", "0")
    out = io.StringIO()
    assert list(progress_bar(range(3), desc="batches", unit="batch", file=out)) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert lines == [f"batches: {n}/3 ({n / 3:.0%}), 0 batch/s, 0 s" for n in (1, 2, 3)]  # the last says it all


def test_bytes_are_scaled_and_a_closed_bar_prints_once(clock):
    out = io.StringIO()
    bar = progress_bar(unit="B", unit_scale=True, desc="tokenize", file=out)
    bar.update(1500)
    clock.now += 2
    bar.close()
    bar.close()
    assert out.getvalue() == "tokenize: 1.50kB, 750B/s, 2 s\n"


def test_disabled_prints_nothing_anywhere():
    for stream in (io.StringIO(), Terminal()):
        bar = progress_bar(total=2, desc="quiet", disable=True, file=stream)
        bar.update(2)
        bar.close()
        assert stream.getvalue() == ""


def test_a_bad_interval_names_the_variable(monkeypatch):
    monkeypatch.setenv("SLMFORGE_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match="SLMFORGE_PROGRESS_SECONDS='soon': expected a number of seconds"):
        progress_bar(total=1, file=io.StringIO())
