"""DDP and FSDP2 on CPU (gloo, 2 processes) against one process with the same global batch."""

import dataclasses
import json
import os
import shutil
import socket

import pytest
import torch.multiprocessing as mp

from slmforge.runs import write_text
from slmforge.train.loop import train
from tests.train.test_loop import _cfg, _losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, cfg) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch

    from slmforge.train import distributed

    torch.set_num_threads(1)
    try:
        train(cfg, progress=False)
    finally:
        distributed.shutdown()


def _run_two_ranks(cfg) -> None:
    mp.start_processes(_worker, args=(2, _free_port(), cfg), nprocs=2, join=True, start_method="fork")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_resume_at_world_size_one(tmp_path, shards_dir, parallel):
    single = _cfg(tmp_path, shards_dir, "single", batch_size=4, grad_accum=2)
    train(single, progress=False)

    ranks = _cfg(tmp_path, shards_dir, parallel, batch_size=2, grad_accum=2, parallel=parallel)
    _run_two_ranks(ranks)
    a, b = _losses(single.run_dir), _losses(ranks.run_dir)
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)

    # Resume the 2-rank run's step-4 checkpoint in one process with the same global batch.
    resumed_dir = tmp_path / f"{parallel}_resumed"
    shutil.copytree(ranks.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_000008")
    write_text(resumed_dir / "checkpoints" / "latest", "step_000004\n")
    resumed = dataclasses.replace(single, name=resumed_dir.name)
    train(resumed, resume=True, progress=False)
    c = _losses(resumed_dir)
    assert c[:4] == b[:4]
    assert c[4:] == pytest.approx(a[4:], rel=1e-4, abs=1e-5)
    assert json.loads((resumed_dir / "train_result.json").read_text())["steps"] == 8
