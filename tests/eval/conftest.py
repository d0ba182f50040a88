"""The eval tests' data paths; their tiny run folder (``eval_run``, ``loaded``) is in ``tests/conftest.py``."""

from tests.conftest import SHARED_DATA

GSM8K = SHARED_DATA / "gsm8k"
