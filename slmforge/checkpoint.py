"""The checkpoint format, and loading a trained model for inference.

A checkpoint is a folder ``<run>/checkpoints/step_000100/`` holding, in the order they are written:

- ``model.safetensors``: the weights, keyed by parameter name, the tied head stored once under the embedding's name;
- ``state.safetensors`` and ``state.json``: everything else (step, optimizer, RNG and data-loader state, or where
  an import came from) without pickle: its tensors in the safetensors file, the rest as JSON in which a tensor is
  ``{"__tensor__": name}`` and a tuple ``{"__tuple__": [...]}``;
- ``manifest.json``, last: the format version, the step, and each file's size and sha256.

The folder is written as ``.tmp_step_000100/`` and renamed when its manifest is in, so a crash never leaves a
half-written ``step_*`` folder, and a checkpoint is valid only with its manifest: reading one checks the sizes and
checksums first (``verify_checkpoint``), and a missing, truncated or overwritten file is a one-line ValueError
naming the file. ``checkpoints/latest`` names the newest one written, but it is only a hint: lookups order the
``step_*`` folders by their number (step 999,900 comes before 1,000,000) and resuming takes the newest that verifies
(``newest_valid_checkpoint``, which says why it skipped the others). Only the newest ``keep`` are kept; an old one is
renamed to ``.old_step_*`` before it is deleted, and the one just written is never removed.

Older checkpoints (format 1: ``model.safetensors`` and a pickled ``state.pt``, no manifest) still load: ``state.pt``
is read with ``torch.load(weights_only=True)``, NumPy's array types allowed for its RNG state, never with full
pickle. Without a manifest they are checked as far as they can be (``state.pt``'s zip CRCs, the size the weights
file's header describes); a state file even that cannot read is an error that says to resume from a newer checkpoint
or start over. Training writes the current format from then on.

``SLMFORGE_FAULT=ckpt:<point>[@<step>]`` is a test hook: the process kills itself with SIGKILL at that point of a
checkpoint write (``FAULT_POINTS``), so tests can check that training resumes exactly from any crash.

This module sits below ``train/``, ``serve/`` and ``eval/``: training gathers its state and calls
``write_checkpoint``; inference calls ``load_for_inference`` and never imports training code. Every byte of a
checkpoint folder is written and read here, so a change of format is made in this file alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import zipfile
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from slmforge.config import RunConfig, load_config
from slmforge.model.lm import LM
from slmforge.runs import RunDir, atomic_path, write_json, write_text
from slmforge.tokens.shards import recorded_tokenizer
from slmforge.tokens.tokenizer import Tokenizer

FORMAT = 2
WEIGHTS, STATE_TENSORS, STATE_JSON, MANIFEST = "model.safetensors", "state.safetensors", "state.json", "manifest.json"
LEGACY_STATE = "state.pt"  # format 1
LATEST = "latest"
# A tied head is the embedding: stored once, under the embedding's name, and restored on load.
HEAD, EMBEDDING = "head.weight", "tok_emb.weight"
TENSOR, TUPLE = "__tensor__", "__tuple__"
FAULT_POINTS = ("weights", "state_tensors", "state", "manifest", "rename", "latest", "rotate")
STEP_NAME = re.compile(r"step_(\d+)")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step a ``step_*`` folder name holds (parsed, so 1,000,000 sorts after 999,900), else None."""
    match = STEP_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_folders(ckpt_dir: str | Path) -> list[Path]:
    """The ``step_*`` folders of ``ckpt_dir``, oldest first by step number (whether complete or not)."""
    ckpt_dir = Path(ckpt_dir)
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None] \
        if ckpt_dir.is_dir() else []
    return sorted(found, key=checkpoint_step)


