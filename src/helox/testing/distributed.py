"""Distributed tests on CPU: `run_distributed` starts real processes that join a gloo group on
127.0.0.1 and run one function each, and hands back what every rank returned (OLMo-core's
`run_distributed_test` is the model). The function must be importable by the children (a
module-level function of a package module, not of a test file). `helox_train` launches
`helox train` itself (on `--nproc` processes through torch.distributed.run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


def helox_train(recipe: Path, run_dir: Path, *args: str, env: dict | None = None,
                nproc: int = 2) -> subprocess.CompletedProcess:
    """`python -m helox.cli train RECIPE --run-dir RUN_DIR [--nproc N] ARGS`, which must
    succeed (its output is in the assertion message)."""
    command = [sys.executable, "-m", "helox.cli", "train", str(recipe), "--run-dir",
               str(run_dir), *(["--nproc", str(nproc)] if nproc > 1 else []), *args]
    done = run_job(command, env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def run_job(command: list[str], env: dict | None = None, timeout_s: float = 300,
            ) -> subprocess.CompletedProcess:
    """`command` in its own session; on a timeout the whole session (torchrun and every
    rank it started) is killed, so no rank outlives the test, and TimeoutError says so."""
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise TimeoutError(f"{' '.join(command)} ran past {timeout_s} s:\n{stdout}{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
