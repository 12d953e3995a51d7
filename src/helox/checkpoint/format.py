"""The checkpoint format's version, written into every checkpoint (format.json), and the
explicit migrations that read older ones.

Format 3 (a multi-process job's checkpoint): as format 2, with parts kept elsewhere: the
modules and optimizers in dcp/ (torch.distributed.checkpoint, one file per rank, resharded on
load), each rank's own parts (RNGs, loader) in rank-NNNNN.pt; format.json records the world
size. A single-process run still writes format 2, which every Helox since the checkpoint layer
reads.

Format 2: format.json names the version, the step and the file of every saved
part; state.pt holds one entry per registered trainer part that is neither a module nor an
optimizer (counters, rng, loader, clip, detector, recovery, health, telemetry, scaler,
ema_updates), each under its registry name.

Format 1 (Helox before the checkpoint layer, up to commit 04ac74c): no format.json; state.pt
was one dict of the trainer's fields (`step`, `skipped_steps`, `stability.detector`, …). Its
weights, EMA weights and optimizer files are the same as format 2's; `migrate_state_v1`
renames its state into format 2's parts.
"""

from __future__ import annotations

import json
from pathlib import Path

from helox.checkpoint.layout import FORMAT_FILE, STATE_FILE
from helox.errors import HeloxError

FORMAT_VERSION = 3
SINGLE_PROCESS_VERSION = 2

V1_REQUIRED = ("step", "rng", "loader", "clip", "skipped_steps", "ema_updates", "stability",
               "scaler", "health", "telemetry")
"""What the last format-1 writer put in state.pt; a format-1 checkpoint without one of these
was written before that feature existed, and its trainer state is not migrated."""


def format_record(step: int, files: dict[str, str], world_size: int = 1) -> dict:
    """format.json: the version, the step, and which file holds each saved part (and the
    world size of a multi-process job, whose checkpoints are format 3)."""
    if world_size == 1:
        return {"format_version": SINGLE_PROCESS_VERSION, "step": step, "parts": files}
    return {"format_version": FORMAT_VERSION, "step": step, "parts": files,
            "world_size": world_size}


def write_format(folder: Path, record: dict) -> None:
    (Path(folder) / FORMAT_FILE).write_text(json.dumps(record, indent=1))


def read_format(folder: Path) -> dict:
    """format.json of a checkpoint, or the record a format-1 checkpoint implies; refuses a
    version this Helox cannot read, naming it."""
    path = Path(folder) / FORMAT_FILE
    if not path.is_file():
        return {"format_version": 1}
    try:
        record = json.loads(path.read_text())
        version = int(record["format_version"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise HeloxError(f"{path} is unreadable",
                         hint="the checkpoint is damaged: use another one of the run") from None
    if version > FORMAT_VERSION:
        raise HeloxError(f"{folder} is a format-{version} checkpoint; this Helox reads formats "
                         f"1 to {FORMAT_VERSION}",
                         hint="upgrade Helox (pip install -U helox) to read it")
    if version < 1:
        raise HeloxError(f"{folder}: unknown checkpoint format {version}",
                         hint="the checkpoint was not written by Helox")
    return record


def migrate_state(folder: Path, version: int, state: dict) -> dict:
    """state.pt of a checkpoint of `version`, as format 2 holds it."""
    return migrate_state_v1(folder, state) if version == 1 else state


def migrate_state_v1(folder: Path, state: dict) -> dict:
    """Format 1's trainer fields → format 2's parts (same values, registry names)."""
    missing = [key for key in V1_REQUIRED if key not in state]
    if missing:
        raise HeloxError(
            f"{folder / STATE_FILE} is a format-1 trainer state written before "
            f"{', '.join(missing)} existed, so it cannot be resumed exactly",
            hint="start a new run from its weights with train.init_from=<this checkpoint> "
                 "(weights and optimizer states are read), or resume it with the Helox that "
                 "wrote it")
    migrated = {"counters": {"step": int(state["step"]),
                             "skipped_steps": int(state["skipped_steps"])},
                "rng": state["rng"], "loader": state["loader"], "clip": state["clip"],
                "ema_updates": {"updates": int(state["ema_updates"])},
                "detector": state["stability"]["detector"],
                "recovery": state["stability"]["recovery"], "health": state["health"]}
    if state["scaler"]:  # format 1 wrote {} without fp16's loss scaler
        migrated["scaler"] = state["scaler"]
    if state["telemetry"] is not None:  # and None without telemetry
        migrated["telemetry"] = state["telemetry"]
    return migrated


def step_from(record: dict, state: dict) -> int:
    """The checkpoint's step: format.json's, else (format 1) the migrated counters'."""
    return int(record["step"]) if "step" in record else int(state["counters"]["step"])
