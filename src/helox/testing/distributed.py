"""Distributed tests on CPU: `run_distributed` starts real processes that join a gloo group on
127.0.0.1 and run one function each, and hands back what every rank returned (OLMo-core's
`run_distributed_test` is the model). The function must be importable by the children (a
module-level function of a package module, not of a test file)."""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = (),
                    timeout_s: float = 300, backend: str = "gloo") -> list[Any]:
    """`fn(*args)` on `world_size` processes of one process group (gloo: one thread each, as
    ranks sharing one machine's cores should; nccl: one GPU each); returns each rank's result,
    rank 0 first. A rank's exception fails the call with its traceback."""
    with tempfile.TemporaryDirectory(prefix="helox-dist-") as folder:
        mp.start_processes(_rank_main, args=(fn, args, world_size, free_port(), folder,
                                             timeout_s, backend),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=False)
                for rank in range(world_size)]


def _rank_main(rank: int, fn: Callable[..., Any], args: tuple, world_size: int, port: int,
               folder: str, timeout_s: float, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        torch.save(fn(*args), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
