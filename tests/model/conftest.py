"""Fixtures of the model tests: forcing the float32 CPU kernels (``model/ops/choice.py``)."""

import pytest

from slmforge.model.ops import choice


@pytest.fixture
def kernels(monkeypatch):
    """``kernels("train=onednn")`` sets SLMFORGE_KERNELS for this test (``kernels(None)`` unsets it); every choice
    made before or during the test is forgotten, so nothing leaks into the next one."""
    def force(value):
        if value is None:
            monkeypatch.delenv(choice.KERNELS_ENV, raising=False)
        else:
            monkeypatch.setenv(choice.KERNELS_ENV, value)
        choice.reset()

    choice.reset()
    yield force
    choice.reset()
