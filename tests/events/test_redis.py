"""Delivery to a real redis-server: in order and exactly once through an outage (SIGKILL and
restart), a crash between the XADD and the outbox mark, publishers in two processes at once;
streams capped with MAXLEN ~; consumers that read like Cyrex's listener."""

import json
import signal
import subprocess
import sys
from datetime import datetime

import pytest

from helox.errors import HeloxError
from helox.events import EventsConfig, drain, model_event, open_publisher, outbox_status
from helox.events.outbox import Outbox
from helox.testing.redis import read_group

CRASH_AFTER_XADD = """
import os, signal, sys
from pathlib import Path
from helox.events import EventsConfig, open_publisher
from helox.events.outbox import Outbox

mark = Outbox.mark_delivered
def die_before_marking_the_third(self, seq, stream_id, at):
    if seq == 3:  # Redis has the event; the outbox will never hear of it
        os.kill(os.getpid(), signal.SIGKILL)
    mark(self, seq, stream_id, at)
Outbox.mark_delivered = die_before_marking_the_third

publisher = open_publisher(EventsConfig(redis_url=sys.argv[2]), Path(sys.argv[1]))
for step in range(5):
    publisher.publish("training", "training-progress", {"step": step}, "run-crash")
publisher.close(timeout_s=30)
"""

PUBLISH_MANY = """
import sys
from pathlib import Path
from helox.events import EventsConfig, open_publisher
config = EventsConfig(redis_url=sys.argv[2], retry_initial_s=0.05, retry_max_s=0.2)
with open_publisher(config, Path(sys.argv[1])) as publisher:
    for step in range(int(sys.argv[4])):
        publisher.publish("training", "training-progress", {"step": step}, sys.argv[3])
"""


def keys_in(client, stream: str) -> list[str]:
    return [fields["idempotency_key"] for _, fields in client.xrange(stream)]


def test_a_consumer_group_receives_model_events_with_the_fields_the_platform_requires(
        tmp_path, events_config, redis_client):
    redis_client.xgroup_create("model-events", "cyrex", id="$", mkstream=True)
    with open_publisher(events_config(), tmp_path) as publisher:
        publisher.publish("model", "model-ready", model_event(
            "model-ready", model_name="tiny", version=1, registry_path="models:/tiny/1",
            checkpoint_path=tmp_path / "step-00000008", metadata={"val_loss": 4.2}),
            correlation_id="fp-1")
        publisher.publish("model", "model-promoted", model_event(
            "model-promoted", model_name="tiny", version=1, registry_path="models:/tiny/1",
            alias="prod"), correlation_id="fp-1")
    ready, promoted = read_group(redis_client, "model-events")
    for field in ("event", "timestamp", "source", "model_name", "version", "registry_path",
                  "metadata", "correlation_id", "idempotency_key"):
        assert ready[field], field
    assert (ready["event"], ready["model_name"], ready["version"]) == ("model-ready", "tiny", "1")
    assert ready["checkpoint_path"] == str(tmp_path / "step-00000008")
    assert json.loads(ready["metadata"]) == {"val_loss": 4.2}
    assert datetime.fromisoformat(ready["timestamp"]).tzinfo is not None
    assert promoted["event"] == "model-promoted" and promoted["alias"] == "prod"
    assert redis_client.xpending("model-events", "cyrex")["pending"] == 0


def test_redis_killed_and_restarted_gets_every_event_once_in_order(
        tmp_path, redis_server, events_config, redis_client):
    with open_publisher(events_config(), tmp_path, warn=lambda message: None) as publisher:
        keys = [publisher.publish("training", "training-progress", {"step": 0}, "r")
                .idempotency_key]
        redis_server.kill()  # SIGKILL: events now queue in the outbox
        keys += [publisher.publish("training", "training-progress", {"step": step}, "r")
                 .idempotency_key for step in range(1, 6)]
        assert outbox_status(tmp_path).pending >= 1
        redis_server.restart()  # same port and data; the publisher's backoff finds it
        keys += [publisher.publish("training", "training-progress", {"step": step}, "r")
                 .idempotency_key for step in range(6, 9)]
        assert publisher.close(timeout_s=10) == 0  # nothing left waiting
    assert keys_in(redis_client, "training-events") == keys  # all, once, in order
    assert [fields["step"] for _, fields in redis_client.xrange("training-events")] == \
        [str(step) for step in range(9)]
    stored = Outbox(tmp_path).events()
    assert all(e.delivered_at and e.stream_id for e in stored)
    assert any(e.attempts > 1 and e.last_error for e in stored)  # the outage was seen


