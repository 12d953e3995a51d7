"""Writing checkpoints: a host snapshot of the registered parts, written atomically and
checksummed (in a background thread with checkpoint.async_save), then keep-last-K plus the
best.

One checkpoint, RUN_DIR/checkpoints/step-<8 digits>/:
  model.safetensors   weights (tied tensors stored once), metadata: step and run fingerprint
  ema.safetensors     their exponential moving average (with train.ema_decay)
  optimizer.pt        optimizer state; each param group also lists its parameters' names
  state.pt            every other registered part's state_dict, by its name
  format.json         the format version, the step, and the file of each part
  config.yaml         the resolved config the run was trained with
  run.json            the run fingerprint and resume key
  tokenizer.json      the tokenizer, so the checkpoint stands on its own
  checksums.json      sha256 of every other file; written last
A module part named N goes to N.safetensors, an optimizer part to N.pt, anything else with
`state_dict` into state.pt.

A multi-process job (`JobCheckpointWriter`) writes the modules and optimizers through DCP into
dcp/ (each rank its shards) and each rank's own parts into rank-NNNNN.pt instead (format 3).

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
from typing import Any, Mapping

import torch
import torch.distributed as dist
from safetensors.torch import _remove_duplicate_names, save_file
from torch import nn

from helox.checkpoint.config import CheckpointConfig
from helox.checkpoint.format import format_record, write_format
from helox.checkpoint.sharded import (RANK_FILES, SHARDED, rank_file, save_dcp, save_dcp_async,
                                      sharded_state)
from helox.checkpoint.layout import (BEST_FILE, CHECKSUMS_FILE, CONFIG_FILE, RUN_INFO_FILE,
                                     STATE_FILE, TEMP_PREFIX, checkpoint_dir, list_checkpoints,
                                     write_config)
from helox.errors import HeloxError
from helox.fileio import fsync_path, sha256_file

PARAM_NAMES = "param_names"
"""The key torch.optim itself uses for names in a param group (optimizers built from
named_parameters() carry it natively); we add it when the optimizer was built without names."""
OPTIMIZER_CLASS = "optimizer_class"  # ignored by Optimizer.load_state_dict


@dataclass
class Snapshot:
    """Host copy of everything checkpoint `step` holds, independent of the live objects."""

    step: int
    weights: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]
    """Module parts: name → (tensors, safetensors metadata)."""
    optimizers: dict[str, dict]
    """Optimizer parts: name → state_dict with parameter names."""
    state: dict[str, Any]
    """Every other part: name → its state_dict."""
    config: dict
    """The run's resolved config, in its JSON form."""
    run_info: dict
    extra_files: dict[str, Path]
    val_loss: float | None
    copy_s: float
    """Seconds the training thread spent taking the copy."""

    world_size: int = 1
    """Processes of the job that saved it."""
    sharded: dict[str, str] = field(default_factory=dict)
    """Parts another writer keeps (a distributed save: dcp/ and the rank files) → their file."""

    def files(self) -> dict[str, str]:
        """Part name → the file that holds it (format.json's `parts`)."""
        return {**{name: f"{name}.safetensors" for name in self.weights},
                **{name: f"{name}.pt" for name in self.optimizers},
                **{name: STATE_FILE for name in self.state}, **self.sharded}


# ---------------------------------------------------------------------------------------------
# Snapshot: the consistent host copy, taken on the training thread


def snapshot(step: int, parts: Mapping[str, Any], config: dict, run_info: dict,
             extra_files: dict[str, Path] | None = None,
             val_loss: float | None = None) -> Snapshot:
    """Copy every part to host memory; once this returns, training may change them without
    tearing the checkpoint. `parts` is the trainer's registry: modules, optimizers (whose
    parameters are named after the part "model"), and anything with `state_dict`.

    `extra_files` are only named here, not read: they are inputs the run never rewrites (the
    dataset's tokenizer). `val_loss` is this step's validation loss, if it was evaluated: it
    decides whether the checkpoint becomes the best one."""
    started = time.perf_counter()
    metadata = {"step": str(step), "fingerprint": run_info.get("fingerprint", "")}
    weights, optimizers, state = {}, {}, {}
    for name, part in parts.items():
        if isinstance(part, nn.Module):
            weights[name] = host_weights(part, metadata)
        elif isinstance(part, torch.optim.Optimizer):
            optimizers[name] = host_optimizer_state(part, parts["model"])
        else:
            state[name] = host_copy(part.state_dict())
    return Snapshot(step=step, weights=weights, optimizers=optimizers, state=state,
                    config=copy.deepcopy(config), run_info=copy.deepcopy(run_info),
                    extra_files=dict(extra_files or {}), val_loss=val_loss,
                    copy_s=time.perf_counter() - started)


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
    saved = host_copy(optimizer.state_dict())
    for group, names in zip(saved["param_groups"], param_names(optimizer, model)):
        group.setdefault(PARAM_NAMES, names)
    saved[OPTIMIZER_CLASS] = type(optimizer).__name__
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


