"""slmforge: build small language models (at most 1B parameters) from scratch, end to end.

Each stage is a Python function and a CLI subcommand of the same name.
"""

import os as _os

# SLMFORGE_CPU_ISA=avx2: behave as an AVX2-only CPU (figures "with AVX-512 hidden"); oneDNN and MKL read these
# once, when torch loads, so they are set before anything imports it. model/ops/machine.py explains the rest.
if _os.environ.get("SLMFORGE_CPU_ISA", "").lower() == "avx2":
    _os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    _os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")

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


__all__ = ["RunConfig", "load_config", "plan", "train", "train_tokenizer", "synthesize", "run", "__version__"]