def save_weights(weights: dict[str, torch.Tensor], path: str | Path, tied: bool = False) -> None:
    """A full state dict as a safetensors file; ``tied``: the head is the embedding and is left out."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items() if not (k == HEAD and tied)}
    with atomic_path(path) as tmp:  # safetensors writes mode 0600; atomic_path gives the umask's mode
        safetensors.torch.save_file(tensors, str(tmp))


def load_weights(model: nn.Module, path: str | Path, fresh: tuple[str, ...] = ()) -> None:
    """Load a weights file into ``model``; a name that does not match is a one-line error (``fresh``: prefixes of
    the model's parts the file may lack, which keep their initialisation)."""
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    missing = [m for m in missing if not (m == HEAD and model.cfg.tie_embeddings or fresh and m.startswith(fresh))]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")


def write_checkpoint(ckpt_dir: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict,
                     keep: int = 2, tied: bool = False) -> Path:
    """Write ``<ckpt_dir>/step_NNNNNN/`` atomically, point ``latest`` at it and keep the newest ``keep``.

    ``weights``: a full (unsharded) state dict; ``tied``: the model ties its head to the embedding, so the head
    is left out. ``state``: nested dicts, lists and tuples of tensors, numbers, strings and None. ``keep=0``
    removes nothing. Returns the checkpoint folder.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / f".tmp_{final.name}"
    for leftover in [*ckpt_dir.glob(".tmp_step_*"), *ckpt_dir.glob(".old_step_*")]:  # a write or removal killed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(weights, tmp / WEIGHTS, tied)
    _fault("weights", step)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors)
    with atomic_path(tmp / STATE_TENSORS) as path:
        safetensors.torch.save_file(tensors, str(path))
    _fault("state_tensors", step)
    write_text(tmp / STATE_JSON, json.dumps(encoded) + "\n")
    _fault("state", step)
    files = {name: _file_entry(tmp / name, sync=True) for name in (WEIGHTS, STATE_TENSORS, STATE_JSON)}
    write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
    _fault("manifest", step)
    if final.exists():  # the same step written again (a resumed run overtaking a damaged checkpoint, an import)
        _remove(final)
    tmp.rename(final)
    _fsync_dir(ckpt_dir)
    _fault("rename", step)
    write_text(ckpt_dir / LATEST, final.name + "\n")
    _fault("latest", step)
    _rotate(ckpt_dir, step, keep)
    return final


def _rotate(ckpt_dir: Path, step: int, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints up to ``step``; the one just written is always kept."""
    if keep <= 0:
        return
    older = [p for p in checkpoint_folders(ckpt_dir) if checkpoint_step(p) < step]
    for old in older[:max(len(older) - (keep - 1), 0)]:
        _remove(old, step)


def _remove(folder: Path, step: int | None = None) -> None:
    # Renamed first, so a process killed while deleting leaves no half-deleted step_* folder behind.
    aside = folder.with_name(f".old_{folder.name}")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    if step is not None:
        _fault("rotate", step)
    shutil.rmtree(aside, ignore_errors=True)


def _fault(point: str, step: int) -> None:
    """The test hook: ``SLMFORGE_FAULT=ckpt:<point>[@<step>]`` kills this process here (no cleanup, no flush)."""
    spec = os.environ.get("SLMFORGE_FAULT", "")
    if spec.startswith("ckpt:"):
        where, _, at = spec[len("ckpt:"):].partition("@")
        if where == point and (not at or int(at) == step):
            os.kill(os.getpid(), signal.SIGKILL)


def _file_entry(path: Path, sync: bool = False) -> dict:
    """Size and sha256 of a file (read in 1 MB chunks); ``sync``: flushed to disk first (the manifest vouches for it)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if sync:
            os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _encode(obj, key: str, tensors: dict[str, torch.Tensor]):
    """``obj`` as JSON-able data; its tensors go into ``tensors``, named by their path in ``obj``."""
    if isinstance(obj, torch.Tensor):
        name = key.lstrip("/") if key.lstrip("/") not in tensors else f"{key.lstrip('/')}#{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {TENSOR: name}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
        return {TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state {key or '/'}: keys must be strings, not {list(obj)[:3]}")
        return {k: _encode(v, f"{key}/{k}", tensors) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {key or '/'}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if set(obj) == {TENSOR}:
            return tensors[obj[TENSOR]]
        if set(obj) == {TUPLE}:
            return tuple(_decode(v, tensors) for v in obj[TUPLE])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def verify_checkpoint(path: str | Path) -> None:
    """Check the checkpoint folder ``path`` against its manifest (sizes, then sha256); a one-line ValueError naming
    the file and what is wrong. A format-1 folder (``state.pt``, no manifest) is checked as far as it can be."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        if (path / LEGACY_STATE).is_file():
            return _verify_legacy(path)
        raise ValueError(f"{path / MANIFEST}: missing, so the checkpoint is incomplete (its write was interrupted, "
                         f"or files were removed)")
    files = _read_manifest(path / MANIFEST)
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != entry["size"]:
            raise ValueError(f"{file}: {size:,} bytes but {MANIFEST} records {entry['size']:,} (truncated or "
                             f"overwritten)")
        if _file_entry(file)["sha256"] != entry["sha256"]:
            raise ValueError(f"{file}: its contents do not match the sha256 in {MANIFEST} (damaged or overwritten)")


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        files, version = manifest["files"], manifest["format"]
        assert all(isinstance(e["size"], int) and isinstance(e["sha256"], str) for e in files.values())
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as exc:
        raise ValueError(f"{path}: not a checkpoint manifest ({first_line(exc) or 'a field is missing'})") from None
    if version != FORMAT:
        raise ValueError(f"{path}: checkpoint format {version}, but this slmforge reads format {FORMAT} (and 1)")
    missing = [name for name in (WEIGHTS, STATE_TENSORS, STATE_JSON) if name not in files]
    if missing:
        raise ValueError(f"{path}: lists no {', '.join(missing)}")
    return files


def _verify_legacy(path: Path) -> None:
    """Format 1 has no checksums: the zip CRCs of state.pt, and the weights file's size against its header."""
    state, weights = path / LEGACY_STATE, path / WEIGHTS
    try:
        with zipfile.ZipFile(state) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{state}: damaged ({first_line(exc)})") from None
    if bad is not None:
        raise ValueError(f"{state}: damaged (its part {bad} fails its CRC check)")
    if not weights.is_file():
        raise ValueError(f"{weights}: missing")
    size = weights.stat().st_size
    try:
        with weights.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < size else None
        end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise ValueError(f"{weights}: not a safetensors file (its header does not parse)") from None
    if end != size:
        raise ValueError(f"{weights}: {size:,} bytes but its header describes {end:,} (truncated or overwritten)")


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (by step number; ``latest`` is not needed), or None. Not verified."""
    done = [p for p in checkpoint_folders(ckpt_dir) if (p / MANIFEST).is_file() or (p / LEGACY_STATE).is_file()]
    return done[-1] if done else None


def newest_valid_checkpoint(ckpt_dir: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint that verifies or None, why each newer one was skipped: ``step_000200: <error>``)."""
    skipped = []
    for folder in reversed(checkpoint_folders(ckpt_dir)):
        try:
            verify_checkpoint(folder)
            return folder, skipped
        except ValueError as exc:
            skipped.append(f"{folder.name}: {exc}")
    return None, skipped


def read_state(path: str | Path, verify: bool = True) -> dict:
    """The non-weight state of the checkpoint folder ``path`` (step, optimizer, RNG, loader, ...)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    if not (path / MANIFEST).is_file():
        return _read_legacy_state(path / LEGACY_STATE)
    try:
        encoded = json.loads((path / STATE_JSON).read_text())
        tensors = safetensors.torch.load_file(str(path / STATE_TENSORS))
    except (ValueError, SafetensorError) as exc:
        raise ValueError(f"{path / STATE_JSON}: unreadable ({first_line(exc)})") from None
    return _decode(encoded, tensors)


def _read_legacy_state(file: Path) -> dict:
    """A format-1 ``state.pt``: the safe unpickler, with NumPy's array types allowed (the NumPy RNG state)."""
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct,
               (reconstruct, "numpy.core.multiarray._reconstruct")]  # pickled by NumPy 1
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for a file it cannot read safely
        raise ValueError(f"{file}: a format-1 state file that cannot be read without pickle "
                         f"({first_line(exc)[:200]}); resume from a newer checkpoint, or start over (slmforge "
                         f"train --force); its weights still load for generate and eval") from None


