"""``train(cfg)``: build the model, loop over batches, evaluate, checkpoint — in reading order.

``train`` reads top to bottom like torchtitan's ``Trainer.train``: ``setup`` (seed, model, optimizer, loaders,
resume), then per step ``train_step`` (micro-batches, clipping, the update) and ``_log_step`` (metrics,
evaluation, checkpoint), then ``_finish`` (the result, the loss plot). The loop knows nothing of data formats (it
reads token shards through ``TokenLoader``) and the model knows nothing of the loop. A ``Task`` (what a step
trains on: the loader, the loss, the validation) lets post-training (``slmforge/post/``: SFT, ORPO, DPO) reuse this
loop unchanged, resume included; ``train.init_from`` starts any stage from another run's weights.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from slmforge.checkpoint import checkpoint_folders, newest_valid_checkpoint
from slmforge.config import RunConfig, TrainConfig
from slmforge.log import log
from slmforge.metrics import bits_per_byte, tokens_per_step
from slmforge.model.dsa import at_step as dsa_at_step
from slmforge.model.lm import LM
from slmforge.model.moe import after_step as moe_after_step
from slmforge.plan import flops_per_token
from slmforge.progress import progress_bar
from slmforge.runs import MetricsLog, RunDir, atomic_path, save_config, write_json
from slmforge.tokens.shards import load_shards, recorded_tokenizer
from slmforge.tokens.tokenizer import Tokenizer
from slmforge.train import distributed as dist
from slmforge.train.checkpoint import load_checkpoint, save_checkpoint
from slmforge.train.optim import build_optimizer
from slmforge.train.schedule import anneal_aligned, lr_at, stage_budgets
from slmforge.train.speed import autocast_dtype, peak_flops
from slmforge.train.task import (Task, freeze, init_checkpoint, load_init, reshard_loader_state, shards_task,
                                 train_shards)
from slmforge.train.trackers import check_trackers, tracked


@dataclass
class RunResult:
    run_dir: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    train_loss: float
    val_loss: float
    val_bits_per_byte: float
    num_params: int


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compile_enabled(value: str, device: torch.device) -> bool:
    value = str(value).lower()
    if value == "auto":
        return device.type == "cuda"
    if value in ("true", "false", "1", "0", "on", "off"):
        return value in ("true", "1", "on")
    raise ValueError(f"train.compile={value!r}: choose auto, true or false")


def _autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@dataclass
class Trainer:
    """What one training run holds between steps; built by ``setup``."""

    cfg: RunConfig
    t: TrainConfig  # cfg.train, with the WSD decay aligned to the anneal stage
    info: dist.DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    run: RunDir
    model: LM  # the bare model: clipping, evaluation and checkpoints read it
    train_model: nn.Module  # the model as parallelized (DDP wrapper, FSDP2, compiled blocks): steps run it
    optimizer: torch.optim.Optimizer
    task: Task
    metrics: MetricsLog
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # one device's: GPU peak, CPU GEMM ceiling (train/speed.py); None: no MFU
    step: int = 0

    @property
    def loader(self):
        return self.task.loader

    def stage_name(self) -> str | None:
        return self.task.stage()


@dataclass
class StepOutput:
    lr: float
    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # before clipping
    extra: dict  # the task's step metrics (rank 0's), mean over micro-batches


def train(cfg: RunConfig, resume: bool = False, loss_fn: Callable | None = None, progress: bool = True,
          force: bool = False, task: Task | None = None) -> RunResult:
    """Train ``cfg``'s model on its token shards (or ``task``'s data); ``resume`` continues exactly from the newest
    valid checkpoint. ``loss_fn`` replaces the task's loss.

    A run folder that already has checkpoints or metrics is refused without ``resume``; ``force`` deletes them and
    starts over.
    """
    info = dist.init(resolve_device(cfg.train.device).type)
    tr = setup(cfg, info, resume, force, task)
    loss_fn = loss_fn or tr.task.loss
    batches = iter(tr.loader)
    bar = progress_bar(total=tr.t.max_steps, initial=tr.step, disable=not (progress and info.is_main), desc="train",
               dynamic_ncols=True)
    start_time, start_step = time.perf_counter(), tr.step
    train_loss = val_loss = float("nan")
    exhausted = False
    while tr.step < tr.t.max_steps:
        t0 = time.perf_counter()
        stage = tr.stage_name()
        out = train_step(tr, batches, loss_fn)
        if out is None:  # a mixture with after_last="stop" has spent its last budget
            exhausted = True
            break
        record = _log_step(tr, out, time.perf_counter() - t0, stage)
        train_loss, val_loss = out.loss, record.get("val_loss", val_loss)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}",
                        **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
        bar.update(1)
    bar.close()
    if exhausted and tr.step > start_step:  # ended early: evaluate and save where we stopped
        val_loss = _evaluate(tr)
        if tr.step % tr.t.ckpt_every:
            _save(tr)
    return _finish(tr, start_step, time.perf_counter() - start_time, train_loss, val_loss)


def setup(cfg: RunConfig, info: dist.DistInfo, resume: bool, force: bool = False, task: Task | None = None) -> Trainer:
    """Seed, build the model, optimizer and loaders, then write config.yaml; restore the newest valid checkpoint if
    asked, else ``train.init_from``'s weights. Every check a user error can fail comes first, so a refused run
    writes nothing."""
    budgeted = stage_budgets(cfg, info.world_size)  # config.yaml keeps the recipe's fractions
    t = anneal_aligned(budgeted, info.world_size)
    device = dist.device_for(info, t.device)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    run = RunDir.of(cfg)
    check_trackers(t.loggers)
    if task is None:
        _check_vocab(cfg, run)
        _validation_shards(cfg, run)
    ckpt = _resume_point(run, resume, force, info.is_main)
    init = None if ckpt is not None or not t.init_from else init_checkpoint(t.init_from)
    # Measured on a CPU (the GEMM ceiling; the bf16 slowdown, if it warns) at the run's threads, before seeding.
    amp_dtype, peak = autocast_dtype(t.dtype, device), peak_flops(device)
    if peak and device.type == "cpu" and info.is_main:
        log(f"train: CPU MFU is against this machine's float32 GEMM ceiling, {peak / 1e9:,.0f} GFLOP/s at "
            f"{torch.get_num_threads()} threads")
    torch.manual_seed(t.seed)
    model = LM(cfg.model).to(device)
    if init is not None:
        load_init(model, init, t.init_from)
    freeze(model, t.trainable)
    train_model = dist.parallelize(model, info, t.parallel, compile_enabled(t.compile, device),
                                   t.activation_checkpointing, device)
    optimizer = build_optimizer(model, t)
    task = task or shards_task(budgeted, run, t, info.rank, info.world_size)
    if cfg.model.engram.layers and ckpt is None and init is None:  # a checkpoint carries its own map
        _engram_compression(model, task.tokenizer or run.tokenizer)
    if info.is_main:
        _write_run_folder(cfg, run, task.tokenizer, force)
    tr = Trainer(cfg, t, info, device, amp_dtype, run, model, train_model, optimizer, task,
                 metrics=MetricsLog(run.metrics), tokens_per_step=tokens_per_step(cfg, info.world_size),
                 flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len)["train"],
                 peak_flops=peak)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, info)
        tr.step = state["step"]
        task.loader.load_state_dict(reshard_loader_state(state["loader"], t.batch_size, info.world_size))
    if info.is_main:
        # A replayed step is not logged twice.
        tr.metrics.truncate_after(tr.step)
        tr.metrics = tracked(tr.metrics, cfg, tr.step)  # train.loggers: TensorBoard, wandb (train/trackers.py)
    return tr


def _engram_compression(model: LM, tokenizer: str | Path) -> None:
    """Engram's token compression (model/engram.py) from the tokenizer's tokens, a buffer saved with the model."""
    tok = Tokenizer.load(tokenizer)
    model.set_token_compression([tok.hf.id_to_token(i) for i in range(tok.vocab_size)])


def _resume_point(run: RunDir, resume: bool, force: bool, is_main: bool) -> Path | None:
    """The checkpoint to resume from: the newest that verifies (saying which newer ones were skipped and why).
    Without ``resume`` a run folder that already trained is refused unless ``force`` (start over)."""
    if resume and force:
        raise ValueError("--resume continues a run and --force starts it over: give one of them")
    if not resume:
        done = _trained_outputs(run)
        if done and not force:
            raise ValueError(f"{run.root}: already trained ({', '.join(done)}); continue it with --resume, or "
                             f"start over with --force (deletes them), or give the run a new name=...")
        return None
    ckpt, skipped = newest_valid_checkpoint(run.checkpoints)
    if ckpt is None and skipped:
        raise ValueError(f"{run.checkpoints}: no checkpoint to resume from verifies ({'; '.join(skipped)}); "
                         f"to start over, delete {run.checkpoints} and {run.metrics.name}")
    if is_main and ckpt is not None:
        for reason in skipped:
            log(f"resume: skipping {reason}")
        log(f"resume: from {ckpt.name}")
    return ckpt


def _trained_outputs(run: RunDir) -> list[str]:
    """What an earlier training left in the run folder, that training from step 0 would overwrite."""
    folders = checkpoint_folders(run.checkpoints)
    found = [f"checkpoints up to {folders[-1].name}"] if folders else []
    if run.metrics.is_file() and run.metrics.stat().st_size:
        found.append(run.metrics.name)
    return found + [run.train_result.name] * run.train_result.is_file()


def _write_run_folder(cfg: RunConfig, run: RunDir, tokenizer: Path | None, force: bool) -> None:
    """config.yaml, the shards' tokenizer; with ``force``, an earlier training's outputs deleted first."""
    run.root.mkdir(parents=True, exist_ok=True)
    if force:
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        for path in (run.metrics, run.loss_plot, run.train_result):
            path.unlink(missing_ok=True)
    save_config(run.root, cfg)
    if tokenizer is not None and not (run.tokenizer.is_file() and run.tokenizer.read_bytes() == tokenizer.read_bytes()):
        with atomic_path(run.tokenizer) as tmp:
            shutil.copyfile(tokenizer, tmp)


def _check_vocab(cfg: RunConfig, run: RunDir) -> None:
    for folder in train_shards(cfg, run):
        vocab = load_shards(folder).meta["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise ValueError(f"{folder}: tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}")


def _validation_shards(cfg: RunConfig, run: RunDir) -> Path:
    """<shards_dir>/validation; given shards without one: a one-line error with the command that makes it."""
    folder = run.split_shards("validation")
    if cfg.data.shards_dir and not folder.exists():
        tokenizer = cfg.data.tokenizer or recorded_tokenizer(train_shards(cfg, run)[0])
        raise ValueError(f"{folder}: no validation split (data.shards_dir needs train/ and validation/); tokenize "
                         f"held-out documents into it: slmforge tokenize FILES tokenizer={tokenizer} out={folder}")
    return folder


def train_step(tr: Trainer, batches, loss_fn: Callable) -> StepOutput | None:
    """One optimizer step: ``grad_accum`` micro-batches, clipping, the update. None when the data ran out."""
    t = tr.t
    lr = lr_at(tr.step, t)
    for group in tr.optimizer.param_groups:
        group["lr"] = lr
    dsa_at_step(tr.model, tr.step)  # DSA layers with an in-run warm-up: dense before dsa.dense_steps, then sparse
    loss_sum, extra = 0.0, {}
    for micro in range(t.grad_accum):
        try:
            batch = next(batches)
        except StopIteration:
            tr.optimizer.zero_grad(set_to_none=True)
            return None
        # Gradients are all-reduced on the last micro-batch only.
        with dist.no_sync(tr.train_model, micro == t.grad_accum - 1), _autocast(tr.device, tr.amp_dtype):
            out = loss_fn(tr.train_model, tuple(part.to(tr.device) for part in batch))
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            loss = loss / t.grad_accum
            loss.backward()
        loss_sum += loss.item()
        for key, value in metrics.items():
            extra[key] = extra.get(key, 0.0) + value / t.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), t.grad_clip)
    # Under FSDP2 the norm is a DTensor; its full value is the same on every rank.
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    # MoE layers move their selection bias from this step's expert load, summed over ranks; {} without MoE.
    extra.update(moe_after_step(tr.model, torch.distributed.all_reduce if tr.info.enabled else None))
    tr.step += 1
    return StepOutput(lr, dist.all_reduce_mean(loss_sum, tr.info), grad_norm, extra)


def _log_step(tr: Trainer, out: StepOutput, seconds: float, stage: str | None) -> dict:
    """The step's metrics record (written by rank 0), with an evaluation and a checkpoint when they are due."""
    t, step = tr.t, tr.step
    record = {"step": step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
              "tokens": step * tr.tokens_per_step, "tokens_per_second": tr.tokens_per_step / seconds, **out.extra}
    if stage is not None:
        record["stage"] = stage
        if step % t.log_every == 0 or step == t.max_steps:
            record["mixture_tokens"] = tr.loader.realised()
    if tr.peak_flops:  # per device: the step's tokens ran on world_size devices
        record["mfu"] = tr.flops_per_token * tr.tokens_per_step / seconds / (tr.peak_flops * tr.info.world_size)
    # The last step of a stage is evaluated too, so the report can show each stage's effect (the anneal's).
    stage_ends = stage is not None and tr.stage_name() != stage
    if step % t.eval_every == 0 or step == t.max_steps or stage_ends:
        record.update(_evaluate_all(tr))
    if tr.info.is_main:
        tr.metrics.log(record)
    if step % t.ckpt_every == 0 or step == t.max_steps:
        _save(tr)
    return record


