"""Delivery of outbox events to Redis Streams, exactly once.

One Lua script (redis-py's `register_script`) adds an event to its stream and remembers its
idempotency key, atomically: a retry of an event Redis already has (the process died between
the XADD and marking the outbox row delivered, or a reply timed out) adds nothing and returns
the entry id of the first delivery. The script checks the key, XADDs, then sets the key with
`SET NX EX`: a Lua script is not rolled back on error, so setting the key first would leave it
behind when the XADD fails (a key holding another type, out of memory) and block the event
for good. The dedup key lives `dedup_ttl_s`; the stream is capped with `MAXLEN ~`.

(Redis Cluster would need the dedup key and the stream in one hash slot; Helox targets one
Redis server or a replicated primary, as the platform runs.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from helox.errors import HeloxError
from helox.events.config import EventsConfig
from helox.events.outbox import StoredEvent

DEDUP_PREFIX = "helox:events:dedup:"
"""Redis key of a delivered event's idempotency key (a string holding its entry id)."""

DELIVER_SCRIPT = """
-- KEYS[1]: the event's dedup key; KEYS[2]: its stream.
-- ARGV[1]: the dedup key's TTL (s); ARGV[2]: MAXLEN ~ of the stream; ARGV[3..]: field, value, ...
-- Returns {1, entry id} when added, {0, the earlier entry id} when the event was delivered before.
local earlier = redis.call('GET', KEYS[1])
if earlier then
  return {0, earlier}
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[1], id, 'NX', 'EX', ARGV[1])
return {1, id}
"""


@dataclass(frozen=True)
class Delivery:
    stream_id: str
    """The entry id in the stream (of the first delivery, for a retry)."""
    added: bool
    """False when Redis had the event already (a retry the script turned into nothing)."""


class RedisStreams:
    """A Redis client for delivery: short timeouts and no retries of its own (the publisher
    backs off), so a down server costs one connect timeout per try."""

    def __init__(self, config: EventsConfig):
        redis = import_redis()
        from redis.backoff import NoBackoff  # optional extra: events
        from redis.retry import Retry  # optional extra: events

        self.url = redact(config.redis_url)
        self.maxlen, self.dedup_ttl_s = config.stream_maxlen, config.dedup_ttl_s
        try:  # connects lazily: a down server is found by the first delivery, not here
            self.client = redis.Redis.from_url(
                config.redis_url, socket_connect_timeout=config.connect_timeout_s,
                socket_timeout=config.socket_timeout_s, retry=Retry(NoBackoff(), 0),
                decode_responses=True)
        except ValueError as exc:
            raise HeloxError(f"events.redis_url {self.url} cannot be used: {exc}",
                             hint="write redis://HOST:PORT/DB (docs/events.md)") from None
        self._script = self.client.register_script(DELIVER_SCRIPT)
        self.errors: tuple[type[Exception], ...] = (redis.RedisError,)
        """What a failed delivery raises (connection refused, timeout, an error reply)."""

    def deliver(self, event: StoredEvent) -> Delivery:
        """XADD the event's entry unless Redis has its idempotency key already."""
        flat = [part for field in event.entry.items() for part in field]
        added, stream_id = self._script(
            keys=[DEDUP_PREFIX + event.idempotency_key, event.stream],
            args=[self.dedup_ttl_s, self.maxlen, *flat])
        return Delivery(stream_id, bool(added))

    def close(self) -> None:
        self.client.close()


def import_redis():
    """The redis package, or a HeloxError saying how to install it."""
    try:
        import redis  # optional extra: events
    except ImportError as exc:
        raise HeloxError("events.redis_url is set but the `redis` package is not installed",
                         hint="pip install 'helox[events]' (make install-test has it), or "
                              "set events.redis_url to null to keep events in the workspace's "
                              "outbox") from exc
    return redis


def redact(url: str) -> str:
    """The URL without its password (for messages)."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
