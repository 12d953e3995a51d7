"""What an event is on the wire: its stream, its name, and flat string fields (a Redis stream
entry holds strings only). docs/events.md is the reference of every event and field.

Every event carries the envelope: `event`, `timestamp` (ISO 8601, UTC), `source`,
`correlation_id` (what links events of one run or one model version) and `idempotency_key`
(unique per event, the same on every retry of it: consumers may dedup on it). The other fields
are the event's own; a dict or list is a JSON string, a number its decimal form, a boolean
`true`/`false`, and a None is left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

from helox.errors import HeloxError

TRAINING_EVENTS = ("training-started", "training-progress", "checkpoint-saved",
                   "training-complete", "training-failed")
MODEL_EVENTS = ("model-ready", "model-promoted", "model-rolled-back")
EVENTS_BY_STREAM = {"training": TRAINING_EVENTS, "model": MODEL_EVENTS}
"""The two stream kinds and their events (the stream names are EventsConfig's)."""
ENVELOPE = ("event", "timestamp", "source", "correlation_id", "idempotency_key")


def check_event(stream: str, event: str) -> None:
    """Refuse a stream kind or event name the platform does not know."""
    if stream not in EVENTS_BY_STREAM:
        raise HeloxError(f"unknown event stream {stream!r}",
                         hint=f"use one of: {', '.join(EVENTS_BY_STREAM)}")
    if event not in EVENTS_BY_STREAM[stream]:
        raise HeloxError(f"{event!r} is not an event of the {stream} stream",
                         hint=f"{stream} events: {', '.join(EVENTS_BY_STREAM[stream])}")


def envelope_fields(event: str, source: str, correlation_id: str, idempotency_key: str,
                    fields: Mapping[str, Any]) -> dict[str, str]:
    """The stream entry: the envelope first, then the event's own fields, all strings."""
    clash = sorted(set(fields) & set(ENVELOPE))
    if clash:
        raise HeloxError(f"event fields {clash} are set by the publisher",
                         hint="leave the envelope fields out of `fields`")
    if not correlation_id:
        raise HeloxError(f"{event}: an event needs a correlation_id",
                         hint="pass the run's fingerprint or the model version it is about")
    entry = {"event": event, "timestamp": utc_now(), "source": source,
             "correlation_id": correlation_id, "idempotency_key": idempotency_key}
    entry.update(encode_fields(fields))
    return entry


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """Flat string values (see the module docstring); None values are left out."""
    return {str(key): encode_value(value) for key, value in fields.items() if value is not None}


def encode_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # nan, inf, -inf
    if isinstance(value, int):
        return str(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    raise HeloxError(f"event field value {value!r} is a {type(value).__name__}",
                     hint="pass strings, numbers, booleans, paths, dicts or lists")


def utc_now() -> str:
    """ISO 8601 in UTC with milliseconds (what pydantic's datetime and JavaScript parse)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def model_event(event: str, *, model_name: str, version: str | int, registry_path: str,
                checkpoint_path: str | PurePath | None = None,
                metadata: Mapping[str, Any] | None = None, alias: str | None = None,
                previous_version: str | int | None = None,
                run_fingerprint: str | None = None) -> dict[str, Any]:
    """The fields of a model-events event, for `Publisher.publish("model", event, ...)`.

    - model-ready: a version is registered and loadable. Cyrex's reload listener reads
      `model_name`, `version` and `registry_path` (or `checkpoint_path`); the platform's
      ModelReadyEvent requires `model_name`, `version`, `registry_path` and `metadata`.
    - model-promoted: `alias` (e.g. `prod`) now points at `version`;
      `previous_version` is the version it pointed at before, if any.
    - model-rolled-back: `alias` points back at `version`; `previous_version` is the version
      it was taken from.
    """
    check_event("model", event)
    if event != "model-ready" and not alias:
        raise HeloxError(f"{event} needs the alias that moved",
                         hint="pass alias= (e.g. 'prod')")
    if not model_name or not registry_path:
        raise HeloxError(f"{event} needs model_name and registry_path",
                         hint="pass the registered model's name and its registry URI")
    return {"model_name": model_name, "version": str(version), "registry_path": registry_path,
            "checkpoint_path": checkpoint_path, "metadata": dict(metadata or {}),
            "alias": alias,
            "previous_version": None if previous_version is None else str(previous_version),
            "run_fingerprint": run_fingerprint}
