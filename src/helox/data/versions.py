"""Dataset versions in a workspace: history per dataset name, lookup, verify and quarantine.

    <workspace>/datasets/<version>/          an immutable, content-addressed dataset version
    <workspace>/datasets/.heads/<name>       the newest version built under a dataset name
    <workspace>/datasets/.quarantine/<version>/   shards that failed verification, moved aside

A version's parent is the head of its name when it was built, so `helox data log` reads like a
commit log and a broken version can be rolled back to its parent.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from helox.data.shards import DatasetVersion
from helox.errors import HeloxError
from helox.fileio import fsync_path

QUARANTINE_FILE = "QUARANTINED.json"


def datasets_root(workspace: Path) -> Path:
    return Path(workspace) / "datasets"


def head(root: Path, name: str) -> str | None:
    pointer = root / ".heads" / name
    return pointer.read_text().strip() if pointer.is_file() else None


def set_head(root: Path, name: str, version: str) -> None:
    heads = root / ".heads"
    heads.mkdir(parents=True, exist_ok=True)
    tmp = heads / f".{name}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, heads / name)


def all_versions(root: Path) -> list[DatasetVersion]:
    """Every version in the workspace, newest first."""
    if not root.is_dir():
        return []
    found = [DatasetVersion(p) for p in root.iterdir()
             if not p.name.startswith(".") and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda d: d.lineage.get("created_at", ""), reverse=True)


def run_dataset_candidates(run_dir: Path | None, run_info: dict) -> list[Path]:
    """Where the dataset version a run trained on may be (run.json's fields): where the run
    found it, then beside the run's workspace (WORKSPACE/runs/NAME -> WORKSPACE/datasets/V)."""
    candidates = [Path(run_info["dataset_path"])] if run_info.get("dataset_path") else []
    version = run_info.get("dataset_version")
    if version and run_dir is not None and len(Path(run_dir).resolve().parents) > 1:
        candidates.append(datasets_root(Path(run_dir).resolve().parents[1]) / version)
    return candidates


def run_dataset(run_dir: Path | None, run_info: dict) -> DatasetVersion | None:
    """The dataset version a run trained on, if it is still in the workspace (its id must be
    run.json's `dataset_version`), else None."""
    for candidate in run_dataset_candidates(run_dir, run_info):
        if (candidate / "manifest.json").is_file():
            found = DatasetVersion(candidate)
            if found.version == run_info.get("dataset_version"):
                return found
    return None


def resolve(root: Path, version: str) -> DatasetVersion:
    """Find a version by its id or a unique prefix of it."""
    matches = [p for p in root.glob(f"{version}*") if (p / "manifest.json").is_file()] \
        if root.is_dir() and version else []
    if len(matches) == 1:
        return DatasetVersion(matches[0])
    known = ", ".join(d.version for d in all_versions(root)[:8]) or "none"
    if not matches:
        raise HeloxError(f"no dataset version '{version}' in {root}",
                         hint=f"list them with `helox data log` (known: {known})")
    raise HeloxError(f"'{version}' matches {len(matches)} dataset versions",
                     hint="give more characters of the version id")


@dataclass(frozen=True)
class QuarantineReport:
    version: str
    bad_files: list[str]
    moved_to: Path
    parent: str | None


def quarantine(root: Path, dataset: DatasetVersion, bad_files: list[str]) -> QuarantineReport:
    """Move the failing files aside and mark the version unusable until it is rebuilt."""
    target = root / ".quarantine" / dataset.version
    target.mkdir(parents=True, exist_ok=True)
    for name in bad_files:
        path = dataset.path / name
        if path.exists():
            shutil.move(path, target / name)
    parents = dataset.lineage.get("parents") or []
    record = {"bad_files": bad_files, "moved_to": str(target),
              "quarantined_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "parent": parents[0] if parents else None}
    marker = dataset.path / QUARANTINE_FILE
    marker.write_text(json.dumps(record, indent=1))
    fsync_path(marker)
    return QuarantineReport(dataset.version, bad_files, target, record["parent"])


def quarantine_record(dataset_path: Path) -> dict | None:
    marker = Path(dataset_path) / QUARANTINE_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def rollback_hint(record: dict) -> str:
    parent = record.get("parent")
    rebuild = "or rebuild it from its sources with `helox data prepare RECIPE`"
    if parent:
        return f"roll back to the parent version with `--set data.version={parent}`, {rebuild}"
    return "it has no parent version; rebuild it with `helox data prepare RECIPE`"


def open_usable(root: Path, version: str) -> DatasetVersion:
    """Resolve a version for reading; a quarantined one is refused with the way back."""
    dataset = resolve(root, version)
    record = quarantine_record(dataset.path)
    if record is not None:
        raise HeloxError(f"dataset version {dataset.version} is quarantined: "
                         f"{', '.join(record['bad_files'])} failed verification",
                         hint=rollback_hint(record))
    return dataset


def retire_quarantined(root: Path, version: str) -> None:
    """Before a rebuild republishes a quarantined version, move the broken folder aside."""
    path = root / version
    if quarantine_record(path) is None:
        return
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = root / ".quarantine" / version / f"retired-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, target)
