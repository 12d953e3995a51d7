"""Publishing events: durable first, delivered in the background, never in the caller's way.

`publish` writes the event to the workspace's outbox and returns: its cost is one SQLite
commit, whatever Redis is doing. With `events.redis_url` set, one background thread per
publisher delivers what waits in the outbox, oldest first, under the drain lock (so the
stream keeps the outbox's order across processes). While Redis is down it retries with
exponential backoff (`retry_initial_s` doubling up to `retry_max_s`); events queue in the
outbox meanwhile and nothing is lost or sent twice (see `helox.events.streams`). `close`
gives delivery a last `close_timeout_s`; whatever is left waits in the outbox for the next
publisher of the workspace, or `helox events drain`.

    with open_publisher(config, workspace) as publisher:
        publisher.publish("model", "model-ready", model_event("model-ready", ...),
                          correlation_id=fingerprint)
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helox.errors import HeloxError
from helox.events.config import EventsConfig
from helox.events.outbox import Outbox, StoredEvent
from helox.events.schema import EVENTS_BY_STREAM, check_event, envelope_fields, utc_now
from helox.events.streams import RedisStreams

BATCH = 100
"""Outbox rows read per query while draining."""


@dataclass(frozen=True)
class DrainResult:
    """What one drain did."""

    delivered: int = 0
    """Events added to their stream."""
    duplicates: int = 0
    """Events Redis had already (a retry after a crash): marked delivered, nothing added."""
    pending: int = 0
    """Events still waiting for Redis afterwards."""
    error: str | None = None
    """Why delivery stopped early (Redis unreachable, an error reply), if it did."""
    busy: bool = False
    """Another drain held the lock (it delivers these events too)."""


@dataclass(frozen=True)
class OutboxStatus:
    path: Path
    total: int
    pending: int
    """Waiting for Redis."""
    delivered: int
    local: int
    """Published with no Redis configured: kept in the outbox only."""
    oldest_pending: StoredEvent | None
    """The event at the head of the queue, with its `attempts` and `last_error`."""


class Publisher:
    """Publishes to one workspace's outbox and, when configured, to Redis. Thread-safe."""

    def __init__(self, config: EventsConfig, workspace: Path,
                 warn: Callable[[str], None] | None = None):
        self.config = config
        self.outbox = Outbox(workspace).create()
        self._warn = warn or _warn
        self._redis = RedisStreams(config) if config.redis_url else None
        self._streams = {"training": config.training_stream, "model": config.model_stream}
        self._wake, self._closing = threading.Event(), threading.Event()
        self._close_deadline: float | None = None
        self._failing = False
        """Redis did not answer the last try (warned once per outage)."""
        self._thread: threading.Thread | None = None
        if self._redis is not None:  # starts by delivering what earlier publishers left
            self._thread = threading.Thread(target=self._deliver_until_closed,
                                            name="helox-events", daemon=True)
            self._wake.set()
            self._thread.start()

    def publish(self, stream: str, event: str, fields: Mapping[str, Any], correlation_id: str,
                idempotency_key: str | None = None) -> StoredEvent:
        """Store `event` on `stream` ("training" or "model", or its configured stream name)
        durably and queue it for Redis. `idempotency_key` defaults to a new UUID; a key
        published before returns that stored event and adds nothing (a caller's retry)."""
        kind = self._kind(stream)
        check_event(kind, event)
        if self._closing.is_set():
            raise HeloxError(f"{event}: the publisher is closed",
                             hint="publish before close(), or open a new publisher")
        key = idempotency_key or uuid.uuid4().hex
        entry = envelope_fields(event, self.config.source, correlation_id, key, fields)
        stored = self.outbox.append(self._streams[kind], event, correlation_id, key, entry,
                                    to_redis=self._redis is not None)
        self._wake.set()
        return stored

    def close(self, timeout_s: float | None = None) -> int:
        """Deliver what is queued for at most `timeout_s` (default events.close_timeout_s),
        stop the delivery thread and return how many events still wait in the outbox.
        Idempotent; a publisher without Redis returns 0 at once."""
        if self._redis is None or self._closing.is_set():
            self._closing.set()
            return self.outbox.counts()["pending"] if self._redis is not None else 0
        timeout_s = self.config.close_timeout_s if timeout_s is None else timeout_s
        self._close_deadline = time.monotonic() + timeout_s
        self._closing.set()
        self._wake.set()
        # One command in flight may take a connect and a socket timeout past the deadline.
        self._thread.join(timeout_s + self.config.connect_timeout_s
                          + self.config.socket_timeout_s + 1.0)
        if not self._thread.is_alive():
            self._redis.close()
        return self.outbox.counts()["pending"]

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _kind(self, stream: str) -> str:
        if stream in EVENTS_BY_STREAM:
            return stream
        for kind, name in self._streams.items():
            if stream == name:
                return kind
        raise HeloxError(f"unknown event stream {stream!r}",
                         hint=f"use 'training' or 'model' (streams {self._streams['training']!r}"
                              f" and {self._streams['model']!r})")

    # -- the delivery thread ----------------------------------------------------------------

    def _deliver_until_closed(self) -> None:
        """Drain whenever woken (a publish) while Redis answers; while it does not, retry
        after the backoff delay (publishing meanwhile only queues). On close, a last drain
        bounded by the close deadline."""
        delay_s = 0.0
        while True:
            if delay_s:
                self._closing.wait(delay_s)
            else:
                self._wake.wait()
            self._wake.clear()
            closing = self._closing.is_set()
            result = self._drain_once(self._close_deadline if closing else None)
            delay_s = self._next_delay(result, delay_s)
            if closing:
                return

    def _drain_once(self, deadline: float | None) -> DrainResult:
        try:
            return drain_pending(self.outbox, self._redis, deadline)
        except Exception as exc:  # the outbox itself (disk, locks): retried like Redis
            return DrainResult(error=f"{type(exc).__name__}: {exc}")

    def _next_delay(self, result: DrainResult, delay_s: float) -> float:
        """0 after a good drain; the backoff after a failed one; a short wait while another
        drain holds the lock (it delivers these events too, unless they came after it)."""
        if result.busy:
            return delay_s or self.config.retry_initial_s
        if result.error is None:
            if self._failing:
                self._failing = False
                self._warn(f"events: Redis at {self._redis.url} answers again; "
                           f"{result.delivered} queued event(s) delivered")
            return 0.0
        if not self._failing:
            self._failing = True
            self._warn(f"events: cannot deliver to Redis at {self._redis.url} ({result.error});"
                       f" events wait in {self.outbox.path} and are delivered when it answers "
                       f"(retrying, at most every {self.config.retry_max_s:g} s)")
        return min(max(2 * delay_s, self.config.retry_initial_s), self.config.retry_max_s)


