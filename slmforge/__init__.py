"""slmforge: build small language models (at most 1B parameters) from scratch, end to end.

Each stage is a Python function and a CLI subcommand of the same name.
"""

import os as _os

# SLMFORGE_CPU_ISA=avx2: behave as an AVX2-only CPU (figures "with AVX-512 hidden"). oneDNN, MKL, ATen's vector
# kernels and numba's JIT (model/ops/gemv.py) read these once, when they load, so they are set before anything
# imports torch; values the user set stay. model/ops/machine.py explains the rest. ``AVX2_ENV`` is the whole
# setting, for benchmarks that run a child process with it.
AVX2_ENV = {"SLMFORGE_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2", "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}
if _os.environ.get("SLMFORGE_CPU_ISA", "").lower() == "avx2":
    for _key, _value in AVX2_ENV.items():
        _os.environ.setdefault(_key, _value)

from slmforge.config import RunConfig, load_config  # noqa: E402

__version__ = "0.1.0"


def plan(cfg):
    from slmforge.plan import plan as _plan

    return _plan(cfg)


def train(cfg, resume: bool = False):
    from slmforge.train.loop import train as _train

    return _train(cfg, resume=resume)


def train_tokenizer(texts, vocab_size: int, path=None):
    from slmforge.tokens.tokenizer import train_tokenizer as _train_tokenizer

    return _train_tokenizer(texts, vocab_size, path)


def synthesize(job, progress: bool = True):
    from slmforge.synth.jobs import synthesize as _synthesize

    return _synthesize(job, progress=progress)


def run(cfg):
    from slmforge.pipeline import run as _run

    return _run(cfg)


def run_main(cfg, force: bool = False):
    """The main build (``slmforge run`` of a ``kind: main`` recipe): ``cfg`` a ``course.MainConfig``."""
    from slmforge.course import run_main as _run_main

    return _run_main(cfg, force=force)


__all__ = ["RunConfig", "load_config", "plan", "train", "train_tokenizer", "synthesize", "run", "run_main",
           "__version__"]
