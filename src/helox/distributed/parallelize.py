"""Parallelism applied to a single-device model from outside (torchtitan's `parallelize.py`):
the process group and device mesh, then DDP, FSDP2 (`fully_shard` per block, then the root;
HSDP on a 2-D mesh) or DDP with a ZeRO-1 optimizer. Model code never knows.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from helox.distributed.config import ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard")


def pick_backend(cfg: ParallelConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(cfg: ParallelConfig, device: torch.device,
                     timeout: timedelta = timedelta(minutes=10)) -> None:
    """Join the job torchrun (or torch.distributed.run) started: rank and world size come from
    its environment variables."""
    if not dist.is_initialized():
        dist.init_process_group(pick_backend(cfg, device), timeout=timeout)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def build_mesh(cfg: ParallelConfig, device: torch.device) -> DeviceMesh:
    """The (dp_replicate, dp_shard) mesh over every rank of the job."""
    replicate, shard = cfg.degrees(dist.get_world_size())
    return init_device_mesh(device.type, (replicate, shard), mesh_dim_names=MESH_DIMS)


def parallelize(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig) -> nn.Module:
    """The model as it trains on the mesh: FSDP2 when parameters are sharded (each block its
    own unit, so only one block's full parameters exist at a time) or offloaded to the host
    (which FSDP2 does, even on one rank), else DDP."""
    replicate, shard = mesh.shape
    if shard > 1 or cfg.cpu_offload:
        fsdp_mesh = mesh if replicate > 1 else mesh["dp_shard"]  # HSDP on a 2-D mesh
        options = {"mesh": fsdp_mesh}
        if cfg.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model
    if replicate > 1:
        return DistributedDataParallel(model, process_group=mesh["dp_replicate"].get_group())
    return model


def zero1_optimizer(optimizer_class: type[torch.optim.Optimizer], groups: list[dict],
                    options: dict, mesh: DeviceMesh) -> ZeroRedundancyOptimizer:
    """ZeRO-1: the optimizer `optimizer_class(groups, **options)` would be, with its state
    sharded over the replicas of the mesh (each rank steps the parameters it owns, then
    broadcasts them). Takes the optimizer's parts rather than its config, so that this package
    needs nothing of the training one (helox.training.optim.optimizer_spec makes them)."""
    first, *rest = groups
    zero = ZeroRedundancyOptimizer(first["params"], optimizer_class=optimizer_class,
                                   process_group=mesh["dp_replicate"].get_group(),
                                   **options | {k: v for k, v in first.items() if k != "params"})
    for group in rest:
        zero.add_param_group(group)
    return zero


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full on this rank (FSDP2's shards gathered), by module path."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}
