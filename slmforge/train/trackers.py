"""Experiment tracking: the records of ``metrics.jsonl`` fanned out, unchanged, to TensorBoard and Weights & Biases.

``train.loggers`` picks them: ``jsonl`` (the default, and always written: the report, the plots and resume read
it), ``tensorboard`` and ``wandb`` (``pip install slmforge[track]``). ``tracked(metrics, cfg, step)`` wraps the
run's ``MetricsLog``: every record it writes goes to each chosen tracker too, as the same numbers (``scalars``:
each numeric field, nested mappings as ``outer/inner``, text such as ``stage`` left out; at the record's ``step``).

- TensorBoard: event files in ``<run>/tensorboard/`` through torch's ``SummaryWriter``, flushed with every record,
  so that a killed run loses no more there than in the JSONL.
- Weights & Biases: a run in ``<run>/wandb/`` named like the run, with the resolved config attached (secrets
  masked, as in config.yaml). Offline unless the user configured it: ``WANDB_MODE`` is left to wandb, and an API
  key (``WANDB_API_KEY``, or ``wandb login``'s netrc entry) means online; an offline run is uploaded later with
  ``wandb sync``.

Resume. Resuming at step S, ``MetricsLog.truncate_after(S)`` drops the records after S; the TensorBoard writer
purges its events after S the same way (``purge_step``), so replayed steps are not shown twice. wandb starts a new
run (a run's steps only go forward).
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from typing import Any

from slmforge.config import RunConfig
from slmforge.config.loading import masked, to_dict
from slmforge.runs import MetricsLog, RunDir

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # train.loggers -> the package it needs


def check_trackers(loggers: list[str]) -> None:
    """A one-line error, before anything is written, for a chosen tracker whose package is missing."""
    for name in loggers:
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
            raise _missing(PACKAGES[name])


def tracked(metrics: MetricsLog, cfg: RunConfig, step: int) -> TrackedLog:
    """``metrics`` (the run's JSONL, resumed at ``step``) with ``cfg.train.loggers``' trackers attached."""
    trackers = []
    for name in dict.fromkeys(cfg.train.loggers):
        if name == "tensorboard":
            trackers.append(TensorBoard(RunDir.of(cfg).tensorboard, step))
        elif name == "wandb":
            trackers.append(WandB(cfg))
    return TrackedLog(metrics.path, trackers)


class TrackedLog(MetricsLog):
    """A ``MetricsLog`` whose records also go to ``trackers``; ``close`` ends them."""

    def __init__(self, path: str | Path, trackers: list):
        super().__init__(path)
        self.trackers = trackers

    def log(self, record: dict[str, Any]) -> None:
        super().log(record)
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, record["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record by name, nested mappings as ``outer/inner``; ``step`` and text left out."""
    out = {}
    for key, value in record.items():
        name = prefix + str(key)
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            out[name] = value
    return out


def _missing(package: str) -> ValueError:
    return ValueError(f"train.loggers: {package} is not installed; pip install slmforge[track] (or leave "
                      f"{package} out of train.loggers)")


class TensorBoard:
    """Scalars to ``<run>/tensorboard/`` event files; events after ``step`` (a resumed run's replay) are purged."""

    def __init__(self, folder: Path, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.writer = SummaryWriter(str(folder), purge_step=step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A wandb run in ``<run>/wandb/`` with the resolved config; offline unless configured (``wandb_mode``)."""

    def __init__(self, cfg: RunConfig):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        run_dir = RunDir.of(cfg).root
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slmforge"), name=cfg.name, dir=str(run_dir),
                              config=masked(to_dict(cfg)), mode=wandb_mode(), reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_mode() -> str | None:
    """None (wandb reads ``WANDB_MODE``) when it is set; "online" with an API key configured; else "offline"."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"
