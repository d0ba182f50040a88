"""Everything distributed, applied to a model that knows nothing of it (torchtitan's ``parallelize.py``).

The only module that imports ``torch.distributed``. Launch with torchrun, which sets RANK, WORLD_SIZE
and LOCAL_RANK; without them everything here is a no-op and training runs in one process:

    torchrun --nproc_per_node=8 -m slmforge train --config recipes/gpu_100m.yaml train.parallel=fsdp

Order of wrapping (as torchtitan): activation checkpointing per block, torch.compile per block, then
DDP or FSDP2 (``fully_shard`` per block, then the root). CPU runs use the gloo backend, GPU runs nccl.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process needs none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, rank=info.rank, world_size=world_size)
    return info


def device_for(info: DistInfo, name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, info: DistInfo, parallel: str, compile: bool, activation_checkpointing: bool,
                device: torch.device) -> nn.Module:
    """Return the module to train: ``model`` itself, or a DDP wrapper around it (FSDP2 shards in place)."""
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile:
        # Per block: one compiled graph reused by every layer, and FSDP2 hooks stay between blocks.
        for block in model.blocks:
            block.compile()
    if not info.enabled or parallel == "none":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ValueError(f"train.parallel={parallel!r}: choose 'ddp', 'fsdp' or 'none'")


def no_sync(module: nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if last_micro_step:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def full_state(model: nn.Module, optimizer, info: DistInfo) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU (on every rank: it is a collective).

    One full-state format for every world size keeps checkpoints loadable at any world size (and by
    a single process); models here are at most 1B parameters, whose full state fits in host memory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict, info: DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / info.world_size).item()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