def read_checkpoint(path: str | Path, tied: bool = False, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, state) of the checkpoint folder ``path``; ``tied`` puts the embedding back as the head."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    state = read_state(path, verify=False)
    try:
        weights = safetensors.torch.load_file(str(path / WEIGHTS))
    except SafetensorError as exc:
        raise ValueError(f"{path / WEIGHTS}: not a readable safetensors file ({first_line(exc)})") from None
    if tied:
        weights[HEAD] = weights[EMBEDDING]
    return weights, state


def load_model_weights(model: nn.Module, path: str | Path, verify: bool = True, fresh: tuple = ()) -> None:
    """The weights of the checkpoint folder ``path`` into ``model`` (checked by name; ``fresh``: ``load_weights``)."""
    if verify:
        verify_checkpoint(path)
    load_weights(model, Path(path) / WEIGHTS, fresh)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_checkpoint(path: str | Path) -> tuple[RunDir, Path]:
    """A run folder or one of its checkpoint folders -> (the run folder, the checkpoint to load)."""
    path = Path(path)
    if (path / WEIGHTS).exists():
        return RunDir.at(path.parent.parent), path
    if not path.is_dir():
        raise ValueError(f"{path}: no such run folder; give one made by `slmforge train` or `slmforge run` "
                         f"(runs/<name>)")
    run = RunDir.at(path)
    ckpt = latest_checkpoint(run.checkpoints)
    if ckpt is None:
        raise ValueError(f"{path}: no checkpoint found (expected {run.checkpoints}/step_NNNNNN/): not a run folder, "
                         f"or its training has not saved one yet (every train.ckpt_every steps, and at the end)")
    return run, ckpt


