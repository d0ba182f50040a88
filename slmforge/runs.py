"""Run folders: where each file of a run lives (``RunDir``), atomic writes (temporary file, then rename),
the resolved-config dump and the JSONL metrics file.

``RunDir`` is the one place that spells out a run folder's layout; every stage asks it for paths.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from slmforge.config import dump_yaml


def _read_umask() -> int:
    # The umask can only be read by setting it. Done once, at import, before this process starts threads that write
    # files: a file another thread creates between the two calls would get mode 0666/0777, so no later call re-reads.
    old = os.umask(0)
    os.umask(old)
    return old


# Files are written as group-readable as the user's umask allows (mkstemp alone would leave them 0600).
UMASK = _read_umask()


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder. ``tokenizer`` and ``shards`` may live elsewhere (``data.tokenizer``,
    ``data.shards_dir``); everything else sits under ``root``.

    runs/<name>/ config.yaml  data/{split}.jsonl  tokenizer.json  shards/{split}/  checkpoints/step_*/
                 metrics.jsonl  loss.png  train_result.json  report.{json,md}  eval/<name>  sweep.json
    """

    root: Path
    tokenizer: Path
    shards: Path

    @classmethod
    def at(cls, root: str | Path, tokenizer: str | Path = "", shards: str | Path = "") -> RunDir:
        root = Path(root)
        return cls(root, Path(tokenizer) if tokenizer else root / "tokenizer.json",
                   Path(shards) if shards else root / "shards")

    @classmethod
    def of(cls, cfg) -> RunDir:
        """The run folder of a RunConfig: <out_dir>/<name>, with its data.tokenizer / data.shards_dir if set."""
        return cls.at(Path(cfg.out_dir) / cfg.name, cfg.data.tokenizer, cfg.data.shards_dir)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def curate(self) -> Path:
        """The optional curation stages' outputs: curate/<stage>/<key>/ (kept/, report.json, ...)."""
        return self.root / "curate"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def train_result(self) -> Path:
        return self.root / "train_result.json"

    @property
    def pipeline_time(self) -> Path:
        """Wall time of each ``slmforge run`` invocation on this folder, so the report can show the total."""
        return self.root / "pipeline_time.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def sweep_result(self) -> Path:
        """Written last by a science sweep (config, report, evaluation losses): the run is finished."""
        return self.root / "sweep.json"

    def eval_output(self, name: str) -> Path:
        """What an evaluation writes: ``gsm8k`` -> eval/gsm8k/, ``perplexity.json`` -> eval/perplexity.json."""
        return self.root / "eval" / name

    def split_data(self, split: str) -> Path:
        """The corpus split as JSONL: ``train`` -> data/train.jsonl, ``math/train`` -> data/math/train.jsonl."""
        return self.data / f"{split}.jsonl"

    def split_shards(self, split: str) -> Path:
        """The token shards of a split: ``train`` -> shards/train, ``math/validation`` -> shards/math/validation."""
        return self.shards / split


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A crash mid-write leaves the old file (or no file) in place, never a half-written one. The file gets the mode
    a plain ``open`` would give it (0666 less the umask), not mkstemp's private 0600: runs are shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(target: str | Path, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a new temporary folder beside ``target``; only if the block succeeds do its entries replace the entries
    of the same names in ``target`` (a new ``target`` is the folder itself, renamed). On failure the temporary folder
    is deleted and ``target`` is left exactly as it was. Entries named in ``last`` (a "written last" marker such as
    meta.json) are removed from ``target`` first and moved in after the others, so a crash while moving leaves a
    folder marked incomplete, never old files under a new marker. Other entries of ``target`` are kept."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if not target.exists():
            os.chmod(tmp, 0o777 & ~UMASK)
            os.replace(tmp, target)
            return
        for name in last:
            if (target / name).is_file():
                (target / name).unlink()
        names = sorted(p.name for p in tmp.iterdir() if not p.name.startswith(".old-"))
        for name in sorted(names, key=lambda n: n in last):
            if (target / name).is_dir():  # os.replace cannot replace a folder: move the old one away first
                os.replace(target / name, tmp / f".old-{name}")
            os.replace(tmp / name, target / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_config(run_dir: str | Path, cfg) -> Path:
    path = RunDir.at(run_dir).config
    write_text(path, dump_yaml(cfg))
    return path


class MetricsLog:
    """Append-only JSONL of metric records; each line is flushed so a crash loses at most one (a last line cut
    short by a kill is dropped when read; a damaged line elsewhere is a one-line error naming it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(lines) and not text.endswith("\n"):
                    break  # the record being written when the process was killed
                raise ValueError(f"{self.path}:{number}: not a JSON metrics record; fix or delete that line") from None
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (used on resume so a replayed step is not logged twice); the file is replaced
        atomically, so a crash leaves the old or the new one."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def partial_records(path: Path) -> list[dict]:
    """The JSON lines an interrupted job appended to ``path`` (none if it does not exist); a last line cut short by
    the interruption is skipped. The caller keeps those whose settings match its own."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records

