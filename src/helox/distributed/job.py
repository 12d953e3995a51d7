"""The job this process belongs to: its rank among the processes torchrun started (or just
itself), and the few collectives the training loop needs beyond the gradients' own: agreeing
on a figure, handing rank 0's choice to every rank, and checking that replicas still agree.

A process is part of a multi-process job when torchrun (or `helox train --nproc`, which runs
torch.distributed.run) set WORLD_SIZE above 1; it then joins the process group once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from helox.distributed.config import ParallelConfig
from helox.distributed.parallelize import init_distributed


@dataclass(frozen=True)
class Job:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, events, sinks and the run's files."""
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The data-parallel group (every rank of the job), None for one process."""
        return dist.group.WORLD if self.distributed else None

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (LOCAL_RANK) on a CUDA machine."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device


def join_job(cfg: ParallelConfig, device: torch.device) -> Job:
    """This process's job, joining its process group when torchrun started several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return Job()
    init_distributed(cfg, device)
    return Job(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def leave_job(job: Job) -> None:
    if job.distributed and dist.is_initialized():
        dist.destroy_process_group()


def max_over_ranks(values: list[float], job: Job) -> list[float]:
    """Each value's maximum over the ranks (one all-reduce); the values themselves for one
    process."""
    if not job.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def from_main(value: Any, job: Job) -> Any:
    """Rank 0's `value` on every rank (a choice only rank 0 makes, such as which checkpoint is
    valid, which it may have quarantined while checking)."""
    if not job.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(job: Job) -> None:
    if job.distributed:
        dist.barrier()


def replicas_agree(model: nn.Module, job: Job) -> bool:
    """Whether every rank holds the same replicated parameters: a checksum of them (sum and
    sum of squares in float64) compared by its minimum and maximum over the ranks. Sharded
    parameters (FSDP2) are not replicas and are left out."""
    if not job.distributed:
        return True
    plain = [p.detach().double() for p in model.parameters() if not isinstance(p, DTensor)]
    if not plain:
        return True
    checksum = torch.stack([sum(p.sum() for p in plain), sum((p * p).sum() for p in plain)])
    extremes = torch.cat([checksum, -checksum])  # max and −min in one all-reduce
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return bool(torch.equal(extremes[:2], -extremes[2:]))
