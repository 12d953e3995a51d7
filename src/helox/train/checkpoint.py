"""Atomic, checksummed checkpoints: written from a host snapshot (in a background thread when
checkpoint.async_save), keep-last-K plus the best, fall-back to the newest valid one, and
partial restores for warm starts.

Layout: RUN_DIR/checkpoints/step-<8 digits>/
  model.safetensors   weights (tied tensors stored once), metadata: step and run fingerprint
  ema.safetensors     their exponential moving average (with train.ema_decay)
  optimizer.pt        optimizer state; each param group also lists its parameters' names
  state.pt            step, every RNG state, loader state, counters
  config.yaml         the resolved config the run was trained with
  run.json            the run fingerprint and resume key
  tokenizer.json      the tokenizer, so the checkpoint stands on its own
  checksums.json      sha256 of every other file; written last
RUN_DIR/checkpoints/best.json names the checkpoint with the lowest validation loss.

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place, so
a crash (even `kill -9`) mid-save leaves either the old set of checkpoints or the new one.

Saving is split in two so that training does not wait for the disk: `snapshot` copies
everything to host memory on the training thread (training goes on mutating the model and the
optimizer right after), and `CheckpointWriter` writes the copy, in a background thread when
asked. The price is one host copy of model + optimizer (+ EMA) while a save is in flight.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import _remove_duplicate_names, load_file, load_model, save_file
from tokenizers import Tokenizer
from torch import nn

from helox.config import CheckpointConfig, RunConfig, read_saved_config, save_config
from helox.data.tokenizer import load_tokenizer
from helox.errors import HeloxError
from helox.fileio import fsync_path, sha256_file
from helox.model.llama import Llama

CHECKSUMS = "checksums.json"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
BEST = "best.json"
_PREFIX = "step-"
# The key torch.optim itself uses for names in a param group (optimizers built from
# named_parameters() carry it natively); we add it when the optimizer was built without names.
_PARAM_NAMES = "param_names"
_OPTIMIZER_CLASS = "optimizer_class"  # ignored by Optimizer.load_state_dict


@dataclass
class Restored:
    path: Path
    step: int
    state: dict


@dataclass
class Snapshot:
    """Host copy of everything checkpoint `step` holds, independent of the live objects."""

    step: int
    weights: dict[str, torch.Tensor]
    weights_metadata: dict[str, str]
    ema_weights: dict[str, torch.Tensor] | None
    ema_metadata: dict[str, str] | None
    optimizer: dict
    state: dict
    config: RunConfig
    run_info: dict
    extra_files: dict[str, Path]
    val_loss: float | None
    copy_s: float
    """Seconds the training thread spent taking the copy."""


@dataclass
class PartialRestore:
    """What a partial restore did, by parameter (or tensor) name."""

    loaded: list[str] = field(default_factory=list)
    fresh: dict[str, str] = field(default_factory=dict)
    """Names that kept their fresh value, with the reason (new, or a changed shape)."""
    dropped: list[str] = field(default_factory=list)
    """Names in the checkpoint that the model no longer has."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# Snapshot: the consistent host copy, taken on the training thread


def snapshot(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
             config: RunConfig, run_info: dict, extra_files: dict[str, Path] | None = None,
             ema: nn.Module | None = None, val_loss: float | None = None) -> Snapshot:
    """Copy the checkpoint's contents to host memory; once this returns, training may change
    the model, optimizer, EMA and `state` without tearing the checkpoint.

    `extra_files` are only named here, not read: they are inputs the run never rewrites (the
    dataset's tokenizer). `val_loss` is this step's validation loss, if it was evaluated: it
    decides whether the checkpoint becomes the best one."""
    started = time.perf_counter()
    weights, metadata = host_weights(model, {"step": str(step),
                                             "fingerprint": run_info["fingerprint"]})
    ema_weights, ema_metadata = (host_weights(ema, {"step": str(step)}) if ema is not None
                                 else (None, None))
    return Snapshot(
        step=step, weights=weights, weights_metadata=metadata, ema_weights=ema_weights,
        ema_metadata=ema_metadata,
        optimizer=host_optimizer_state(optimizer, model),
        state=_host_copy({"step": step, **state}), config=config.model_copy(deep=True),
        run_info=copy.deepcopy(run_info), extra_files=dict(extra_files or {}),
        val_loss=val_loss, copy_s=time.perf_counter() - started)


