"""The evaluation section of a recipe: the suite the training loop runs."""

from __future__ import annotations

from pydantic import Field

from helox.configbase import StrictModel


class EvaluationConfig(StrictModel):
    """The eval harness run from the training loop (helox.eval); `helox eval` runs it on a
    finished model."""

    suite: str | None = None
    """A bundled suite's name (quickstart, long-context) or a suite.yaml path; None runs none
    during training."""
    every_steps: int = Field(default=0, ge=0)
    """Run it every this many steps and at the last step; 0 never."""
    tasks: list[str] = []
    """Only these tasks of the suite (a fast subset); empty runs them all."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per forward of the harness."""
