"""Reading checkpoints: verify, find the newest valid one (quarantining bad ones), resolve
what a user passed, and load parts exactly (resume, rollback) or partially (a warm start from
a different parameter set). Older formats are read through `helox.checkpoint.format`."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from helox.checkpoint.format import migrate_state, read_format, step_from
from helox.checkpoint.layout import (CHECKSUMS_FILE, CORRUPT_PREFIX, EMA_WEIGHTS, FORMAT_FILE,
                                     MODEL_WEIGHTS, OPTIMIZER_FILE, STATE_FILE, TEMP_PREFIX,
                                     checkpoint_root, is_checkpoint_name, list_checkpoints,
                                     step_of)
from helox.checkpoint.sharded import (SHARDED, dcp_tensors, is_distributed, load_dcp_part,
                                      load_full_module, load_full_optimizer, rank_file)
from helox.checkpoint.writer import OPTIMIZER_CLASS, PARAM_NAMES, param_names, read_best
from helox.errors import HeloxError
from helox.fileio import sha256_file


@dataclass
class Restored:
    path: Path
    step: int
    state: dict
    """The non-module, non-optimizer parts by name: state.pt in the current format, with the
    reading rank's own parts (RNGs, loader) from its rank file in a multi-process checkpoint."""
    files: dict[str, str] = field(default_factory=dict)
    """format.json's part → file (empty for format 1)."""


@dataclass
class PartialRestore:
    """What a partial restore did, by parameter (or tensor) name."""

    loaded: list[str] = field(default_factory=list)
    fresh: dict[str, str] = field(default_factory=dict)
    """Names that kept their fresh value, with the reason (new, or a changed shape)."""
    dropped: list[str] = field(default_factory=list)
    """Names in the checkpoint that the model no longer has."""