def open_publisher(config: EventsConfig, workspace: Path,
                   warn: Callable[[str], None] | None = None) -> Publisher:
    """The publisher of `workspace` (its outbox created if new). With `config.redis_url` set
    it needs the redis package (a HeloxError says how to install it) but not a running
    server: events queue until Redis answers. `warn` reports Redis going away and coming
    back (default: a RuntimeWarning)."""
    return Publisher(config, Path(workspace), warn)


def drain_pending(outbox: Outbox, target: RedisStreams, deadline: float | None = None,
                  lock_wait_s: float = 0.0) -> DrainResult:
    """Deliver the outbox's waiting events in order, under the drain lock, until none is left,
    one fails (it stays at the head: order over progress) or `deadline` (monotonic) passes."""
    lock = outbox.drain_lock()
    if not lock.acquire(lock_wait_s):
        return DrainResult(pending=outbox.counts()["pending"], busy=True)
    delivered = duplicates = 0
    error = None
    try:
        while error is None and not _past(deadline):
            batch = outbox.pending(BATCH)
            if not batch:
                break
            for event in batch:
                if _past(deadline):
                    break
                try:
                    delivery = target.deliver(event)
                except target.errors as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    outbox.mark_failed(event.seq, error)
                    break
                outbox.mark_delivered(event.seq, delivery.stream_id, utc_now())
                delivered += delivery.added
                duplicates += not delivery.added
    finally:
        lock.release()
    return DrainResult(delivered, duplicates, outbox.counts()["pending"], error)


def drain(workspace: Path, config: EventsConfig, timeout_s: float = 10.0) -> DrainResult:
    """Deliver the workspace's waiting events to `config.redis_url` within `timeout_s`,
    waiting for a drain in progress elsewhere (the `helox events drain` command)."""
    if not config.redis_url:
        raise HeloxError("no Redis to drain to: events.redis_url is not set",
                         hint="set events.redis_url in WORKSPACE/platform.yaml or "
                              "HELOX_EVENTS_REDIS_URL (docs/events.md)")
    outbox, target = Outbox(workspace).create(), RedisStreams(config)
    try:
        return drain_pending(outbox, target, time.monotonic() + timeout_s, lock_wait_s=timeout_s)
    finally:
        target.close()


def outbox_status(workspace: Path) -> OutboxStatus:
    """Counts of the workspace's outbox and the event at the head of its queue (the
    `helox events status` command); an outbox never written reads as empty."""
    outbox = Outbox(workspace)
    if not outbox.path.is_file():
        return OutboxStatus(outbox.path, 0, 0, 0, 0, None)
    counts = outbox.counts()
    head = outbox.pending(1)
    return OutboxStatus(outbox.path, counts["total"], counts["pending"], counts["delivered"],
                        counts["local"], head[0] if head else None)


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=2)
