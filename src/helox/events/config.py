"""Where events go: the outbox in the workspace always, Redis Streams when a URL is set.
The `events` section of WORKSPACE/platform.yaml (`helox.platform.load_platform`, where
HELOX_EVENTS_REDIS_URL overrides `redis_url`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from helox.configbase import StrictModel

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class EventsConfig(StrictModel):
    redis_url: str | None = None
    """Redis to publish to (`redis://127.0.0.1:6379/0`); null keeps events in the workspace's
    outbox only (WORKSPACE/events/)."""
    training_stream: str = "training-events"
    """Stream of training-started/-progress/-complete/-failed and checkpoint-saved."""
    model_stream: str = "model-events"
    """Stream of model-ready, model-promoted and model-rolled-back."""
    stream_maxlen: int = Field(default=100_000, gt=0)
    """Approximate cap of each stream (`XADD ... MAXLEN ~ N`)."""
    source: str = "helox"
    """The `source` field of every event."""
    progress_every_steps: int = Field(default=10, ge=0)
    """A training run publishes training-progress every this many optimizer steps; 0: never."""
    connect_timeout_s: float = Field(default=0.5, gt=0)
    """Connecting to Redis gives up after this long (the delivery thread's wait, not the
    trainer's: publishing only writes the outbox)."""
    socket_timeout_s: float = Field(default=1.0, gt=0)
    """One Redis command (the delivery script) gives up after this long."""
    retry_initial_s: float = Field(default=0.5, gt=0)
    """First wait before retrying while Redis is down; doubled after each failed try."""
    retry_max_s: float = Field(default=30.0, gt=0)
    """Longest wait between tries while Redis is down."""
    close_timeout_s: float = Field(default=3.0, ge=0)
    """At the end of a run, delivery of what is still queued is tried this long; the rest
    stays in the outbox for the next publisher or `helox events drain`."""
    dedup_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    """How long Redis remembers a delivered event's idempotency key, so a retry of it after a
    crash adds nothing; an event retried later than this would be added again."""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(REDIS_SCHEMES):
            raise ValueError(f"{url!r} is not a Redis URL; write redis://HOST:PORT/DB "
                             "(rediss:// with TLS, unix:///path/redis.sock)")
        return url
