"""Sharded checkpoints of a model and its optimizer through torch.distributed.checkpoint (DCP):
every rank writes its own shards, and a load reshards to the reading job's layout, so a
checkpoint written by 2 FSDP2 ranks loads into 1 process and one written by 1 process loads
into 2 ranks. DCP's state-dict helpers name every tensor by its module path whatever the
wrapping (DDP, FSDP2), and fill an optimizer's state before loading into it.

This is the building block of the distributed checkpoints of issue 17; the trainer's own
checkpoints (format.json, checksums, keep-last-K) do not use it yet.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The model's and optimizer's state as this rank holds it, into `folder` (one file per
    rank and a metadata file; every rank of the job calls this)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The state `save_sharded` wrote, resharded into this job's model and optimizer."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
