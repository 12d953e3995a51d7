"""The platform around training.

- Where its services are for one workspace: the model registry's store and the event bus
  (`PlatformConfig`). Read from WORKSPACE/platform.yaml when it exists (strict keys), else the
  embedded defaults (a SQLite registry and a file outbox in the workspace); HELOX_REGISTRY_URI
  and HELOX_EVENTS_REDIS_URL override the file, so a server is a config switch, never a code
  change.
- What a recipe's main job does after training (`ReleaseConfig`, the recipe's `release`
  section): evaluate, export, check parity, register, promote.

Both are plain configs importing nothing above the config base, so the run config and the
trainer may read them."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from typing import Literal

from pydantic import Field, ValidationError

from helox.configbase import StrictModel, describe_error
from helox.errors import HeloxError
from helox.events.config import EventsConfig

PLATFORM_FILE = "platform.yaml"
REGISTRY_URI_ENV = "HELOX_REGISTRY_URI"
EVENTS_URL_ENV = "HELOX_EVENTS_REDIS_URL"


class RegistryConfig(StrictModel):
    tracking_uri: str | None = None
    """MLflow tracking/registry URI (`http://127.0.0.1:5000`, `sqlite:///path.db`); null is a
    SQLite store in the workspace (WORKSPACE/registry/mlflow.db)."""


class PlatformConfig(StrictModel):
    registry: RegistryConfig = RegistryConfig()
    """The MLflow model registry."""
    events: EventsConfig = EventsConfig()
    """Synapse events (outbox, Redis Streams)."""


def load_platform(workspace: Path) -> PlatformConfig:
    """WORKSPACE/platform.yaml (or the defaults), then the environment's overrides."""
    path = Path(workspace) / PLATFORM_FILE
    raw = _read(path) if path.is_file() else {}
    try:
        config = PlatformConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [describe_error(err, PlatformConfig) for err in exc.errors()]
        lines = "\n".join(f"  {'.'.join(loc)}: {message}" for loc, message in problems)
        raise HeloxError(f"invalid platform config {path}, {len(problems)} problem(s):\n"
                         f"{lines}", hint=f"edit {path} at each path above "
                                          f"(docs/registry.md and docs/events.md list the keys)"
                         ) from None
    if os.environ.get(REGISTRY_URI_ENV):
        config.registry.tracking_uri = os.environ[REGISTRY_URI_ENV]
    if os.environ.get(EVENTS_URL_ENV):
        try:
            config.events.redis_url = os.environ[EVENTS_URL_ENV]  # validated on assignment
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise HeloxError(f"{EVENTS_URL_ENV}: {message}",
                             hint=f"set {EVENTS_URL_ENV} to a Redis URL, or unset it") from None
    return config


def _read(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise HeloxError(f"{path} is not valid YAML: {exc}", hint=f"fix {path}") from None
    if not isinstance(raw, dict):
        raise HeloxError(f"{path}: the top level must be a mapping of sections",
                         hint="write `registry:` and `events:` sections (docs/registry.md)")
    return raw


class ReleaseConfig(StrictModel):
    """What `helox run` does once training ends, each stage one line of progress and one of
    result; a stage that fails stops the job, and what it left is kept."""

    suite: str = "quickstart"
    """Eval suite (a bundled name or a suite.yaml); its thresholds are the first gate."""
    exports: list[Literal["hf", "onnx", "gguf"]] = ["hf", "gguf"]
    """Formats to export the final checkpoint to."""
    gguf_type: Literal["F32", "F16", "Q8_0", "Q4_0"] = "Q8_0"
    """Precision of the GGUF export."""
    parity: bool = True
    """Run each export in its own runtime against the fp32 model (`helox parity`)."""
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Register the checkpoint under this name (alias `dev`); null: no registration."""
    promote_to: Literal["staging", "prod"] | None = "staging"
    """Then promote it through the gates to this alias; null: stay at `dev`."""