def host_copy(value: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (torch.save keeps a device otherwise)."""
    if isinstance(value, torch.Tensor):
        return _host_tensor(value)
    if type(value) is dict:
        return {key: host_copy(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(host_copy(item) for item in value)
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# Writing: the atomic protocol, then best and keep-last-K


def save_checkpoint(run_dir: Path, step: int, parts: Mapping[str, Any], config: dict,
                    run_info: dict, keep_last: int, extra_files: dict[str, Path] | None = None,
                    val_loss: float | None = None, keep_best: bool = True) -> Path:
    """Write checkpoint `step` of `parts` atomically in this thread, then delete all but the
    newest `keep_last` (and, with `keep_best`, the best)."""
    snap = snapshot(step, parts, config, run_info, extra_files, val_loss)
    return write_snapshot(run_dir, snap, keep_last, keep_best)


def write_snapshot(run_dir: Path, snap: Snapshot, keep_last: int, keep_best: bool = True,
                   crash_halfway: bool = False) -> Path:
    """Write `snap` as checkpoint folder step-<step> (temp folder, fsync, rename), record it
    in best.json if its val_loss is the lowest, then prune.

    `crash_halfway` is fault injection: SIGKILL the process once the weights are in the
    temporary folder and the optimizer state is not, as a preempted machine would."""
    final = checkpoint_dir(run_dir, snap.step)
    tmp = _temp_folder(final, str(os.getpid()))
    _write_files(tmp, snap, crash_halfway)
    _publish(tmp, final, snap, keep_last, keep_best)
    return final


def write_folder(final: Path, snap: Snapshot) -> Path:
    """Write `snap` as the checkpoint folder `final` (anywhere, no run folder around it):
    temporary folder, checksums, fsync, rename. Refuses to replace an existing folder."""
    if final.exists():
        raise HeloxError(f"{final} exists", hint="pass another --out, or delete it first")
    tmp = _temp_folder(final, str(os.getpid()))
    _write_files(tmp, snap, crash_halfway=False)
    _seal(tmp)
    os.rename(tmp, final)
    fsync_path(final.parent)
    return final


def _temp_folder(final: Path, suffix: str) -> Path:
    """An empty temporary folder beside `final` (a leftover of a crash is replaced)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TEMP_PREFIX}{final.name}-{suffix}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path, snap: Snapshot, keep_last: int, keep_best: bool) -> None:
    """Seal the written temporary folder, rename it into place, then best.json and pruning."""
    root = final.parent
    _seal(tmp)
    if final.exists():  # the same step saved again after a fall-back to an older checkpoint
        _forget_best_if(root, final.name)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    if keep_best:
        _record_if_best(root, final, snap.step, snap.val_loss)
    prune(root, keep_last, keep_best)


def _write_files(folder: Path, snap: Snapshot, crash_halfway: bool) -> None:
    files = snap.files()
    for name, (tensors, metadata) in snap.weights.items():
        save_file(tensors, str(folder / files[name]), metadata=metadata)
    if crash_halfway:
        os.kill(os.getpid(), signal.SIGKILL)
    for name, state in snap.optimizers.items():
        torch.save(state, folder / files[name])
    if snap.state:
        torch.save(snap.state, folder / STATE_FILE)
    write_format(folder, format_record(snap.step, files, snap.world_size))
    write_config(folder / CONFIG_FILE, snap.config)
    (folder / RUN_INFO_FILE).write_text(json.dumps(snap.run_info, indent=1))
    for name, source in snap.extra_files.items():
        shutil.copyfile(source, folder / name)


