"""Health monitors: conditions over the run's metrics that raise alerts.

Each monitor watches one symptom and fires once when it appears (it re-arms when the symptom
clears), so a persistent condition is one alert, not one per step. An alert carries a severity,
the values that triggered it, the action taken and its entry in docs/runbooks.md; the loop
writes it to RUN_DIR/events.jsonl and to the sinks, and performs the action where the stability
machinery has one (a divergence rolls back, like a streak of bad steps).

| monitor          | input                          | fires when                                  |
|------------------|--------------------------------|---------------------------------------------|
| divergence       | accepted training losses       | the median of the last window rose more     |
|                  |                                | than rise_fraction above its best median    |
| stagnation       | validation losses              | no relative improvement over the last       |
|                  |                                | window_evals evaluations                    |
| nan_spikes       | skipped (non-finite) steps     | more than max_skipped in the last window    |
| entropy_collapse | attention entropy per head     | a head's entropy falls below the floor      |
| dead_units       | dead-neuron fraction per layer | it grew by more than max_growth since the   |
|                  |                                | first sample                                |
| drift            | token-frequency JS divergence  | it exceeds max_js and noise_multiple × its  |
|                  |                                | sampling-noise floor                        |
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

import numpy as np
from pydantic import Field

from helox.configbase import StrictModel


class DivergenceConfig(StrictModel):
    window_steps: int = Field(default=50, gt=1)
    """Accepted losses whose median is compared with the best median so far."""
    rise_fraction: float = Field(default=0.25, gt=0)
    """Fire when the window's median exceeds the best median by this fraction."""


class StagnationConfig(StrictModel):
    window_evals: int = Field(default=5, gt=1)
    """Evaluations over which the validation loss must improve."""
    min_relative_improvement: float = Field(default=0.002, ge=0)
    """Fire when the best validation loss of the window is not this fraction below the best
    before it."""


class NanSpikesConfig(StrictModel):
    window_steps: int = Field(default=100, gt=0)
    """Steps over which non-finite skips are counted."""
    max_skipped: int = Field(default=3, ge=0)
    """Fire when more steps than this were skipped as non-finite in the window."""


class EntropyCollapseConfig(StrictModel):
    min_entropy_nats: float = Field(default=0.05, ge=0)
    """Fire when a head's mean attention entropy falls below this (it attends to one token)."""


class DeadUnitsConfig(StrictModel):
    max_growth: float = Field(default=0.10, ge=0)
    """Fire when a layer's dead-neuron fraction grew by more than this since the first
    sample (absolute, 0.10 = ten percentage points)."""


class DriftConfig(StrictModel):
    max_js: float = Field(default=0.05, ge=0)
    """Fire when the Jensen–Shannon divergence (nats) between the tokens trained on since the
    last sample and the dataset's unigram distribution exceeds this..."""
    noise_multiple: float = Field(default=3.0, ge=1)
    """...and this multiple of the divergence that the same number of tokens drawn from the
    dataset itself shows (`token_drift_js_floor`): small windows over large vocabularies
    diverge by sampling noise alone."""


class HealthConfig(StrictModel):
    """Which monitors run and their thresholds; None switches one off."""

    divergence: DivergenceConfig | None = DivergenceConfig()
    stagnation: StagnationConfig | None = StagnationConfig()
    nan_spikes: NanSpikesConfig | None = NanSpikesConfig()
    entropy_collapse: EntropyCollapseConfig | None = EntropyCollapseConfig()
    dead_units: DeadUnitsConfig | None = DeadUnitsConfig()
    drift: DriftConfig | None = DriftConfig()


class Alert(NamedTuple):
    monitor: str
    severity: str
    """info, warning or critical."""
    message: str
    values: dict
    action: str
    """What the loop does about it: "rollback" or "none" (a message for the operator)."""

    def event(self, step: int) -> dict:
        """The events.jsonl line; `runbook` names the entry in docs/runbooks.md."""
        return {"step": step, "event": "alert", "alert": self.monitor,
                "severity": self.severity, "runbook": f"alert-{self.monitor.replace('_', '-')}",
                "message": self.message, "action": self.action, **self.values}


