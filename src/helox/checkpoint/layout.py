"""Where things are: a run folder, its checkpoints and the files of one checkpoint.

    RUN_DIR/config.yaml, run.json           the run's resolved config and fingerprint
    RUN_DIR/checkpoints/step-<8 digits>/    one checkpoint (see helox.checkpoint.writer)
    RUN_DIR/checkpoints/best.json           names the checkpoint with the lowest val loss
    RUN_DIR/checkpoints/corrupt-step-…      a checkpoint that failed verification, kept aside
    RUN_DIR/checkpoints/.tmp-…              a save in progress (or left by a crash)

Every name and every parse of a name is here, so no other module spells `step-` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from helox.errors import HeloxError

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
CORRUPT_PREFIX = "corrupt-"
TEMP_PREFIX = ".tmp-"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKSUMS_FILE = "checksums.json"
FORMAT_FILE = "format.json"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.pt"
BEST_FILE = "best.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / step_name(step)


def step_name(step: int) -> str:
    """`120` → `step-00000120` (sorts by step as text)."""
    return f"{STEP_PREFIX}{step:08d}"


def step_of(path: Path | str) -> int:
    """The step of a checkpoint folder (`…/step-00000120` → 120)."""
    name = Path(path).name
    digits = name.removeprefix(STEP_PREFIX)
    if not name.startswith(STEP_PREFIX) or not digits.isdigit():
        raise ValueError(f"{name!r} is not a checkpoint folder name ({STEP_PREFIX}<digits>)")
    return int(digits)


def is_checkpoint_name(name: str) -> bool:
    return name.startswith(STEP_PREFIX) and name.removeprefix(STEP_PREFIX).isdigit()


def run_dir_of(path: Path) -> Path | None:
    """The run folder of a run folder or of one of its checkpoint folders; None for a folder
    that is neither (a checkpoint folder outside a run, an export, a Hugging Face model)."""
    path = Path(path)
    if (path / MODEL_WEIGHTS).is_file() or is_checkpoint_name(path.name):  # a checkpoint
        return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None
    if (path / CHECKPOINTS_DIR).is_dir() or (path / RUN_INFO_FILE).is_file():
        return path
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, newest first (temporary and quarantined ones are not)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_checkpoint_name(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def write_config(path: Path, raw: dict) -> None:
    """A resolved config (its JSON form) as YAML, keys in declaration order."""
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))


def read_config_raw(folder: Path) -> dict:
    """The config.yaml of a run or checkpoint folder, as written (not validated)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise HeloxError(f"{folder} is not a Helox run or checkpoint folder (no {CONFIG_FILE})",
                         hint="pass a run folder or one of its checkpoint folders; a Hugging "
                              "Face export is read by `helox eval`")
    return yaml.safe_load(path.read_text()) or {}


def read_run_info(folder: Path) -> dict:
    """run.json of a checkpoint folder, else of its run folder; {} where there is none."""
    folder = Path(folder)
    for candidate in (folder, run_dir_of(folder)):
        if candidate is not None and (candidate / RUN_INFO_FILE).is_file():
            return json.loads((candidate / RUN_INFO_FILE).read_text())
    return {}