# ---------------------------------------------------------------------------------------------
# Verifying and finding


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches its checksum, otherwise what is wrong."""
    sums_path = Path(path) / CHECKSUMS_FILE
    if not sums_path.is_file():
        return f"no {CHECKSUMS_FILE} (the save did not finish)"
    try:
        checksums = json.loads(sums_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{CHECKSUMS_FILE} is unreadable"
    for name, expected in checksums.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != expected:
            return f"{name} does not match its checksum"
    return None


def read_checkpoint(path: Path, rank: int = 0) -> Restored:
    """A verified checkpoint's step and trainer state, migrated to the current format. In a
    multi-process checkpoint, `rank`'s own parts come from its rank file, or from rank 0's
    when the checkpoint was saved by fewer ranks (a resume on a larger job: the loader's
    position is the same on every rank, and every rank seeds its RNGs alike)."""
    record = read_format(path)
    state_file = Path(path) / STATE_FILE
    state = torch.load(state_file, weights_only=True) if state_file.is_file() else {}
    state = migrate_state(Path(path), record["format_version"], state)
    own = Path(path) / rank_file(rank if rank < record.get("world_size", 1) else 0)
    if own.is_file():
        state |= torch.load(own, weights_only=True)
    return Restored(path=Path(path), step=step_from(record, state), state=state,
                    files=record.get("parts", {}))


def load_newest_valid(run_dir: Path, warn: Callable[[str], None],
                      quarantine: bool = False, before_step: int | None = None,
                      rank: int = 0) -> Restored | None:
    """Newest checkpoint whose checksums hold (the best one only if it is also the newest),
    or with `before_step` the newest valid one of an earlier step (a rollback's target),
    read with its trainer state; each invalid one is reported through `warn`.

    With `quarantine` (the trainer, which owns the folder) an invalid one is renamed
    `corrupt-step-…`: kept for inspection, never counted by keep-last-K (which could otherwise
    delete a good checkpoint and keep a bad one)."""
    path = newest_valid(run_dir, warn, quarantine, before_step)
    return read_checkpoint(path, rank) if path is not None else None


def newest_valid(run_dir: Path, warn: Callable[[str], None], quarantine: bool = False,
                 before_step: int | None = None) -> Path | None:
    """The folder `load_newest_valid` would read (None when there is none)."""
    for path in list_checkpoints(run_dir):
        if before_step is not None and step_of(path) >= before_step:
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if quarantine:
            quarantined = path.with_name(f"{CORRUPT_PREFIX}{path.name}")
            shutil.rmtree(quarantined, ignore_errors=True)
            os.rename(path, quarantined)
            problem += f"; moved to {quarantined}"
        warn(f"skipping checkpoint {path.name}: {problem}")
    return None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest validation loss (checkpoints/best.json), or None when
    there is none or it no longer exists or fails its checksums."""
    best = read_best(checkpoint_root(run_dir))
    if best is None:
        return None
    path = Path(run_dir) / best["path"]
    return path if verify_checkpoint(path) is None else None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoint folders (and best.json temporaries) left by a crash."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.glob(f"{TEMP_PREFIX}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def resolve_checkpoint(path: Path, warn: Callable[[str], None]) -> Path:
    """A checkpoint folder as given, or a run folder's newest valid checkpoint."""
    path = Path(path)
    if (path / MODEL_WEIGHTS).is_file() or (path / FORMAT_FILE).is_file():
        return path
    if not path.is_dir():
        raise HeloxError(f"{path} does not exist",
                         hint="pass a run folder (e.g. workspace/runs/quickstart) or one of its "
                              "checkpoint folders (RUN_DIR/checkpoints/step-…)")
    return newest_valid_checkpoint(path, warn)


def newest_valid_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> Path:
    path = newest_valid(run_dir, warn)
    if path is None:
        raise HeloxError(f"{run_dir}: no valid checkpoint found",
                         hint="train first with `helox train RECIPE --run-dir DIR`")
    return path


# ---------------------------------------------------------------------------------------------
# Loading: exact (resume, rollback) and partial (warm start from a different parameter set)


def load_part(restored: Restored, name: str, part: Any, model: nn.Module | None = None,
              ) -> None:
    """One registered part from the checkpoint, exactly: a module from NAME.safetensors, an
    optimizer from NAME.pt, anything else from its entry in state.pt (`snapshot` wrote them
    so); a module or optimizer a multi-process job saved from dcp/, resharded. A part of a
    distributed job (DDP, FSDP2, ZeRO-1) takes its shards of the single-file form. An
    optimizer's parameters are named after `model`."""
    if restored.files.get(name) == SHARDED:
        load_dcp_part(restored.path, name, part, model)
    elif isinstance(part, nn.Module):
        file = weights_file(restored.path, f"{name}.safetensors")
        if is_distributed(part):
            load_full_module(part, full_tensors(file))
        else:
            load_model(part, str(file), strict=True)
    elif isinstance(part, torch.optim.Optimizer):
        if is_distributed(part) or is_distributed(model):
            saved = torch.load(restored.path / f"{name}.pt", weights_only=True)
            load_full_optimizer(model, part, saved, PARAM_NAMES)
        else:
            load_optimizer(restored.path, part, f"{name}.pt")
    else:
        part.load_state_dict(restored.state[name])


def load_weights(path: Path, model: nn.Module, ema: bool = False) -> None:
    """The checkpoint's weights, or with `ema` its moving average, into `model` (from dcp/
    when a multi-process job saved them)."""
    name = "ema" if ema else "model"
    if _parts(path).get(name) == SHARDED:
        load_dcp_part(path, name, model)
        return
    file = weights_file(path, EMA_WEIGHTS if ema else MODEL_WEIGHTS)
    load_model(model, str(file), strict=True)


def saved_weights(path: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (or their EMA) in full, by parameter path, whichever form
    they were saved in (tied names included)."""
    name = "ema" if ema else "model"
    if _parts(path).get(name) == SHARDED:
        return dcp_tensors(path, name)
    return full_tensors(weights_file(path, EMA_WEIGHTS if ema else MODEL_WEIGHTS))


def full_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors with the tied names save_model dropped put back."""
    saved = load_file(str(file))
    return saved | {alias: saved[kept] for alias, kept in _tied_aliases(file, saved).items()}


def _parts(path: Path) -> dict[str, str]:
    return read_format(path).get("parts", {})


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer,
                   file_name: str = OPTIMIZER_FILE) -> None:
    """The optimizer state of the same run (resume): parameters are matched by position.
    Names we added to the saved groups are not copied into an optimizer that has none."""
    saved = torch.load(Path(path) / file_name, weights_only=True)
    saved.pop(OPTIMIZER_CLASS, None)
    if not any(PARAM_NAMES in group for group in optimizer.param_groups):
        for group in saved["param_groups"]:
            group.pop(PARAM_NAMES, None)
    optimizer.load_state_dict(saved)


def load_weights_partial(path: Path, model: nn.Module, ema: bool = False) -> PartialRestore:
    """Copy each tensor of the checkpoint whose name and shape match into `model`; the rest
    of the model keeps its values (a warm start, a grown model)."""
    saved = saved_weights(path, ema)
    report = PartialRestore()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name not in saved:
                report.fresh[name] = "not in the checkpoint"
            elif saved[name].shape != tensor.shape:
                report.fresh[name] = _shape_change(saved[name].shape, tensor.shape)
            else:
                _copy_full(tensor, saved[name])
                report.loaded.append(name)
    used = set(report.loaded) | set(report.fresh)
    report.dropped = sorted(set(saved) - used)
    return report


def _copy_full(tensor: torch.Tensor, full: torch.Tensor) -> None:
    """A full tensor into a parameter, or into this rank's shard of an FSDP2 parameter."""
    if isinstance(tensor, DTensor):
        full = distribute_tensor(full.to(tensor.dtype), tensor.device_mesh, tensor.placements)
        tensor.to_local().copy_(full.to_local())
    else:
        tensor.copy_(full)


def load_optimizer_partial(path: Path, optimizer: torch.optim.Optimizer,
                           model: nn.Module) -> PartialRestore:
    """Each parameter's optimizer state from the checkpoint where its name exists there and
    its shape is unchanged; the others keep fresh state (their step counts from 0). Group
    hyperparameters stay those of `optimizer` (the new run's config). Into a distributed job
    (FSDP2, ZeRO-1) each rank takes its shard of the states it holds."""
    names = param_names(optimizer, model)
    file = Path(path) / OPTIMIZER_FILE
    if _parts(path).get("optimizer") == SHARDED:
        raise HeloxError(f"{path}: optimizer states are warm-started from a single-file "
                         "checkpoint, and this one was saved by a multi-process job",
                         hint="write its single-file form with `helox checkpoint "
                              "consolidate`, or set train.init_optimizer=false to load only "
                              "the weights")
    if not file.is_file():  # an imported model: weights without optimizer state
        return PartialRestore(fresh={name: "the checkpoint has no optimizer state"
                                     for group_names in names for name in group_names})
    saved = torch.load(file, weights_only=True)
    saved_index = _saved_param_index(file, saved, optimizer)
    saved_shapes = _saved_shapes(path)
    current = optimizer.state_dict()
    params = dict(model.named_parameters())
    report = PartialRestore()
    flat_index = 0
    for group_names in names:
        for name in group_names:
            reason = _why_fresh(name, params[name].shape, saved_index, saved_shapes, saved)
            if reason:
                report.fresh[name] = reason
            else:
                current["state"][flat_index] = saved["state"][saved_index[name]]
                report.loaded.append(name)
            flat_index += 1
    report.dropped = sorted(set(saved_index) - {n for group in names for n in group})
    if is_distributed(optimizer) or is_distributed(model):
        load_full_optimizer(model, optimizer, saved, PARAM_NAMES, only=set(report.loaded))
    else:
        optimizer.load_state_dict(current)
    return report


def _why_fresh(name: str, shape: torch.Size, saved_index: dict[str, int],
               saved_shapes: dict[str, list[int]], saved: dict) -> str | None:
    if name not in saved_index:
        return "not in the checkpoint"
    if list(shape) != saved_shapes.get(name):
        return _shape_change(saved_shapes.get(name), shape)
    if saved_index[name] not in saved["state"]:
        return "no optimizer state in the checkpoint (never updated)"
    return None


def _saved_param_index(file: Path, saved: dict, optimizer: torch.optim.Optimizer,
                       ) -> dict[str, int]:
    """Parameter name → its index in the saved optimizer state, after checking that the
    state can be matched by name and was written by the same kind of optimizer."""
    groups = saved["param_groups"]
    if not all(PARAM_NAMES in group for group in groups):
        raise HeloxError(f"{file} does not name its parameters (it was saved before names "
                         f"were recorded), so it cannot be matched to a different model",
                         hint="resume the same model (exact load), or start the optimizer "
                              "fresh and load only the weights")
    if saved.get(OPTIMIZER_CLASS) != type(optimizer).__name__:
        raise HeloxError(f"{file} holds {saved.get(OPTIMIZER_CLASS)} state, which does not "
                         f"fit {type(optimizer).__name__}",
                         hint="use the optimizer the checkpoint was trained with "
                              "(optim.optimizer), or start the optimizer fresh")
    return {name: index for group in groups
            for name, index in zip(group[PARAM_NAMES], group["params"])}


def _saved_shapes(path: Path) -> dict[str, list[int]]:
    """Parameter shapes from the checkpoint's weights header (a tied name through its
    alias): the optimizer state alone does not hold them (Adafactor keeps factored rows)."""
    with safe_open(str(Path(path) / MODEL_WEIGHTS), framework="pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        metadata = f.metadata() or {}
    shapes |= {alias: shapes[kept] for alias, kept in metadata.items() if kept in shapes}
    return shapes


def _tied_aliases(file: Path, saved: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names save_model dropped as duplicates of a tied tensor → the name it kept."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    return {alias: kept for alias, kept in metadata.items() if kept in saved}


def _shape_change(saved: Any, now: Any) -> str:
    return f"shape {list(saved) if saved else saved} in the checkpoint, {list(now)} now"


def weights_file(path: Path, name: str) -> Path:
    """A weights file of a checkpoint folder, with what to do when it is not there."""
    file = Path(path) / name
    if not file.is_file():
        hint = ("train with train.ema_decay set to keep EMA weights" if name == EMA_WEIGHTS
                else "pass a checkpoint folder (RUN_DIR/checkpoints/step-…), not a run folder"
                if not is_checkpoint_name(Path(path).name) else
                "the checkpoint is incomplete: use another one of the run")
        raise HeloxError(f"{path} has no {file.name}", hint=hint)
    return file


def has_part(restored: Restored, name: str, part: Any) -> bool:
    """Whether the checkpoint holds `name` where `load_part` would read it."""
    if restored.files.get(name) == SHARDED:
        return True
    if isinstance(part, nn.Module):
        return (restored.path / f"{name}.safetensors").is_file()
    if isinstance(part, torch.optim.Optimizer):
        return (restored.path / f"{name}.pt").is_file()
    return name in restored.state
