"""The observe section of a recipe: telemetry, health monitors, sinks and the MFU denominator.
Each part's config lives next to its code (probes.py, health.py, sinks.py)."""

from __future__ import annotations

from pydantic import Field

from helox.configbase import StrictModel
from helox.observe.health import HealthConfig
from helox.observe.probes import TelemetryConfig
from helox.observe.sinks import SinksConfig


class ObserveConfig(StrictModel):
    telemetry: TelemetryConfig = TelemetryConfig()
    """The model's insides, sampled every N steps on a fixed probe batch (observe/probes.py)."""
    health: HealthConfig = HealthConfig()
    """Health monitors: the conditions that raise alerts (events.jsonl, docs/runbooks.md)."""
    sinks: SinksConfig = SinksConfig()
    """Where metrics, histograms and alerts go besides the JSONL files: TensorBoard, MLflow,
    W&B (offline), a Prometheus /metrics endpoint (observe/sinks.py)."""
    peak_flops_per_s: float | None = Field(default=None, gt=0)
    """The denominator of MFU; None measures the device's F.linear ceiling in the run's
    precision at start (~0.1 s), as bench/train_throughput.py does."""