def find_tokenizer(run: RunDir, cfg: RunConfig) -> Path:
    """The run's tokenizer: data.tokenizer when its config names one, else <run>/tokenizer.json, else the one its
    shards record (data.shards_dir; runs trained before `slmforge train` copied it into the run folder)."""
    candidates = [Path(p) for p in (cfg.data.tokenizer, run.tokenizer) if p]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and cfg.data.shards_dir:
        try:
            found = recorded_tokenizer(RunDir.at(run.root, shards=cfg.data.shards_dir).split_shards("train"))
        except ValueError:
            pass
    if found is None:
        raise ValueError(f"{run.root}: no tokenizer (looked for {' and '.join(map(str, candidates))}); copy the "
                         f"tokenizer.json this run was trained with to {run.tokenizer}")
    return found


def load_for_inference(path: str | Path, device: str = "cpu") -> tuple[LM, Tokenizer, RunConfig]:
    """A run folder or a checkpoint folder -> (model in eval mode, tokenizer, RunConfig)."""
    run, ckpt = find_checkpoint(path)
    if not run.config.exists():
        raise ValueError(f"{run.root}: no config.yaml, so this is not a run folder; give one made by "
                         f"`slmforge train` or `slmforge run` (runs/<name>)")
    cfg = load_config(run.config)
    tokenizer = Tokenizer.load(find_tokenizer(run, cfg))
    model = LM(cfg.model)
    try:
        verify_checkpoint(ckpt)
    except ValueError as exc:
        older = [p.name for p in checkpoint_folders(ckpt.parent) if checkpoint_step(p) < (checkpoint_step(ckpt) or 0)]
        hint = f"; to load an older one, give its folder ({', '.join(older)} in {ckpt.parent})" if older else ""
        raise ValueError(f"{exc}{hint}") from None
    load_model_weights(model, ckpt, verify=False)
    return model.to(device).eval(), tokenizer, cfg
