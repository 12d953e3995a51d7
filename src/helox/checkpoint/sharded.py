"""Sharded checkpoint parts through torch.distributed.checkpoint (DCP): every rank writes its
own shards of the modules and optimizers into `dcp/`, and a load reshards to the reading job's
layout, so a checkpoint written by 2 FSDP2 ranks loads into 1 process and one written by
1 process loads into 2 ranks. DCP's state-dict helpers name every tensor by its module path
whatever the wrapping (DDP, FSDP2), and fill an empty optimizer's state before loading into it.

What goes where (torchtitan's `CheckpointManager` is the model):
  dcp/             modules by part name, optimizers' per-parameter state by part name
  rank-NNNNN.pt    each rank's own parts (its RNGs, its loader position)
  state.pt         the parts every rank holds alike (counters, detector, …), from rank 0

Optimizers keep only their per-parameter `state` here: their param groups (learning rate,
betas, weight decay) are the run's config, which a resume must match, and the loop sets the
learning rate before every step. This is also what lets a ZeRO-1 optimizer, whose ranks each
hold the state of different parameters, save and reshard like the others: each rank writes the
state of the parameters it owns, under their names.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

DCP_FOLDER = "dcp"
SHARDED = "dcp"
"""format.json's file name for a part kept in dcp/."""
RANK_FILES = "rank-*.pt"
"""format.json's file name for a part each rank keeps in its own rank-NNNNN.pt."""


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def is_distributed(part: Any) -> bool:
    """Whether `part` is spread over ranks: a DDP or FSDP2 module (or one with sharded
    parameters), or a ZeRO-1 optimizer."""
    if isinstance(part, ZeroRedundancyOptimizer | DistributedDataParallel):
        return True
    if isinstance(part, nn.Module):
        return any(isinstance(p, DTensor) for p in part.parameters())
    return False


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: ZeRO-1's local one, else itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


# ---------------------------------------------------------------------------------------------
# State dicts of the sharded parts


def sharded_state(parts: Mapping[str, Any], model_name: str = "model") -> dict[str, dict]:
    """Every module and optimizer part as DCP saves it: modules by parameter path, optimizers'
    per-parameter state by the path of the parameter (of the part `model_name`)."""
    state = {}
    for name, part in parts.items():
        if isinstance(part, nn.Module):
            state[name] = get_model_state_dict(part)
        elif isinstance(part, torch.optim.Optimizer):
            state[name] = _optimizer_state(parts[model_name], part)
    return state


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"state": get_optimizer_state_dict(model, local_optimizer(optimizer))["state"]}


def save_dcp(folder: Path, state: dict[str, dict]) -> None:
    """`state` (from `sharded_state`) into folder/dcp; every rank of the job calls this."""
    with _one_process_is_meant():
        dcp.save(state, checkpoint_id=str(Path(folder) / DCP_FOLDER),
                 no_dist=not dist.is_initialized())


def save_dcp_async(folder: Path, state: dict[str, dict], group: dist.ProcessGroup) -> Future:
    """`save_dcp` in the background: returns once `state` is copied to host memory; the
    future is done when this rank's shards are written and, on rank 0, the metadata of
    every rank's (so after every rank's). `group` carries DCP's collectives."""
    return dcp.async_save(state, checkpoint_id=str(Path(folder) / DCP_FOLDER),
                          process_group=group)


def load_dcp_part(folder: Path, name: str, part: Any, model: nn.Module | None = None) -> None:
    """Part `name` from folder/dcp, resharded into `part` (an optimizer needs its `model`).
    Without a process group (one process) DCP reads every shard itself."""
    if isinstance(part, nn.Module):
        template = {name: get_model_state_dict(part)}
        _load(template, folder)
        set_model_state_dict(part, template[name])
        return
    optimizer = local_optimizer(part)
    live = get_optimizer_state_dict(model, optimizer)
    template = {name: {"state": live["state"]}}
    _load(template, folder)
    set_optimizer_state_dict(model, optimizer, {"state": template[name]["state"],
                                                "param_groups": live["param_groups"]})


def _load(template: dict, folder: Path) -> None:
    """DCP's load into `template`; without a process group, this one process reads every
    rank's shards."""
    with _one_process_is_meant():
        dcp.load(template, checkpoint_id=str(Path(folder) / DCP_FOLDER),
                 no_dist=not dist.is_initialized())


@contextmanager
def _one_process_is_meant():
    """DCP warns that it assumes one process when there is no process group: that is what
    one process reading or writing a checkpoint (export, eval, a resume) means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                category=UserWarning)
        yield


def dcp_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of folder/dcp under `prefix` (a part name), in full on the CPU, by its
    path inside the part; read in one process from the shards of every rank."""
    reader = dcp.FileSystemReader(str(Path(folder) / DCP_FOLDER))
    metadata = reader.read_metadata().state_dict_metadata
    head = f"{prefix}."
    template = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
                for key, meta in metadata.items()
                if key.startswith(head) and hasattr(meta, "size")}
    if not template:
        return {}
    with _one_process_is_meant():
        dcp.load(template, storage_reader=reader, no_dist=True)
    return {key[len(head):]: tensor for key, tensor in template.items()}


# ---------------------------------------------------------------------------------------------
# Single-file parts into a distributed job (a run saved on 1 process resumed on N)


def load_full_module(part: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Full weights by parameter path into a module that may be DDP-wrapped or FSDP2-sharded:
    each rank keeps its own shards."""
    wanted = get_model_state_dict(part).keys()
    set_model_state_dict(part, {key: tensors[key] for key in wanted},
                         options=StateDictOptions(full_state_dict=True))


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict,
                        names_key: str, only: set[str] | None = None) -> None:
    """A single-process optimizer state (param groups naming their parameters under
    `names_key`) into a distributed job's optimizer: each rank takes the state of the
    parameters it holds, sharded like them. With `only`, just those parameters' states (a
    warm start); the others stay fresh."""
    by_name = {name: saved["state"][index]
               for group in saved["param_groups"]
               for name, index in zip(group[names_key], group["params"])
               if index in saved["state"] and (only is None or name in only)}
    optimizer = local_optimizer(optimizer)
    live = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True))
    state = {name: by_name[name] for name in live["state"] if name in by_name}
    set_optimizer_state_dict(model, optimizer, {"state": state,
                                                "param_groups": live["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
