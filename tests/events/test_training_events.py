"""A real (tiny) training run's events: what a consumer group on training-events receives, in
order; every event exactly once through a Redis outage in the middle of the run; how a run
that stops early, resumes or fails says so; a broken platform.yaml stops it before step 1."""

import json
import sqlite3
import threading
import time

import pytest
import yaml
from rich.console import Console

from helox.errors import HeloxError
from helox.events import EventsConfig, drain, outbox_status
from helox.events.outbox import Outbox
from helox.platform import EVENTS_URL_ENV
from helox.testing.redis import read_group
from helox.testing.tiny import tiny_config
from helox.training import loop
from helox.training.loop import train

FAST_RETRY = {"retry_initial_s": 0.05, "retry_max_s": 0.2}


@pytest.fixture
def workspace_with(tmp_path, monkeypatch):
    """A fresh workspace whose platform.yaml holds the given events section."""
    monkeypatch.delenv(EVENTS_URL_ENV, raising=False)

    def make(**events) -> tuple:
        workspace = tmp_path / "workspace"
        workspace.mkdir(exist_ok=True)
        (workspace / "platform.yaml").write_text(yaml.safe_dump({"events": events}))
        return workspace, tiny_config(workspace)  # 8 steps, checkpoints at 4 and 8
    return make


def run(config, dataset, run_dir, until_step=None):
    return train(config, run_dir, dataset, until_step=until_step, console=Console(quiet=True))


def positions(events: list[dict], name: str) -> dict[str, int]:
    """{step: index in `events`} of the events called `name`."""
    return {e["step"]: i for i, e in enumerate(events) if e["event"] == name}


def test_a_consumer_group_receives_every_event_of_a_training_run_in_order(
        tiny_dataset, tmp_path, workspace_with, redis_server, redis_client):
    workspace, config = workspace_with(redis_url=redis_server.url, progress_every_steps=2,
                                       **FAST_RETRY)
    redis_client.xgroup_create("training-events", "cyrex", id="$", mkstream=True)
    result = run(config, tiny_dataset, tmp_path / "run")
    events = read_group(redis_client, "training-events")
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())

    assert events[0]["event"] == "training-started" and events[-1]["event"] == "training-complete"
    progress, saved = positions(events, "training-progress"), positions(events, "checkpoint-saved")
    assert list(progress) == ["2", "4", "6", "8"] and list(saved) == ["4", "8"]
    assert progress["4"] < saved["4"] and saved["8"] < len(events) - 1  # saved, then announced
    assert len(events) == 1 + 4 + 2 + 1
    started, complete = events[0], events[-1]
    assert started["run_name"] == "tiny" and started["max_steps"] == "8"
    assert started["dataset_version"] == tiny_dataset.version
    assert started["config_hash"] == run_info["config_sha256"]
    assert "resumed_from_step" not in started  # a fresh run
    assert {e["correlation_id"] for e in events} == {run_info["fingerprint"]}
    assert {e["run_fingerprint"] for e in events} == {run_info["fingerprint"]}
    assert len({e["idempotency_key"] for e in events}) == len(events)
    second = events[progress["2"]]
    assert float(second["loss"]) > 0 and float(second["tokens_per_s"]) > 0
    for step in ("4", "8"):
        folder = tmp_path / "run" / "checkpoints" / f"step-0000000{step}"
        assert events[saved[step]]["checkpoint_path"] == str(folder.resolve()) and folder.is_dir()
    assert complete["step"] == "8"
    assert complete["checkpoint_path"] == str(result.checkpoint.resolve())
    assert float(complete["val_loss"]) == result.last_val_loss
    assert redis_client.xpending("training-events", "cyrex")["pending"] == 0
    assert outbox_status(workspace).pending == 0