def test_a_crash_between_xadd_and_marking_delivered_does_not_duplicate_on_retry(
        tmp_path, redis_server, redis_client):
    child = subprocess.run([sys.executable, "-c", CRASH_AFTER_XADD, str(tmp_path),
                            redis_server.url], timeout=60)
    assert child.returncode == -signal.SIGKILL
    stored = Outbox(tmp_path).events()
    assert stored[2].delivered_at is None  # the outbox still thinks it is pending…
    assert len(keys_in(redis_client, "training-events")) == 3  # …Redis has it
    result = drain(tmp_path, EventsConfig(redis_url=redis_server.url), timeout_s=10)
    assert result.duplicates == 1 and result.pending == 0 and result.error is None
    assert result.delivered == len(stored) - 3
    assert keys_in(redis_client, "training-events") == [e.idempotency_key for e in stored]
    assert Outbox(tmp_path).events()[2].stream_id == redis_client.xrange("training-events")[2][0]


def test_publishers_in_two_processes_deliver_once_each_in_the_outbox_order(
        tmp_path, redis_server, redis_client):
    children = [subprocess.Popen([sys.executable, "-c", PUBLISH_MANY, str(tmp_path),
                                  redis_server.url, run, "15"]) for run in ("run-a", "run-b")]
    try:
        assert [child.wait(timeout=60) for child in children] == [0, 0]
    finally:
        for child in children:
            child.kill()
    drain(tmp_path, EventsConfig(redis_url=redis_server.url))  # whatever a close left
    stored = Outbox(tmp_path).events()
    assert len(stored) == 30
    assert keys_in(redis_client, "training-events") == [e.idempotency_key for e in stored]
    for run in ("run-a", "run-b"):
        steps = [e.entry["step"] for e in stored if e.correlation_id == run]
        assert steps == [str(step) for step in range(15)]


def test_one_drain_at_a_time_and_what_a_closing_publisher_leaves_waits_for_the_next(
        tmp_path, events_config, redis_client):
    lock = Outbox(tmp_path).create().drain_lock()
    assert lock.acquire()  # a drain in another process, say
    try:
        publisher = open_publisher(events_config(), tmp_path)
        for step in range(3):
            publisher.publish("training", "training-progress", {"step": step}, "r")
        assert publisher.close(timeout_s=0.3) == 3  # could not drain: all three wait
        assert drain(tmp_path, events_config(), timeout_s=0.1).busy
    finally:
        lock.release()
    assert redis_client.xlen("training-events") == 0
    result = drain(tmp_path, events_config())
    assert (result.delivered, result.pending, result.busy) == (3, 0, False)
    assert [f["step"] for _, f in redis_client.xrange("training-events")] == ["0", "1", "2"]


def test_streams_are_capped_approximately_at_stream_maxlen(tmp_path, events_config,
                                                           redis_client):
    redis_client.config_set("stream-node-max-entries", 5)  # trimming works node by node
    with open_publisher(events_config(stream_maxlen=10), tmp_path) as publisher:
        for step in range(60):
            publisher.publish("training", "training-progress", {"step": step}, "r")
    assert outbox_status(tmp_path).delivered == 60
    length = redis_client.xlen("training-events")
    assert 10 <= length <= 10 + 5, length
    assert redis_client.xrevrange("training-events", count=1)[0][1]["step"] == "59"


def test_events_published_without_redis_stay_local_when_one_is_configured_later(
        tmp_path, events_config, redis_client):
    with open_publisher(EventsConfig(), tmp_path) as local:
        local.publish("training", "training-started", {"step": 0}, "before")
    with open_publisher(events_config(), tmp_path) as publisher:
        publisher.publish("training", "training-started", {"step": 0}, "after")
    assert [f["correlation_id"] for _, f in redis_client.xrange("training-events")] == ["after"]
    status = outbox_status(tmp_path)
    assert (status.local, status.delivered, status.pending) == (1, 1, 0)


def test_a_missing_redis_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(HeloxError, match=r"pip install 'helox\[events\]'"):
        open_publisher(EventsConfig(redis_url="redis://127.0.0.1:1/0"), tmp_path)
    with pytest.raises(HeloxError, match="events.redis_url is not set"):
        drain(tmp_path, EventsConfig())


def test_an_unusable_redis_url_is_refused_when_the_publisher_opens(tmp_path):
    with pytest.raises(HeloxError, match="events.redis_url redis://:\\*\\*\\*@host:port/0 "
                                         "cannot be used"):
        open_publisher(EventsConfig(redis_url="redis://:secret@host:port/0"), tmp_path)
