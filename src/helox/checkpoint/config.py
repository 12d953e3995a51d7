"""Checkpoint cadence and retention (the checkpoint section of a recipe)."""

from __future__ import annotations

from pydantic import Field

from helox.configbase import StrictModel


class CheckpointConfig(StrictModel):
    every_steps: int = Field(default=100, gt=0)
    """Save a checkpoint every this many steps (and always at the last step)."""
    every_minutes: float | None = Field(default=None, gt=0)
    """Also save when this many minutes of wall-clock time have passed since the last save
    (long steps, preemptible machines); None saves by steps only."""
    keep_last: int = Field(default=3, ge=1)
    """Keep this many newest checkpoints; older ones are deleted after a successful save."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest validation loss (checkpoints/best.json names
    it), whatever keep_last deletes."""
    async_save: bool = True
    """Write checkpoints from a background thread: the step only waits for the state to be
    copied to host memory, not for the disk. A save still in flight when the next one is due
    is waited for first, so at most one is being written."""
