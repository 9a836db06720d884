"""Running a test's worker in several gloo processes on this machine."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def join_gloo(rank: int, world: int, port: int, timeout_s: float) -> None:
    """In a worker: one intra-op thread (the processes share the cores), then join the gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def spawn(fn, args: tuple, nprocs: int, timeout: float) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes; the test fails (and they are killed) past ``timeout`` s."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {timeout} s")
