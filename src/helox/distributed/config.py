"""How training is spread over processes: a device mesh of data-parallel degrees.

`dp_replicate` ranks hold whole copies of the model (DDP, or the replicate dimension of HSDP);
`dp_shard` ranks split every parameter, gradient and optimizer state between them (FSDP2's
`fully_shard`). Their product is the world size. `zero1` keeps DDP's replicated parameters and
shards only the optimizer state (ZeroRedundancyOptimizer). Tensor, pipeline and expert degrees
come with the mixture-of-experts issue.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from helox.configbase import StrictModel


class ParallelConfig(StrictModel):
    dp_replicate: int = Field(default=1, ge=1)
    """Data-parallel ranks holding whole copies of the model (DDP; HSDP's replicate groups)."""
    dp_shard: int = Field(default=-1, ge=-1)
    """Data-parallel ranks sharding parameters, gradients and optimizer state (FSDP2);
    -1 takes every rank the replicate degree leaves (world size / dp_replicate)."""
    zero1: bool = False
    """With pure DDP (dp_shard 1): shard only the optimizer state across the ranks (ZeRO-1)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The collective backend; auto takes NCCL on CUDA and gloo on CPU."""
    cpu_offload: bool = False
    """FSDP2 on CUDA: keep sharded parameters, gradients and optimizer state in host memory
    (CPUOffloadPolicy), the optimizer stepping on the CPU."""

    def degrees(self, world_size: int) -> tuple[int, int]:
        """(dp_replicate, dp_shard) for `world_size` processes; an error naming both numbers
        when they do not multiply to it."""
        if self.dp_shard == -1 and world_size % self.dp_replicate:
            raise ValueError(f"parallel.dp_replicate ({self.dp_replicate}) does not divide the "
                             f"world size ({world_size})")
        shard = world_size // self.dp_replicate if self.dp_shard == -1 else self.dp_shard
        if self.dp_replicate * shard != world_size:
            raise ValueError(f"parallel.dp_replicate ({self.dp_replicate}) × parallel.dp_shard "
                             f"({shard}) must equal the world size ({world_size})")
        if self.zero1 and shard != 1:
            raise ValueError(f"parallel.zero1 shards the optimizer state of DDP replicas, but "
                             f"parallel.dp_shard is {shard}; set dp_replicate to the world size "
                             f"({world_size}), or drop zero1 and let FSDP2 shard everything")
        return self.dp_replicate, shard

    def per_rank_batch(self, global_batch_sequences: int, world_size: int) -> int:
        """Sequences each data-parallel rank takes of a global batch; an error naming both
        numbers when they do not divide."""
        if global_batch_sequences % world_size:
            raise ValueError(f"the global batch of {global_batch_sequences} sequences does not "
                             f"divide across {world_size} data-parallel ranks")
        return global_batch_sequences // world_size
