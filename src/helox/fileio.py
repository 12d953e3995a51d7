"""Small file helpers shared by datasets and checkpoints: hashing and durable writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from helox.errors import HeloxError


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    return sha256_files([path], chunk_bytes)


def sha256_files(paths: list[Path], chunk_bytes: int = 1 << 20) -> str:
    """sha256 of the files' bytes one after another (a model's weight shards, say)."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON form (sorted keys, no spaces): config and run hashes."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_private(path: Path, data: bytes, what: str) -> Path:
    """Create `path` (and its folders) holding `data`, readable by its owner only (0600);
    an existing file is never overwritten, even by a writer racing this one (O_EXCL)."""
    path = Path(path).expanduser()
    if path.exists():
        raise HeloxError(f"{path} exists",
                         hint=f"choose another path; a {what} is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder after a rename inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
