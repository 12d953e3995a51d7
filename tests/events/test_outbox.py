"""The outbox alone (no Redis configured): every event stored durably, in order, with its key;
seen by other publishers and processes; kept when the process is killed right after
`publish` returns; the payload rules and the refusals."""

import json
import signal
import subprocess
import sys
from datetime import datetime

import pytest
import yaml

from helox.errors import HeloxError
from helox.events import EventsConfig, model_event, open_publisher, outbox_status
from helox.events.outbox import Outbox
from helox.platform import EVENTS_URL_ENV, load_platform

PUBLISH_THEN_WAIT = """
import sys
from pathlib import Path
from helox.events import EventsConfig, open_publisher
publisher = open_publisher(EventsConfig(), Path(sys.argv[1]))
for step in range(3):
    stored = publisher.publish("training", "training-progress", {"step": step}, "run-killed")
    print(stored.idempotency_key, flush=True)
sys.stdin.read()  # until killed
"""


def test_events_are_stored_in_order_with_their_keys_and_envelope(tmp_path):
    with open_publisher(EventsConfig(), tmp_path) as publisher:
        first = publisher.publish("training", "training-started", {"step": 0, "max_steps": 8},
                                  correlation_id="run-a")
        second = publisher.publish("training-events", "training-progress",
                                   {"step": 2, "loss": 3.25, "tokens_per_s": None},
                                   correlation_id="run-a", idempotency_key="run-a/progress/2")
    stored = Outbox(tmp_path).events()
    assert [e.event for e in stored] == ["training-started", "training-progress"]
    assert [e.seq for e in stored] == sorted(e.seq for e in stored)
    assert stored[0] == first and stored[1] == second
    assert second.idempotency_key == "run-a/progress/2"
    assert first.idempotency_key != second.idempotency_key
    entry = second.entry
    assert entry["event"] == "training-progress" and entry["source"] == "helox"
    assert entry["correlation_id"] == "run-a" and entry["idempotency_key"] == "run-a/progress/2"
    assert datetime.fromisoformat(entry["timestamp"]).tzinfo is not None
    assert entry["step"] == "2" and entry["loss"] == "3.25"
    assert "tokens_per_s" not in entry  # None is left out
    assert all(isinstance(v, str) for e in stored for v in e.entry.values())
    assert stored[0].stream == "training-events" and not stored[0].to_redis


def test_another_publisher_sees_the_same_outbox_and_continues_its_order(tmp_path):
    one, two = open_publisher(EventsConfig(), tmp_path), open_publisher(EventsConfig(), tmp_path)
    for step in range(4):
        (one if step % 2 else two).publish("training", "training-progress", {"step": step}, "r")
    one.close()
    two.close()
    with open_publisher(EventsConfig(), tmp_path) as three:
        three.publish("training", "training-complete", {"step": 4}, "r")
    assert [e.entry["step"] for e in Outbox(tmp_path).events()] == ["0", "1", "2", "3", "4"]


