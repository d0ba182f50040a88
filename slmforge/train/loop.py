"""``train(cfg)``: build the model, loop over batches, evaluate, checkpoint — in reading order.

The loop knows nothing of data formats (it reads token shards through ``TokenLoader``) and the
model knows nothing of the loop. ``loss_fn`` lets alignment stages reuse this loop unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from slmforge.config import RunConfig
from slmforge.tokens.shards import TokenLoader, load_shards
from slmforge.model.lm import LM
from slmforge.runs import MetricsLog, save_config, write_json
from slmforge.train import distributed as dist
from slmforge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from slmforge.train.optim import build_optimizer
from slmforge.train.schedule import anneal_aligned, lr_at


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


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. 'auto' is bf16 on GPU and fp32 on CPU (bf16 on CPU is opt-in)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16}[name]


def compile_enabled(value: str, device: torch.device) -> bool:
    value = str(value).lower()
    if value == "auto":
        return device.type == "cuda"
    if value in ("true", "false", "1", "0", "on", "off"):
        return value in ("true", "1", "on")
    raise ValueError(f"train.compile={value!r}: choose auto, true or false")


def default_loss(model, batch) -> torch.Tensor:
    x, y = batch
    return model(x, targets=y)[1]


def shard_paths(cfg: RunConfig) -> tuple[Path, Path]:
    root = Path(cfg.data.shards_dir) if cfg.data.shards_dir else cfg.run_dir / "shards"
    return root / "train", root / "validation"


@torch.no_grad()
def evaluate(model, batches, device, amp_dtype) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with _autocast(device, amp_dtype):
            total += model(x.to(device), targets=y.to(device))[1].item()
        count += 1
    model.train()
    return total / max(count, 1)


def _autocast(device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from slmforge.plan import GPUS

    name = torch.cuda.get_device_name(device).lower()
    return next((spec.peak_flops for key, spec in GPUS.items() if key in name), None)


def build_train_loader(cfg: RunConfig, rank: int = 0, world_size: int = 1):
    """The mixture loader when the recipe declares stages, else one TokenLoader over <shards_dir>/train."""
    if cfg.data.mixture.stages:
        from slmforge.tokens.mixture import MixtureLoader

        return MixtureLoader(cfg.data.mixture, cfg.data.seq_len, cfg.train.batch_size, rank, world_size,
                             mode=cfg.data.packing)
    train_dir, _ = shard_paths(cfg)
    return TokenLoader(train_dir, cfg.data.seq_len, cfg.train.batch_size, seed=cfg.data.seed, rank=rank,
                       world_size=world_size, mode=cfg.data.packing)


def reshard_loader_state(state: dict, batch_size: int, world_size: int) -> dict:
    """A TokenLoader state saved at another world size, for this one (the global batch must be equal)."""
    if state.get("world_size", world_size) == world_size or "position" not in state:
        return state
    old_global, new_global = state["batch_size"] * state["world_size"], batch_size * world_size
    if old_global != new_global:
        raise ValueError(f"resuming at world size {world_size}: the global batch was {old_global} sequences, "
                         f"now {new_global}; set train.batch_size={old_global // world_size}")
    # Global batch b went to rank b % world_size, so every rank's position counts global batches.
    return {**state, "batch_size": batch_size, "world_size": world_size}


def train(cfg: RunConfig, resume: bool = False, loss_fn: Callable = default_loss, progress: bool = True) -> RunResult:
    t = cfg.train
    info = dist.init(resolve_device(t.device).type)
    t = anneal_aligned(cfg, info.world_size)
    device = dist.device_for(info, t.device)
    amp_dtype = autocast_dtype(t.dtype, device)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    run_dir = cfg.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir, cfg)
    progress = progress and info.is_main

    train_dir, val_dir = shard_paths(cfg)
    mix = cfg.data.mixture
    for folder in [s.shards for s in mix.sources] if mix.stages else [train_dir]:
        vocab = load_shards(folder).meta["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise ValueError(f"{folder}: tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}")
    model = LM(cfg.model).to(device)
    train_model = dist.parallelize(model, info, t.parallel, compile_enabled(t.compile, device),
                                   t.activation_checkpointing, device)
    optimizer = build_optimizer(model, t)
    loader = build_train_loader(cfg, info.rank, info.world_size)
    val_meta = load_shards(val_dir).meta
    val_batches = list(itertools.islice(TokenLoader(val_dir, cfg.data.seq_len, t.batch_size, shuffle=False), t.eval_batches))
    # Bits per byte: nats/token * tokens/byte / ln 2 — comparable across tokenizers.
    tokens_per_byte = val_meta["num_tokens"] / max(val_meta["num_bytes"], 1)

    step, metrics = 0, MetricsLog(run_dir / "metrics.jsonl")
    ckpt = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, info)
        step = state["step"]
        loader.load_state_dict(reshard_loader_state(state["loader"], t.batch_size, info.world_size))
    if info.is_main:
        metrics.truncate_after(step)

    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len * info.world_size
    from slmforge.plan import flops_per_token

    flops_tok = flops_per_token(cfg.model, cfg.data.seq_len)["train"]
    peak = _peak_flops(device)
    batches = iter(loader)
    bar = tqdm(total=t.max_steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    start_time, start_step = time.perf_counter(), step
    train_loss = val_loss = float("nan")
    exhausted = False
    while step < t.max_steps:
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss_sum, exhausted = 0.0, False
        stage = loader.current_stage[1].name if mix.stages else None
        for micro in range(t.grad_accum):
            try:
                x, y = next(batches)
            except StopIteration:  # a mixture with after_last="stop" has spent its last budget
                exhausted = True
                break
            with dist.no_sync(train_model, micro == t.grad_accum - 1), _autocast(device, amp_dtype):
                loss = loss_fn(train_model, (x.to(device), y.to(device))) / t.grad_accum
                loss.backward()
            loss_sum += loss.item()
        if exhausted:
            optimizer.zero_grad(set_to_none=True)
            break
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_loss = dist.all_reduce_mean(loss_sum, info)
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": step * tokens_per_step, "tokens_per_second": tokens_per_step / dt}
        if stage is not None:
            record["stage"] = stage
            if step % t.log_every == 0 or step == t.max_steps:
                record["mixture_tokens"] = loader.realised()
        if peak:
            record["mfu"] = flops_tok * tokens_per_step / dt / peak
        # The last step of a stage is evaluated too, so the report can show each stage's effect (the anneal's).
        stage_ends = stage is not None and loader.current_stage[1].name != stage
        if step % t.eval_every == 0 or step == t.max_steps or stage_ends:
            val_loss = evaluate(model, val_batches, device, amp_dtype)
            record.update(val_loss=val_loss, val_bits_per_byte=val_loss * tokens_per_byte / math.log(2))
        if info.is_main:
            metrics.log(record)
        if step % t.ckpt_every == 0 or step == t.max_steps:
            save_checkpoint(run_dir / "checkpoints", step, model, optimizer, {"loader": loader.state_dict()},
                            info=info)
        bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}",
                        **({"mfu": f"{record['mfu']:.1%}"} if peak else {}))
        bar.update(1)
    bar.close()
    if exhausted and step > start_step:  # ended early: evaluate and save where we stopped
        val_loss = evaluate(model, val_batches, device, amp_dtype)
        if step % t.ckpt_every:
            save_checkpoint(run_dir / "checkpoints", step, model, optimizer, {"loader": loader.state_dict()},
                            info=info)
    seconds = time.perf_counter() - start_time
    result = RunResult(
        run_dir=str(run_dir), steps=step, tokens=step * tokens_per_step, seconds=seconds,
        tokens_per_second=(step - start_step) * tokens_per_step / max(seconds, 1e-9),
        train_loss=train_loss, val_loss=val_loss,
        val_bits_per_byte=val_loss * tokens_per_byte / math.log(2), num_params=sum(p.numel() for p in model.parameters()),
    )
    if info.is_main:
        plot_losses(metrics.read(), run_dir / "loss.png")
        write_json(run_dir / "train_result.json", result.__dict__)
    dist.barrier(info)
    return result


def plot_losses(records: list[dict], path: Path) -> None:
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