def test_redis_killed_mid_run_and_restarted_gets_every_event_once_in_order(
        tiny_dataset, tmp_path, workspace_with, redis_server, redis_client):
    workspace, config = workspace_with(redis_url=redis_server.url, progress_every_steps=1,
                                       **FAST_RETRY)
    outage = threading.Thread(target=kill_then_restart, args=(redis_server, workspace, 2, 6))
    outage.start()
    try:
        result = run(config, tiny_dataset, tmp_path / "run")
    finally:
        outage.join(timeout=60)
    assert result.step == 8
    drain(workspace, EventsConfig(redis_url=redis_server.url))  # what the run's close left
    stored = Outbox(workspace).events()
    entries = [fields for _, fields in redis_client.xrange("training-events")]
    assert [e["idempotency_key"] for e in entries] == [e.idempotency_key for e in stored]
    assert len({e["idempotency_key"] for e in entries}) == len(entries) == 1 + 8 + 2 + 1
    assert [e["step"] for e in entries if e["event"] == "training-progress"] == \
        [str(step) for step in range(1, 9)]
    assert entries[-1]["event"] == "training-complete"
    assert any(e.attempts > 1 and e.last_error for e in stored)  # the outage happened


def kill_then_restart(server, workspace, kill_at_events: int, restart_at_events: int) -> None:
    """SIGKILL Redis once the run stored `kill_at_events` events, restart it at
    `restart_at_events` (the run goes on meanwhile)."""
    for threshold, action in ((kill_at_events, server.kill), (restart_at_events, server.restart)):
        deadline = time.monotonic() + 60
        while stored_events(workspace) < threshold and time.monotonic() < deadline:
            time.sleep(0.005)
        action()


def stored_events(workspace) -> int:
    try:
        return outbox_status(workspace).total
    except sqlite3.Error:  # the outbox is being created
        return 0


def test_a_run_stopped_early_says_so_and_its_resumption_completes(tiny_dataset, tmp_path,
                                                                  workspace_with):
    workspace, config = workspace_with(progress_every_steps=0)  # outbox only, no progress
    run(config, tiny_dataset, tmp_path / "run", until_step=4)
    first = [e.entry for e in Outbox(workspace).events()]
    assert [e["event"] for e in first] == ["training-started", "checkpoint-saved",
                                           "training-progress"]
    assert first[-1]["stopped_by"] == "until_step" and first[-1]["step"] == "4"
    assert first[-1]["checkpoint_path"] == first[1]["checkpoint_path"]
    run(config, tiny_dataset, tmp_path / "run")
    second = [e.entry for e in Outbox(workspace).events()][len(first):]
    assert [e["event"] for e in second] == ["training-started", "checkpoint-saved",
                                            "training-complete"]
    assert second[0]["resumed_from_step"] == "4" and second[0]["step"] == "4"
    run(config, tiny_dataset, tmp_path / "run")  # nothing left to train: nothing published
    assert len(Outbox(workspace).events()) == len(first) + len(second)


def test_a_failed_run_publishes_training_failed_with_the_error(tiny_dataset, tmp_path,
                                                               workspace_with, monkeypatch):
    workspace, config = workspace_with(progress_every_steps=1)
    suite = loop.Trainer.run_suite_if_due

    def fail_at_step_3(trainer):  # an error in the middle of the run
        if trainer.step == 3:
            raise RuntimeError("disk on fire")
        suite(trainer)
    monkeypatch.setattr(loop.Trainer, "run_suite_if_due", fail_at_step_3)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(config, tiny_dataset, tmp_path / "run")
    events = [e.entry for e in Outbox(workspace).events()]
    assert [e["event"] for e in events] == ["training-started"] + ["training-progress"] * 3 + \
        ["training-failed"]
    failed = events[-1]
    assert (failed["error_type"], failed["error_message"], failed["step"]) == \
        ("RuntimeError", "disk on fire", "3")


def test_a_broken_events_section_stops_training_before_the_first_step(tiny_dataset, tmp_path,
                                                                      workspace_with):
    _, config = workspace_with(progress_every_step=5)
    with pytest.raises(HeloxError, match=r"events\.progress_every_step: unknown key; did you "
                                         r"mean 'progress_every_steps'"):
        run(config, tiny_dataset, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or \
        not any((tmp_path / "run" / "checkpoints").iterdir())
