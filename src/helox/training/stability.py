"""Bad-step detection and automatic recovery: the loss-spike detector, the streak of bad steps,
and the rollback policy (LR cool-down, budget). The loop performs the actions; each one is an
events.jsonl line naming its entry in docs/runbooks.md.

A step is *bad* when its loss or gradient norm is NaN/Inf, or when its loss is a spike: a robust
z-score (median and MAD of the recent accepted losses, so one outlier does not move the
reference) above a threshold. A bad step's update is skipped. `after_bad_steps` bad steps in a
row mean the trouble is in the weights, not in one batch: the loop rolls back to the newest
checkpoint saved before the streak, keeps the data position (the batches of the window are
skipped, as PaLM did after its spikes) and cuts the LR for a cool-down. A budget bounds the
rollbacks; past it the run stops with a diagnosis instead of burning compute.

Both classes are plain state: their `state_dict` goes into every checkpoint, so a resumed run
detects and recovers exactly as the uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field, model_validator

from helox.configbase import StrictModel


class SpikeConfig(StrictModel):
    """A step's loss is a spike when its robust z-score against the recent losses,
    (loss − median) / (1.4826 · MAD), exceeds z_threshold and the loss is at least
    min_relative_increase above the median."""

    window_steps: int = Field(default=50, gt=1)
    """Losses of this many recent accepted steps form the reference."""
    min_history: int = Field(default=20, gt=1)
    """Losses needed before spikes are detected."""
    z_threshold: float = Field(default=6.0, gt=0)
    """Robust z-score above which a loss is a spike."""
    min_relative_increase: float = Field(default=0.05, ge=0)
    """And the loss must exceed the median by this fraction (a flat, noiseless loss has a
    MAD of ~0, where any wiggle would have a huge z-score)."""
    skip_update: bool = True
    """Do not apply a spike step's update (like a NaN step); false only logs it."""

    @model_validator(mode="after")
    def _history_fits(self) -> SpikeConfig:
        if self.min_history > self.window_steps:
            raise ValueError(f"min_history {self.min_history} exceeds window_steps "
                             f"{self.window_steps}")
        return self


class RollbackConfig(StrictModel):
    after_bad_steps: int = Field(default=3, gt=0)
    """Roll back after this many consecutive bad steps (NaN/Inf or spike)."""
    lr_factor: float = Field(default=0.5, gt=0, le=1)
    """Multiply the learning rate by this for the cool-down after a rollback (again for each
    rollback during a cool-down)."""
    cooldown_steps: int = Field(default=100, ge=0)
    """Steps the cut learning rate lasts."""
    max_rollbacks: int = Field(default=3, ge=0)
    """Rollbacks allowed in the run; one more bad streak stops it with a diagnosis."""


class StabilityConfig(StrictModel):
    """Detection of bad steps and the automatic recovery (docs/runbooks.md). An operator's
    knobs: they may change on resume."""

    spike: SpikeConfig | None = SpikeConfig()
    """Loss-spike detection; None disables it (NaN/Inf steps are always skipped)."""
    rollback: RollbackConfig | None = RollbackConfig()
    """What a streak of bad steps triggers: back to the newest checkpoint before the streak,
    the data of the streak skipped, the LR cut for a cool-down. None: bad steps are only
    skipped and logged."""


# 1.4826 × MAD estimates the standard deviation of normally distributed values.
MAD_TO_STD = 1.4826


class SpikeDetector:
    """Scores losses against a window of recent accepted ones and tracks the bad streak."""

    def __init__(self, config: SpikeConfig | None):
        self.config = config
        self.history: list[float] = []
        self.streak = 0
        """Consecutive bad steps up to the last recorded one."""
        self.streak_start: int | None = None
        """Step number (as logged) of the streak's first bad step."""

    def z_score(self, loss: float) -> float | None:
        """The loss's robust z-score; None before min_history losses (or when disabled)."""
        cfg = self.config
        if cfg is None or len(self.history) < cfg.min_history:
            return None
        median = float(np.median(self.history))
        mad = float(np.median(np.abs(np.asarray(self.history) - median)))
        spread = max(MAD_TO_STD * mad, 1e-12)
        return (loss - median) / spread

    def is_spike(self, loss: float) -> bool:
        z = self.z_score(loss)
        if z is None:
            return False
        median = float(np.median(self.history))
        return z > self.config.z_threshold and \
            loss > median * (1.0 + self.config.min_relative_increase)

    def gate(self, loss: float, grad_norm: float) -> str | None:
        """train_step's gate: skip the update of a spike step (when configured to)."""
        if self.config is not None and self.config.skip_update and self.is_spike(loss):
            return "loss_spike"
        return None

    def record(self, step: int, loss: float, skip_reason: str | None) -> str | None:
        """Account for step `step` (as logged); returns why it was bad ("nonfinite",
        "loss_spike") or None. Only good steps' losses enter the reference window."""
        bad = skip_reason
        if bad is None and math.isfinite(loss) and self.is_spike(loss):
            bad = "loss_spike"  # detected, but its update applied (spike.skip_update false)
        if bad is None:
            self.streak, self.streak_start = 0, None
            if self.config is not None:
                self.history = (self.history + [loss])[-self.config.window_steps:]
            return None
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        return bad

    def reference(self) -> dict:
        """The window's median and spread, for event lines."""
        if not self.history:
            return {}
        median = float(np.median(self.history))
        mad = float(np.median(np.abs(np.asarray(self.history) - median)))
        return {"median_loss": median, "loss_spread": MAD_TO_STD * mad}

    def state_dict(self) -> dict:
        return {"history": list(self.history), "streak": self.streak,
                "streak_start": self.streak_start}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.streak, self.streak_start = int(state["streak"]), state["streak_start"]

    def restore_reference(self, state: dict) -> None:
        """After a rollback: the window of the checkpoint rolled back to, and no streak."""
        self.history = list(state["history"])
        self.streak, self.streak_start = 0, None


class Recovery:
    """Rollbacks so far and the LR cool-down they put in place."""

    def __init__(self, config: RollbackConfig | None):
        self.config = config
        self.rollbacks = 0
        self.cooldown_from = 0
        """Step number (as logged) of the first update with the LR cut."""
        self.cooldown_until = 0
        """Step number (as logged) from which the LR is no longer cut."""
        self.cooldown_factor = 1.0

    def due(self, detector: SpikeDetector) -> bool:
        return self.config is not None and detector.streak >= self.config.after_bad_steps

    @property
    def budget_left(self) -> int:
        return self.config.max_rollbacks - self.rollbacks

    def lr_factor(self, step: int) -> float:
        """Multiplier of the scheduled LR for the update logged as `step`."""
        return self.cooldown_factor if self.cooldown_from <= step < self.cooldown_until else 1.0

    def start_cooldown(self, step: int) -> None:
        """Count a rollback made after `step`; a rollback during a cool-down cuts again."""
        cfg = self.config
        already = self.lr_factor(step + 1)
        self.rollbacks += 1
        self.cooldown_factor = already * cfg.lr_factor
        self.cooldown_from, self.cooldown_until = step + 1, step + 1 + cfg.cooldown_steps

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks, "cooldown_from": self.cooldown_from,
                "cooldown_until": self.cooldown_until,
                "cooldown_factor": self.cooldown_factor}

    def load_state_dict(self, state: dict) -> None:
        self.rollbacks = int(state["rollbacks"])
        self.cooldown_from = int(state["cooldown_from"])
        self.cooldown_until = int(state["cooldown_until"])
        self.cooldown_factor = float(state["cooldown_factor"])