def test_an_event_survives_the_process_killed_right_after_publish_returns(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", PUBLISH_THEN_WAIT, str(tmp_path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        keys = [child.stdout.readline().strip() for _ in range(3)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    stored = Outbox(tmp_path).events()
    assert [e.idempotency_key for e in stored] == keys
    assert [e.entry["step"] for e in stored] == ["0", "1", "2"]


def test_a_retried_publish_with_the_same_key_adds_nothing(tmp_path):
    with open_publisher(EventsConfig(), tmp_path) as publisher:
        fields = model_event("model-ready", model_name="tiny", version=3,
                             registry_path="models:/tiny/3")
        first = publisher.publish("model", "model-ready", fields, "tiny/3", "tiny/3/ready")
        again = publisher.publish("model", "model-ready", fields, "tiny/3", "tiny/3/ready")
    assert again == first
    assert len(Outbox(tmp_path).events()) == 1


def test_dicts_and_lists_are_json_strings_and_model_events_carry_the_required_fields(tmp_path):
    fields = model_event("model-promoted", model_name="tiny", version=4,
                         registry_path="models:/tiny/4", checkpoint_path=tmp_path / "ckpt",
                         metadata={"val_loss": 4.1, "tags": ["a", "b"]}, alias="prod",
                         previous_version=3)
    with open_publisher(EventsConfig(), tmp_path) as publisher:
        entry = publisher.publish("model", "model-promoted", fields, "tiny/4").entry
    assert json.loads(entry["metadata"]) == {"val_loss": 4.1, "tags": ["a", "b"]}
    assert entry["version"] == "4" and entry["previous_version"] == "3"
    assert entry["alias"] == "prod" and entry["checkpoint_path"] == str(tmp_path / "ckpt")
    ready = model_event("model-ready", model_name="tiny", version=1, registry_path="models:/t/1")
    assert ready["metadata"] == {}  # the platform's ModelReadyEvent requires the field


@pytest.mark.parametrize("stream, event, fields, message", [
    ("model", "training-started", {}, "not an event of the model stream"),
    ("metrics", "training-started", {}, "unknown event stream 'metrics'"),
    ("training", "training-progress", {"event": "x"}, "set by the publisher"),
    ("training", "training-progress", {"step": object()}, "is a object"),
])
def test_unknown_streams_events_and_fields_are_refused(tmp_path, stream, event, fields, message):
    with open_publisher(EventsConfig(), tmp_path) as publisher:
        with pytest.raises(HeloxError, match=message):
            publisher.publish(stream, event, fields, "run")
    assert Outbox(tmp_path).events() == []


def test_a_model_event_without_its_alias_or_registry_path_is_refused():
    with pytest.raises(HeloxError, match="needs the alias"):
        model_event("model-rolled-back", model_name="m", version=2, registry_path="models:/m/2")
    with pytest.raises(HeloxError, match="registry_path"):
        model_event("model-ready", model_name="m", version=2, registry_path="")


def test_status_counts_local_events_and_an_empty_workspace(tmp_path):
    assert outbox_status(tmp_path / "none").total == 0
    assert not (tmp_path / "none").exists()  # reading the status creates nothing
    with open_publisher(EventsConfig(), tmp_path) as publisher:
        publisher.publish("training", "training-started", {"step": 0}, "run")
    status = outbox_status(tmp_path)
    assert (status.total, status.local, status.pending, status.oldest_pending) == (1, 1, 0, None)


def test_an_unknown_key_or_a_bad_url_in_the_events_section_is_refused_naming_it(
        tmp_path, monkeypatch):
    monkeypatch.delenv(EVENTS_URL_ENV, raising=False)
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(
        {"events": {"redis_ur": "redis://127.0.0.1:6379/0"}}))
    with pytest.raises(HeloxError, match=r"events\.redis_ur: unknown key; did you mean "
                                         r"'redis_url'"):
        load_platform(tmp_path)
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(
        {"events": {"redis_url": "127.0.0.1:6379"}}))
    with pytest.raises(HeloxError, match=r"events\.redis_url: '127.0.0.1:6379' is not a Redis "
                                         r"URL; write redis://HOST:PORT/DB"):
        load_platform(tmp_path)


def test_events_config_comes_from_platform_yaml_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(EVENTS_URL_ENV, raising=False)
    assert load_platform(tmp_path).events == EventsConfig()  # no file: the defaults
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(
        {"events": {"redis_url": "redis://10.0.0.5:6379/1", "progress_every_steps": 50}}))
    config = load_platform(tmp_path).events
    assert config.redis_url == "redis://10.0.0.5:6379/1" and config.progress_every_steps == 50
    monkeypatch.setenv(EVENTS_URL_ENV, "redis://override:6380/0")
    assert load_platform(tmp_path).events.redis_url == "redis://override:6380/0"
