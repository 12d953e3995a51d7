"""Atomic, checksummed checkpoints with keep-last-K and fall-back to the newest valid one.

Layout: RUN_DIR/checkpoints/step-<8 digits>/
  model.safetensors   weights (tied tensors stored once), metadata: step and run fingerprint
  ema.safetensors     their exponential moving average (with train.ema_decay)
  optimizer.pt        optimizer state
  state.pt            step, every RNG state, loader state, counters
  config.yaml         the resolved config the run was trained with
  run.json            the run fingerprint and resume key
  tokenizer.json      the tokenizer, so the checkpoint stands on its own
  checksums.json      sha256 of every other file; written last
A checkpoint is written into a temporary folder, every file fsynced, then renamed into place, so
a crash (even `kill -9`) mid-save leaves either the old set of checkpoints or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer
from torch import nn

from helox.config import RunConfig, read_saved_config, save_config
from helox.data.tokenizer import load_tokenizer
from helox.errors import HeloxError
from helox.fileio import fsync_path, sha256_file
from helox.model.llama import Llama

CHECKSUMS = "checksums.json"
EMA_WEIGHTS = "ema.safetensors"
_PREFIX = "step-"


@dataclass
class Restored:
    path: Path
    step: int
    state: dict


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config: RunConfig, run_info: dict, keep_last: int,
                    extra_files: dict[str, Path] | None = None,
                    ema: nn.Module | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`.

    `extra_files` are copied in (the tokenizer, so that a checkpoint stands on its own);
    `ema`, the averaged weights, goes to ema.safetensors."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"),
               metadata={"step": str(step), "fingerprint": run_info["fingerprint"]})
    if ema is not None:
        save_model(ema, str(tmp / EMA_WEIGHTS), metadata={"step": str(step)})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, **state}, tmp / "state.pt")
    save_config(config, tmp / "config.yaml")
    (tmp / "run.json").write_text(json.dumps(run_info, indent=1))
    for name, source in (extra_files or {}).items():
        shutil.copyfile(source, tmp / name)
    checksums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS).write_text(json.dumps(checksums, indent=1))
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    if final.exists():  # the same step saved again after a fall-back to an older checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    prune(root, keep_last)
    return final


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


def load_newest_valid(run_dir: Path, warn: Callable[[str], None],
                      quarantine: bool = False) -> Restored | None:
    """Newest checkpoint whose checksums hold; each invalid one is reported through `warn`.

    With `quarantine` (the trainer, which owns the folder) an invalid one is renamed
    `corrupt-step-…`: kept for inspection, never counted by keep-last-K (which could otherwise
    delete a good checkpoint and keep a bad one)."""
    for path in list_checkpoints(run_dir):
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


def load_weights(path: Path, model: nn.Module, ema: bool = False) -> None:
    """The checkpoint's weights, or with `ema` its moving average, into `model`."""
    file = path / (EMA_WEIGHTS if ema else "model.safetensors")
    if not file.is_file():
        raise HeloxError(f"{path} has no {file.name}",
                         hint="train with train.ema_decay set to keep EMA weights")
    load_model(model, str(file), strict=True)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


def prune(root: Path, keep_last: int) -> None:
    for path in list_checkpoints(root.parent)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoint folders left by a crash."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)



def newest_valid_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> Path:
    restored = load_newest_valid(run_dir, warn)
    if restored is None:
        raise HeloxError(f"{run_dir}: no valid checkpoint found",
                         hint="train first with `helox train RECIPE --run-dir DIR`")
    return restored.path


def load_trained_model(path: Path, ema: bool = False) -> tuple[Llama, Tokenizer, RunConfig]:
    """Rebuild the model of a checkpoint folder with its weights (or their EMA), tokenizer
    and config (CPU)."""
    config = read_saved_config(path / "config.yaml")
    model = Llama(config.model)
    load_weights(path, model, ema)
    model.eval()
    return model, load_tokenizer(path / "tokenizer.json"), config