def _seal(folder: Path) -> None:
    """checksums.json over every file (those in subfolders by their relative path), then
    fsync the files and the folders."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    checksums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=1))
    for path in [*folder.rglob("*"), folder]:
        fsync_path(path)


def _record_if_best(root: Path, final: Path, step: int, val_loss: float | None) -> None:
    """Name `final` in best.json when its validation loss is strictly the lowest so far."""
    if val_loss is None or not math.isfinite(val_loss):
        return
    best = read_best(root)
    if best is not None and not val_loss < best["val_loss"]:
        return
    record = {"step": step, "val_loss": val_loss, "path": str(final.relative_to(root.parent))}
    _write_json_atomic(root / BEST_FILE, record)


def read_best(root: Path) -> dict | None:
    """best.json if it is readable and its folder exists; otherwise None, so that a stale
    record (the folder was quarantined or deleted by hand) or a torn one is replaced by the
    next evaluated save instead of breaking it. Checksums are not verified here: that would
    read the whole best checkpoint at every save; `best_checkpoint` verifies."""
    try:
        record = json.loads((root / BEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("path"), str)
            and isinstance(record.get("val_loss"), (int, float))):
        return None
    return record if (root.parent / record["path"]).is_dir() else None


def _forget_best_if(root: Path, name: str) -> None:
    """Drop best.json when the folder it names is about to be replaced: its val_loss vouched
    for weights that will be gone."""
    best = read_best(root)
    if best is not None and Path(best["path"]).name == name:
        (root / BEST_FILE).unlink()


def _write_json_atomic(path: Path, record: dict) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def prune(root: Path, keep_last: int, keep_best: bool = False) -> None:
    """Delete all but the newest `keep_last` checkpoints and, with `keep_best`, the best."""
    best = read_best(root) if keep_best else None
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
            final = checkpoint_dir(self.run_dir, snap.step)
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
# A multi-process job's writer


class JobCheckpointWriter:
    """Checkpoints of a multi-process job; every rank holds one and calls `save` at the same
    steps with its own parts (format 3). The modules and optimizers go through DCP into dcp/
    (each rank its shards), the parts named `per_rank` into each rank's rank-NNNNN.pt, and
    rank 0 writes the rest (the parts every rank holds alike, the config, run.json, extra
    files), seals the folder with the checksums of every rank's files and renames it into
    place: the one-process protocol, ordered so that rank 0 seals only what every rank wrote.

    With `async_save`, `save` returns once everything is copied to host memory (DCP's
    `async_save` stages the shards) and the writing goes on in the background: DCP's thread on
    every rank, over a gloo group of its own (so its collectives never meet the training's),
    and rank 0's sealing thread after it. `wait` (every rank) returns once the checkpoint is in
    place; the next `save` waits first, so one save is in flight at a time."""

    def __init__(self, run_dir: Path, keep_last: int, keep_best: bool, async_save: bool,
                 rank: int, world_size: int):
        self.run_dir, self.keep_last, self.keep_best = Path(run_dir), keep_last, keep_best
        self.rank, self.world_size = rank, world_size
        self.group = dist.new_group(backend="gloo") if async_save else None
        """DCP's own group for background saves (every rank creates it, in the same order)."""
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="helox-checkpoint")
                      if async_save and rank == 0 else None)
        self._in_flight: Future | None = None
        self.last_stall_s = 0.0

    def save(self, step: int, parts: Mapping[str, Any], per_rank: set[str], config: dict,
             run_info: dict, extra_files: dict[str, Path] | None = None,
             val_loss: float | None = None) -> Path:
        """Checkpoint `step`; returns the folder it is (or will be) in."""
        started = time.perf_counter()
        self.wait()
        final = checkpoint_dir(self.run_dir, step)
        tmp = _temp_folder(final, "job") if self.rank == 0 else \
            final.with_name(f"{TEMP_PREFIX}{final.name}-job")
        dist.barrier()  # the folder every rank writes into exists
        # Before the shards: rank 0 seals once DCP finished, which needs every rank in it.
        own_file = tmp / rank_file(self.rank)
        torch.save({name: host_copy(parts[name].state_dict()) for name in per_rank}, own_file)
        fsync_path(own_file)
        sharded = sharded_state(parts)
        snap = None
        if self.rank == 0:
            shared = {name: part for name, part in parts.items()
                      if name not in per_rank and name not in sharded}
            snap = snapshot(step, shared, config, run_info, extra_files, val_loss)
            snap.world_size = self.world_size
            snap.sharded = {**{name: SHARDED for name in sharded},
                            **{name: RANK_FILES for name in per_rank}}
        if self.group is None:
            save_dcp(tmp, sharded)
            dist.barrier()
            if snap is not None:
                self._seal(tmp, final, snap)
            dist.barrier()  # no rank reads or writes checkpoints before this one is in place
        else:
            written = save_dcp_async(tmp, sharded, self.group)
            self._in_flight = (self._pool.submit(self._seal, tmp, final, snap, written)
                               if self._pool is not None else written)
        self.last_stall_s = time.perf_counter() - started
        return final

    def _seal(self, tmp: Path, final: Path, snap: Snapshot, written: Future | None = None,
              ) -> None:
        """Rank 0: once every rank's shards are written, the rest of the files, then the
        checksums, the rename, best.json and pruning."""
        if written is not None:
            written.result()
        _write_files(tmp, snap, crash_halfway=False)
        _publish(tmp, final, snap, self.keep_last, self.keep_best)

    def wait(self, barrier: bool = True) -> None:
        """Block until the save in flight is in place (raising its error here); with
        `barrier`, every rank returns together (all ranks must call it)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()
        if barrier and self.group is not None:
            dist.barrier()

    def close(self, failed: bool = False) -> None:
        """Finish the save in flight; after a failure without waiting for the other ranks,
        which may be gone."""
        try:
            self.wait(barrier=not failed)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