class HealthMonitor:
    """All monitors of a run. Feed it with `on_step`, `on_eval` and `on_sample`; each returns
    the alerts that fired. `state_dict` keeps windows and armed flags for exact resume."""

    def __init__(self, config: HealthConfig):
        self.config = config
        self.losses: list[float] = []
        self.best_median: float | None = None
        self.val_losses: list[float] = []
        self.skips: deque[int] = deque()
        self.first_dead: dict[str, float] = {}
        self.firing: set[str] = set()
        """Conditions currently true: an alert fired for them and has not cleared."""

    # -- inputs ---------------------------------------------------------------------------

    def on_step(self, step: int, loss: float, skip_reason: str | None) -> list[Alert]:
        alerts = []
        if skip_reason == "nonfinite":
            self.skips.append(step)
        alerts += self._nan_spikes(step)
        if skip_reason is None and math.isfinite(loss):
            alerts += self._divergence(loss)
        return alerts

    def on_eval(self, step: int, val_loss: float) -> list[Alert]:
        if not math.isfinite(val_loss):
            return []
        self.val_losses.append(val_loss)
        return self._stagnation()

    def on_sample(self, step: int, scalars: dict[str, float]) -> list[Alert]:
        return self._entropy_collapse(scalars) + self._dead_units(scalars) + \
            self._drift(scalars)

    # -- monitors -------------------------------------------------------------------------

    def _divergence(self, loss: float) -> list[Alert]:
        cfg = self.config.divergence
        if cfg is None:
            return []
        self.losses = (self.losses + [loss])[-cfg.window_steps:]
        if len(self.losses) < cfg.window_steps:
            return []
        median = float(np.median(self.losses))
        self.best_median = median if self.best_median is None else min(self.best_median,
                                                                         median)
        limit = self.best_median * (1 + cfg.rise_fraction)
        return self._edge("divergence", median > limit, lambda: Alert(
            "divergence", "critical",
            f"the training loss diverges: median {median:.4f} over the last "
            f"{cfg.window_steps} steps, {median / self.best_median - 1:.0%} above its best "
            f"{self.best_median:.4f}",
            {"median_loss": median, "best_median_loss": self.best_median}, "rollback"))

    def _stagnation(self) -> list[Alert]:
        cfg = self.config.stagnation
        if cfg is None or len(self.val_losses) <= cfg.window_evals:
            return []
        before = min(self.val_losses[:-cfg.window_evals])
        recent = min(self.val_losses[-cfg.window_evals:])
        improvement = (before - recent) / abs(before) if before else 0.0
        return self._edge("stagnation", improvement < cfg.min_relative_improvement,
                          lambda: Alert(
            "stagnation", "warning",
            f"the validation loss stopped improving: best {recent:.4f} over the last "
            f"{cfg.window_evals} evaluations against {before:.4f} before "
            f"({improvement:+.2%}, needs {cfg.min_relative_improvement:.2%})",
            {"best_recent_val_loss": recent, "best_earlier_val_loss": before,
             "relative_improvement": improvement}, "none"))

    def _nan_spikes(self, step: int) -> list[Alert]:
        cfg = self.config.nan_spikes
        if cfg is None:
            return []
        while self.skips and self.skips[0] <= step - cfg.window_steps:
            self.skips.popleft()
        count = len(self.skips)
        return self._edge("nan_spikes", count > cfg.max_skipped, lambda: Alert(
            "nan_spikes", "critical",
            f"{count} non-finite steps in the last {cfg.window_steps} (more than "
            f"{cfg.max_skipped}); each was skipped",
            {"nonfinite_steps_in_window": count}, "none"))

    def _entropy_collapse(self, scalars: dict[str, float]) -> list[Alert]:
        cfg = self.config.entropy_collapse
        heads = {k: v for k, v in scalars.items()
                 if k.startswith("attn_entropy.") and k.count(".") == 2}
        if cfg is None or not heads:
            return []
        collapsed = sorted(k.removeprefix("attn_entropy.") for k, v in heads.items()
                           if v < cfg.min_entropy_nats)
        return self._edge("entropy_collapse", bool(collapsed), lambda: Alert(
            "entropy_collapse", "warning",
            f"attention entropy collapsed below {cfg.min_entropy_nats} nats in "
            f"{len(collapsed)} head(s): {', '.join(collapsed[:8])}",
            {"collapsed_heads": collapsed}, "none"))

    def _dead_units(self, scalars: dict[str, float]) -> list[Alert]:
        cfg = self.config.dead_units
        layers = {k: v for k, v in scalars.items() if k.startswith("dead_neurons.")}
        if cfg is None or not layers:
            return []
        for name, fraction in layers.items():
            self.first_dead.setdefault(name, fraction)
        grown = {k.removeprefix("dead_neurons."): v - self.first_dead[k]
                 for k, v in layers.items() if v - self.first_dead[k] > cfg.max_growth}
        return self._edge("dead_units", bool(grown), lambda: Alert(
            "dead_units", "warning",
            f"dead MLP neurons grew by more than {cfg.max_growth:.0%} in "
            + ", ".join(f"{k} (+{v:.0%})" for k, v in grown.items()),
            {"dead_fraction_growth": grown}, "none"))

    def _drift(self, scalars: dict[str, float]) -> list[Alert]:
        cfg = self.config.drift
        js = scalars.get("token_drift_js")
        if cfg is None or js is None:
            return []
        floor = scalars.get("token_drift_js_floor", 0.0)
        drifted = js > cfg.max_js and js > cfg.noise_multiple * floor
        return self._edge("drift", drifted, lambda: Alert(
            "drift", "warning",
            f"the tokens trained on drifted from the dataset's distribution: JS divergence "
            f"{js:.3f} nats > {cfg.max_js} (sampling noise alone: {floor:.3f})",
            {"token_drift_js": js, "token_drift_js_floor": floor}, "none"))

    def _edge(self, name: str, condition: bool, alert) -> list[Alert]:
        """Fire on the rising edge of `condition`; re-arm once it is false again."""
        if not condition:
            self.firing.discard(name)
            return []
        if name in self.firing:
            return []
        self.firing.add(name)
        return [alert()]

    def cleared(self, name: str) -> None:
        """Forget a condition whose cause was acted on (the losses after a rollback start a
        fresh window)."""
        self.firing.discard(name)
        if name == "divergence":
            self.losses = []

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "best_median": self.best_median,
                "val_losses": list(self.val_losses), "skips": list(self.skips),
                "first_dead": dict(self.first_dead), "firing": sorted(self.firing)}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.best_median = list(state["losses"]), state["best_median"]
        self.val_losses, self.skips = list(state["val_losses"]), deque(state["skips"])
        self.first_dead, self.firing = dict(state["first_dead"]), set(state["firing"])