def host_weights(module: nn.Module, metadata: dict[str, str],
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata that safetensors' `save_model` would write, cloned to host
    memory: a tied tensor once, under the name save_model keeps, with each dropped name in
    the metadata pointing at it (so `load_model` reads the file as before)."""
    live = module.state_dict()
    metadata = dict(metadata)
    for kept, dropped in _remove_duplicate_names(live).items():
        for name in dropped:
            metadata.setdefault(name, kept)
            del live[name]
    return {name: _host_tensor(tensor) for name, tensor in live.items()}, metadata


def host_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """optimizer.state_dict() copied to host memory, each param group with the names of its
    parameters, so that a run with a different parameter set can match them
    (`load_optimizer_partial`)."""
    saved = _host_copy(optimizer.state_dict())
    for group, names in zip(saved["param_groups"], param_names(optimizer, model)):
        group.setdefault(_PARAM_NAMES, names)
    saved[_OPTIMIZER_CLASS] = type(optimizer).__name__
    return saved


def param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """For each param group, the model's names of its parameters, in order."""
    by_id = {id(param): name for name, param in model.named_parameters()}
    names = []
    for index, group in enumerate(optimizer.param_groups):
        missing = sum(id(p) not in by_id for p in group["params"])
        if missing:
            raise HeloxError(f"optimizer param group {index} holds {missing} parameters that "
                             f"are not the model's",
                             hint="build the optimizer from the model that is checkpointed")
        names.append([by_id[id(p)] for p in group["params"]])
    return names


def _host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def _host_copy(value: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (torch.save keeps a device otherwise)."""
    if isinstance(value, torch.Tensor):
        return _host_tensor(value)
    if type(value) is dict:
        return {key: _host_copy(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_host_copy(item) for item in value)
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# Writing: the atomic protocol, then best and keep-last-K


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config: RunConfig, run_info: dict, keep_last: int,
                    extra_files: dict[str, Path] | None = None,
                    ema: nn.Module | None = None, val_loss: float | None = None,
                    keep_best: bool = True) -> Path:
    """Write checkpoint `step` atomically in this thread, then delete all but the newest
    `keep_last` (and, with `keep_best`, the best).

    `extra_files` are copied in (the tokenizer, so that a checkpoint stands on its own);
    `ema`, the averaged weights, goes to ema.safetensors."""
    snap = snapshot(step, model, optimizer, state, config, run_info, extra_files, ema, val_loss)
    return write_snapshot(run_dir, snap, keep_last, keep_best)


def write_snapshot(run_dir: Path, snap: Snapshot, keep_last: int, keep_best: bool = True,
                   crash_halfway: bool = False) -> Path:
    """Write `snap` as checkpoint folder step-<step> (temp folder, fsync, rename), record it
    in best.json if its val_loss is the lowest, then prune.

    `crash_halfway` is fault injection: SIGKILL the process once the weights are in the
    temporary folder and the optimizer state is not, as a preempted machine would."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{snap.step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_files(tmp, snap, crash_halfway)
    _seal(tmp)
    if final.exists():  # the same step saved again after a fall-back to an older checkpoint
        _forget_best_if(root, final.name)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    if keep_best:
        _record_if_best(root, final, snap.step, snap.val_loss)
    prune(root, keep_last, keep_best)
    return final


def _write_files(folder: Path, snap: Snapshot, crash_halfway: bool) -> None:
    save_file(snap.weights, str(folder / MODEL_WEIGHTS), metadata=snap.weights_metadata)
    if snap.ema_weights is not None:
        save_file(snap.ema_weights, str(folder / EMA_WEIGHTS), metadata=snap.ema_metadata)
    if crash_halfway:
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(snap.optimizer, folder / OPTIMIZER)
    torch.save(snap.state, folder / "state.pt")
    save_config(snap.config, folder / "config.yaml")
    (folder / "run.json").write_text(json.dumps(snap.run_info, indent=1))
    for name, source in snap.extra_files.items():
        shutil.copyfile(source, folder / name)


def _seal(folder: Path) -> None:
    """checksums.json over every file, then fsync the files and the folder."""
    checksums = {p.name: sha256_file(p) for p in sorted(folder.iterdir())}
    (folder / CHECKSUMS).write_text(json.dumps(checksums, indent=1))
    for path in folder.iterdir():
        fsync_path(path)
    fsync_path(folder)


def _record_if_best(root: Path, final: Path, step: int, val_loss: float | None) -> None:
    """Name `final` in best.json when its validation loss is strictly the lowest so far."""
    if val_loss is None or not math.isfinite(val_loss):
        return
    best = _read_best(root)
    if best is not None and not val_loss < best["val_loss"]:
        return
    record = {"step": step, "val_loss": val_loss, "path": str(final.relative_to(root.parent))}
    _write_json_atomic(root / BEST, record)


def _read_best(root: Path) -> dict | None:
    """best.json if it is readable and its folder exists; otherwise None, so that a stale
    record (the folder was quarantined or deleted by hand) or a torn one is replaced by the
    next evaluated save instead of breaking it. Checksums are not verified here: that would
    read the whole best checkpoint at every save; `best_checkpoint` verifies."""
    try:
        record = json.loads((root / BEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("path"), str)
            and isinstance(record.get("val_loss"), (int, float))):
        return None
    return record if (root.parent / record["path"]).is_dir() else None


def _forget_best_if(root: Path, name: str) -> None:
    """Drop best.json when the folder it names is about to be replaced: its val_loss vouched
    for weights that will be gone."""
    best = _read_best(root)
    if best is not None and Path(best["path"]).name == name:
        (root / BEST).unlink()


def _write_json_atomic(path: Path, record: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest validation loss (checkpoints/best.json), or None when
    there is none or it no longer exists or fails its checksums."""
    best = _read_best(checkpoint_root(run_dir))
    if best is None:
        return None
    path = Path(run_dir) / best["path"]
    return path if verify_checkpoint(path) is None else None


def prune(root: Path, keep_last: int, keep_best: bool = False) -> None:
    """Delete all but the newest `keep_last` checkpoints and, with `keep_best`, the best."""
    best = _read_best(root) if keep_best else None
    protected = Path(best["path"]).name if best else None
    for path in list_checkpoints(root.parent)[keep_last:]:
        if path.name != protected:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The writer: in the calling thread, or one background save at a time


class CheckpointWriter:
    """Writes snapshots with `write_snapshot`: in the calling thread, or with `async_save` in
    one background thread. A save first waits for the one in flight, so at most one is being
    written (and at most two snapshots are held); an error of a background save is raised on
    the training thread by the next `save`, `wait` or `close`.

    Timings for the metrics: `last_stall_s`, what the last `save` cost the training thread
    (snapshot copy + waiting for the previous save + a sync write); `last_write_s`, how long
    the last finished write took, `last_written` its folder."""

    def __init__(self, run_dir: Path, keep_last: int, keep_best: bool = True,
                 async_save: bool = True):
        self.run_dir, self.keep_last, self.keep_best = Path(run_dir), keep_last, keep_best
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="helox-checkpoint")
                      if async_save else None)
        self._in_flight: Future[Path] | None = None
        self.last_stall_s = 0.0
        self.last_write_s: float | None = None
        self.last_written: Path | None = None

    @classmethod
    def from_config(cls, run_dir: Path, cfg: CheckpointConfig) -> CheckpointWriter:
        return cls(run_dir, cfg.keep_last, cfg.keep_best, cfg.async_save)

    def save(self, snap: Snapshot, crash_halfway: bool = False) -> Path:
        """Write `snap` (returns once it is handed to the background thread when async);
        returns the folder it is (or will be) in. `crash_halfway`: see `write_snapshot`."""
        started = time.perf_counter()
        self.wait()
        if self._pool is None:
            final = self._write(snap, crash_halfway)
        else:
            final = checkpoint_root(self.run_dir) / f"{_PREFIX}{snap.step:08d}"
            self._in_flight = self._pool.submit(self._write, snap, crash_halfway)
        self.last_stall_s = snap.copy_s + time.perf_counter() - started
        return final

    def wait(self) -> None:
        """Block until the save in flight is on disk; raise its error here if it failed."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self) -> None:
        """Finish the save in flight (raising its error) and stop the thread; idempotent.
        A save after `close` is written in the calling thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _write(self, snap: Snapshot, crash_halfway: bool) -> Path:
        started = time.perf_counter()
        final = write_snapshot(self.run_dir, snap, self.keep_last, self.keep_best, crash_halfway)
        self.last_write_s, self.last_written = time.perf_counter() - started, final
        return final


# ---------------------------------------------------------------------------------------------
# Finding and verifying checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, newest first (temporary folders are not listed)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches its checksum, otherwise what is wrong."""
    sums_path = path / CHECKSUMS
    if not sums_path.is_file():
        return "no checksums.json (the save did not finish)"
    try:
        checksums = json.loads(sums_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "checksums.json is unreadable"
    for name, expected in checksums.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if sha256_file(file) != expected:
            return f"{name} does not match its checksum"
    return None


def step_of(path: Path) -> int:
    """The step of a checkpoint folder (`step-00000120` → 120)."""
    return int(path.name.removeprefix(_PREFIX))


def load_newest_valid(run_dir: Path, warn: Callable[[str], None],
                      quarantine: bool = False, before_step: int | None = None,
                      ) -> Restored | None:
    """Newest checkpoint whose checksums hold (the best one only if it is also the newest),
    or with `before_step` the newest valid one of an earlier step (a rollback's target);
    each invalid one is reported through `warn`.

    With `quarantine` (the trainer, which owns the folder) an invalid one is renamed
    `corrupt-step-…`: kept for inspection, never counted by keep-last-K (which could otherwise
    delete a good checkpoint and keep a bad one)."""
    for path in list_checkpoints(run_dir):
        if before_step is not None and step_of(path) >= before_step:
            continue
        problem = verify_checkpoint(path)
        if problem:
            if quarantine:
                quarantined = path.with_name(f"corrupt-{path.name}")
                shutil.rmtree(quarantined, ignore_errors=True)
                os.rename(path, quarantined)
                problem += f"; moved to {quarantined}"
            warn(f"skipping checkpoint {path.name}: {problem}")
            continue
        state = torch.load(path / "state.pt", weights_only=True)
        return Restored(path=path, step=int(state["step"]), state=state)
    return None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoint folders (and best.json temporaries) left by a crash."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def resolve_checkpoint(path: Path, warn: Callable[[str], None]) -> Path:
    """A checkpoint folder as given, or a run folder's newest valid checkpoint."""
    path = Path(path)
    if (path / MODEL_WEIGHTS).is_file():
        return path
    if not path.is_dir():
        raise HeloxError(f"{path} does not exist",
                         hint="pass a run folder (e.g. workspace/runs/quickstart) or one of its "
                              "checkpoint folders (RUN_DIR/checkpoints/step-…)")
    return newest_valid_checkpoint(path, warn)


def newest_valid_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> Path:
    restored = load_newest_valid(run_dir, warn)
    if restored is None:
        raise HeloxError(f"{run_dir}: no valid checkpoint found",
                         hint="train first with `helox train RECIPE --run-dir DIR`")
    return restored.path


# ---------------------------------------------------------------------------------------------
# Loading: exact (resume) and partial (warm start from a different parameter set)


def load_weights(path: Path, model: nn.Module, ema: bool = False) -> None:
    """The checkpoint's weights, or with `ema` its moving average, into `model`."""
    load_model(model, str(_weights_file(path, ema)), strict=True)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state of the same run (resume): parameters are matched by position.
    Names we added to the saved groups are not copied into an optimizer that has none."""
    saved = torch.load(path / OPTIMIZER, weights_only=True)
    saved.pop(_OPTIMIZER_CLASS, None)
    if not any(_PARAM_NAMES in group for group in optimizer.param_groups):
        for group in saved["param_groups"]:
            group.pop(_PARAM_NAMES, None)
    optimizer.load_state_dict(saved)


def load_weights_partial(path: Path, model: nn.Module, ema: bool = False) -> PartialRestore:
    """Copy each tensor of the checkpoint whose name and shape match into `model`; the rest
    of the model keeps its values (a warm start, a grown model)."""
    file = _weights_file(path, ema)
    saved = load_file(str(file))
    aliases = _tied_aliases(file, saved)
    report = PartialRestore()
    used = set()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            source = name if name in saved else aliases.get(name)
            if source is None:
                report.fresh[name] = "not in the checkpoint"
                continue
            used.add(source)
            if saved[source].shape != tensor.shape:
                report.fresh[name] = _shape_change(saved[source].shape, tensor.shape)
            else:
                tensor.copy_(saved[source])
                report.loaded.append(name)
    report.dropped = sorted(set(saved) - used)
    return report


def load_optimizer_partial(path: Path, optimizer: torch.optim.Optimizer,
                           model: nn.Module) -> PartialRestore:
    """Each parameter's optimizer state from the checkpoint where its name exists there and
    its shape is unchanged; the others keep fresh state (their step counts from 0). Group
    hyperparameters stay those of `optimizer` (the new run's config)."""
    saved = torch.load(path / OPTIMIZER, weights_only=True)
    names = param_names(optimizer, model)
    if not saved.get("param_groups"):  # an imported model: weights without optimizer state
        return PartialRestore(fresh={name: "the checkpoint has no optimizer state"
                                     for group_names in names for name in group_names})
    saved_index = _saved_param_index(path, saved, optimizer)
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


def _saved_param_index(path: Path, saved: dict, optimizer: torch.optim.Optimizer,
                       ) -> dict[str, int]:
    """Parameter name → its index in the saved optimizer state, after checking that the
    state can be matched by name and was written by the same kind of optimizer."""
    groups = saved["param_groups"]
    if not all(_PARAM_NAMES in group for group in groups):
        raise HeloxError(f"{path / OPTIMIZER} does not name its parameters (it was saved "
                         f"before names were recorded), so it cannot be matched to a "
                         f"different model",
                         hint="resume the same model (exact load), or start the optimizer "
                              "fresh and load only the weights")
    if saved.get(_OPTIMIZER_CLASS) != type(optimizer).__name__:
        raise HeloxError(f"{path / OPTIMIZER} holds {saved.get(_OPTIMIZER_CLASS)} state, "
                         f"which does not fit {type(optimizer).__name__}",
                         hint="use the optimizer the checkpoint was trained with "
                              "(optim.optimizer), or start the optimizer fresh")
    return {name: index for group in groups
            for name, index in zip(group[_PARAM_NAMES], group["params"])}


def _saved_shapes(path: Path) -> dict[str, list[int]]:
    """Parameter shapes from the checkpoint's weights header (a tied name through its
    alias): the optimizer state alone does not hold them (Adafactor keeps factored rows)."""
    file = path / MODEL_WEIGHTS
    with safe_open(str(file), framework="pt") as f:
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


def _weights_file(path: Path, ema: bool) -> Path:
    file = path / (EMA_WEIGHTS if ema else MODEL_WEIGHTS)
    if not file.is_file():
        hint = ("train with train.ema_decay set to keep EMA weights" if ema else
                "pass a checkpoint folder (RUN_DIR/checkpoints/step-…), not a run folder")
        raise HeloxError(f"{path} has no {file.name}", hint=hint)
    return file


def load_trained_model(path: Path, ema: bool = False) -> tuple[Llama, Tokenizer, RunConfig]:
    """Rebuild the model of a checkpoint folder with its weights (or their EMA), tokenizer
    and config (CPU)."""
    config = read_saved_config(path / "config.yaml")
    model = Llama(config.model)
    load_weights(path, model, ema)
    model.eval()
    return model, load_tokenizer(path / "tokenizer.json"), config