def _evaluate_all(tr: Trainer) -> dict:
    """The task's validation metrics, with bits per byte when the task knows its bytes."""
    with _autocast(tr.device, tr.amp_dtype):
        out = tr.task.evaluate(tr.model, tr.task.val_batches, tr.device)
    if tr.task.tokens_per_byte == tr.task.tokens_per_byte:
        out["val_bits_per_byte"] = bits_per_byte(out["val_loss"], tr.task.tokens_per_byte)
    return out


def _evaluate(tr: Trainer) -> float:
    return _evaluate_all(tr)["val_loss"]


def _save(tr: Trainer) -> None:
    save_checkpoint(tr.run.checkpoints, tr.step, tr.model, tr.optimizer, {"loader": tr.loader.state_dict()},
                    keep=tr.t.keep_checkpoints, info=tr.info)


def _finish(tr: Trainer, start_step: int, seconds: float, train_loss: float, val_loss: float) -> RunResult:
    """The run's result, also written (with the loss plot) by rank 0."""
    result = RunResult(
        run_dir=str(tr.run.root), steps=tr.step, tokens=tr.step * tr.tokens_per_step, seconds=seconds,
        tokens_per_second=(tr.step - start_step) * tr.tokens_per_step / max(seconds, 1e-9),
        train_loss=train_loss, val_loss=val_loss, val_bits_per_byte=bits_per_byte(val_loss, tr.task.tokens_per_byte),
        num_params=sum(p.numel() for p in tr.model.parameters()),
    )
    if tr.info.is_main:
        plot_losses(tr.metrics.read(), tr.run.loss_plot)
        write_json(tr.run.train_result, result.__dict__)
        tr.metrics.close()
    dist.barrier(tr.info)
    return result


def plot_losses(records: list[dict], path: Path) -> None:
    # matplotlib is imported here: it is slow to import and only this plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", lw=1)
    val = [r for r in records if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
