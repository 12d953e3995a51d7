"""The durable outbox: every event a workspace publishes, in order, in WORKSPACE/events/outbox.db.

SQLite in WAL mode with `synchronous=FULL`: once `append` returns, the event survives a killed
process or a power cut. Several processes may append at once (a training run and a `helox
registry` command); the row number (`seq`) is the one order of the workspace's events, and
the order Redis receives them in. An event published while a Redis was configured waits
(`to_redis`) until a drain delivers it and marks it; one published with none configured is
the local record only and is never sent later (the platform did not ask for it then).

Drains are serialized across processes by an flock on WORKSPACE/events/outbox.lock, so two
drains never interleave and the stream keeps the outbox's order. A connection is opened per
operation: callers on any thread (the trainer, the delivery thread) share nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helox.errors import HeloxError

OUTBOX_DIR = "events"
DB_FILE = "outbox.db"
LOCK_FILE = "outbox.lock"
INIT_LOCK_FILE = "outbox.init.lock"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
"""How long a write waits for another process's write to finish (SQLite's busy timeout)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL UNIQUE,
    stream TEXT NOT NULL,
    event TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    created_at TEXT NOT NULL,
    to_redis INTEGER NOT NULL,
    delivered_at TEXT,
    stream_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS events_pending ON events (seq)
    WHERE to_redis = 1 AND delivered_at IS NULL;
"""
PENDING = "to_redis = 1 AND delivered_at IS NULL"
COLUMNS = ("seq, idempotency_key, stream, event, correlation_id, entry, created_at, to_redis, "
           "delivered_at, stream_id, attempts, last_error")


@dataclass(frozen=True)
class StoredEvent:
    """One outbox row: the stream entry (`entry`, all strings) and its delivery state."""

    seq: int
    idempotency_key: str
    stream: str
    event: str
    correlation_id: str
    entry: dict[str, str]
    created_at: str
    to_redis: bool
    delivered_at: str | None = None
    stream_id: str | None = None
    """The Redis entry id (`1733390000000-0`) once delivered."""
    attempts: int = 0
    last_error: str | None = None


class Outbox:
    """The outbox of one workspace (created on first use)."""

    def __init__(self, workspace: Path):
        self.folder = Path(workspace) / OUTBOX_DIR
        self.path = self.folder / DB_FILE

    def create(self) -> Outbox:
        """The folder, the database in WAL mode and its table; refuses a newer format.
        Processes opening a new outbox at once take turns (an flock on outbox.init.lock):
        switching a new database to WAL fails at once, not after the busy timeout, when
        another connection is doing the same."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self._format() == SCHEMA_VERSION:
                return self
            with _flock(self.folder / INIT_LOCK_FILE):
                version = self._format()
                if version > SCHEMA_VERSION:
                    raise HeloxError(f"{self.path} has outbox format {version}; this Helox "
                                     f"reads format {SCHEMA_VERSION}",
                                     hint="upgrade Helox, or move the file away to start anew")
                with self._connect() as db:
                    db.execute("PRAGMA journal_mode=WAL")  # persistent: stays set in the file
                    db.executescript(SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
        except (sqlite3.Error, OSError) as exc:
            raise HeloxError(f"cannot open the event outbox {self.path}: {exc}",
                             hint="check that the workspace is writable (and not on NFS, "
                                  "where SQLite's locks are unreliable)") from exc
        return self

    def _format(self) -> int:
        """The file's format version (0: new or empty)."""
        with self._connect() as db:
            return db.execute("PRAGMA user_version").fetchone()[0]

    @contextmanager
    def _connect(self, synchronous: str = "FULL") -> Iterator[sqlite3.Connection]:
        """FULL: a commit is on disk when it returns. NORMAL (WAL): it survives a killed
        process but maybe not a power cut, enough for marking deliveries: a mark lost that
        way leaves the event pending, and its redelivery adds nothing (the dedup script)."""
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute(f"PRAGMA synchronous={synchronous}")
            yield db
        finally:
            db.close()

    def append(self, stream: str, event: str, correlation_id: str, idempotency_key: str,
               entry: dict[str, str], to_redis: bool) -> StoredEvent:
        """Store an event durably (committed and synced on return). A key already stored is
        a retry of that event: nothing is added and the stored event is returned."""
        with self._connect() as db:
            db.execute("INSERT INTO events (idempotency_key, stream, event, correlation_id, "
                       "entry, created_at, to_redis) VALUES (?, ?, ?, ?, ?, ?, ?) "
                       "ON CONFLICT (idempotency_key) DO NOTHING",
                       (idempotency_key, stream, event, correlation_id,
                        json.dumps(entry), entry["timestamp"], int(to_redis)))
            row = db.execute(f"SELECT {COLUMNS} FROM events WHERE idempotency_key = ?",
                             (idempotency_key,)).fetchone()
        return _stored(row)

    def pending(self, limit: int = 100) -> list[StoredEvent]:
        """The oldest events waiting for Redis, in order."""
        return self._select(f"WHERE {PENDING} ORDER BY seq LIMIT ?", (limit,))

    def events(self, after_seq: int = 0, limit: int | None = None) -> list[StoredEvent]:
        """Every stored event after `after_seq`, in order."""
        return self._select("WHERE seq > ? ORDER BY seq LIMIT ?",
                            (after_seq, -1 if limit is None else limit))

    def mark_delivered(self, seq: int, stream_id: str, at: str) -> None:
        with self._connect(synchronous="NORMAL") as db:
            db.execute("UPDATE events SET delivered_at = ?, stream_id = ?, "
                       "attempts = attempts + 1 WHERE seq = ?", (at, stream_id, seq))

    def mark_failed(self, seq: int, error: str) -> None:
        with self._connect(synchronous="NORMAL") as db:
            db.execute("UPDATE events SET attempts = attempts + 1, last_error = ? "
                       "WHERE seq = ?", (error, seq))

    def counts(self) -> dict[str, int]:
        """{"total", "pending" (waiting for Redis), "delivered", "local" (never sent)}."""
        with self._connect() as db:
            total, pending, delivered = db.execute(
                f"SELECT COUNT(*), COUNT(*) FILTER (WHERE {PENDING}), "
                "COUNT(delivered_at) FROM events").fetchone()
        return {"total": total, "pending": pending, "delivered": delivered,
                "local": total - pending - delivered}

    def _select(self, where: str, args: tuple) -> list[StoredEvent]:
        with self._connect() as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM events {where}", args).fetchall()
        return [_stored(row) for row in rows]

    def drain_lock(self) -> DrainLock:
        return DrainLock(self.folder / LOCK_FILE)


def _stored(row: tuple) -> StoredEvent:
    (seq, key, stream, event, correlation_id, entry, created_at, to_redis, delivered_at,
     stream_id, attempts, last_error) = row
    return StoredEvent(seq, key, stream, event, correlation_id, json.loads(entry), created_at,
                       bool(to_redis), delivered_at, stream_id, attempts, last_error)


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, waiting for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:  # unlock explicitly: a process forked meanwhile holds a copy of the descriptor
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class DrainLock:
    """The exclusive flock that serializes drains across processes (and across publishers of
    one process: each holds its own open file). Released by the kernel if its holder dies."""

    POLL_S = 0.02

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the lock, waiting up to `wait_s`; False when another drain holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(self.POLL_S)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
