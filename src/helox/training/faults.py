"""Faults injected on purpose, for tests and for operators rehearsing the runbook
(docs/runbooks.md): NaN losses, loss spikes, corrupted batches, a crash halfway through a save.

The injector wraps the training loss function and the batch source from outside, so the step
itself (`train_step`) and the loop carry no test machinery; without faults configured nothing
is wrapped.

Legend: K 2 (inputs, targets), N sequences, T sequence length.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field

from helox.configbase import StrictModel
from helox.data.loader import MicroBatch, StepBatch
from helox.errors import HeloxError
from helox.fileio import fsync_path


class FaultConfig(StrictModel):
    """Faults injected on purpose, for tests and for operators rehearsing the runbook. Steps
    are numbered as in metrics.jsonl (the update logged as step k). Each list also reads an
    environment variable (HELOX_FAULT_NAN_AT=5,9 and so on). Not part of the trajectory, so
    they may change on resume."""

    nan_loss_at_steps: list[int] = []
    """Make the loss (and so every gradient) NaN at these steps (HELOX_FAULT_NAN_AT)."""
    spike_at_steps: list[int] = []
    """Multiply the loss (and so every gradient) by spike_factor at these steps
    (HELOX_FAULT_SPIKE_AT)."""
    spike_factor: float = Field(default=10.0, gt=0)
    """How large an injected spike is."""
    corrupt_batch_at_steps: list[int] = []
    """Replace the batch's tokens with uniformly random ones at these steps, as a corrupted
    shard would (HELOX_FAULT_CORRUPT_AT)."""
    crash_during_save_at_step: int | None = Field(default=None, gt=0)
    """Kill the process (as `kill -9` would) halfway through writing this step's checkpoint
    (HELOX_FAULT_CRASH_SAVE_AT)."""
    kill_at_step: int | None = Field(default=None, gt=0)
    """Kill the process (as `kill -9` would) right after this step's update, once per run
    folder: a marker file in the run folder records it, so the resumed run goes past it
    (HELOX_FAULT_KILL_AT)."""
    ranks: list[int] | None = None
    """The ranks of a multi-process job these faults hit (None: every rank), e.g. [1] for a
    spike in one rank's data or the death of one rank (HELOX_FAULT_RANKS=1)."""

    def nan_steps(self) -> set[int]:
        return self._steps(self.nan_loss_at_steps, "HELOX_FAULT_NAN_AT")

    def spike_steps(self) -> set[int]:
        return self._steps(self.spike_at_steps, "HELOX_FAULT_SPIKE_AT")

    def corrupt_steps(self) -> set[int]:
        return self._steps(self.corrupt_batch_at_steps, "HELOX_FAULT_CORRUPT_AT")

    def crash_save_steps(self) -> set[int]:
        listed = [self.crash_during_save_at_step] if self.crash_during_save_at_step else []
        return self._steps(listed, "HELOX_FAULT_CRASH_SAVE_AT")

    def kill_steps(self) -> set[int]:
        return self._steps([self.kill_at_step] if self.kill_at_step else [],
                           "HELOX_FAULT_KILL_AT")

    def hits(self, rank: int) -> bool:
        """Whether the faults apply on `rank`."""
        ranks = self._steps(self.ranks or [], "HELOX_FAULT_RANKS")
        return not ranks or rank in ranks

    @staticmethod
    def _steps(listed: list[int], variable: str) -> set[int]:
        raw = os.environ.get(variable, "")
        try:
            return set(listed) | {int(part) for part in raw.split(",") if part.strip()}
        except ValueError:
            raise HeloxError(f"{variable}={raw!r} is not a list of step numbers",
                             hint=f"set it like {variable}=5,9, or unset it") from None


class FaultInjector:
    """The faults of a `FaultConfig`, applied by wrapping. `batches` wraps the loader's
    `next_step` (it also learns which step is being trained: metrics.jsonl numbers the update
    of batch `step` as step + 1); `loss_fn` wraps the training loss function, scaling every
    objective's sum by NaN or the spike factor on the chosen steps, as a bad batch would."""

    def __init__(self, config: FaultConfig, vocab_size: int, seed: int, rank: int = 0,
                 run_dir: Path | None = None):
        hits = config.hits(rank)
        self.nan_steps, self.spike_steps = (config.nan_steps(), config.spike_steps()) \
            if hits else (set(), set())
        self.corrupt_steps = config.corrupt_steps() if hits else set()
        self.crash_save_steps = config.crash_save_steps() if hits else set()
        self.kill_steps = config.kill_steps() if hits else set()
        self.run_dir = run_dir
        self.spike_factor, self.vocab_size, self.seed = config.spike_factor, vocab_size, seed
        self.number = 0
        """The step (as metrics.jsonl counts it) whose batch was drawn last."""

    @property
    def active(self) -> bool:
        return bool(self.nan_steps or self.spike_steps or self.corrupt_steps)

    def batches(self, next_step: Callable[[], StepBatch]) -> Callable[[], StepBatch]:
        def next_batch() -> StepBatch:
            batch = next_step()
            self.number = batch.step + 1
            if self.number in self.corrupt_steps:
                return corrupted(batch, self.vocab_size, self.seed)
            return batch
        return next_batch

    def loss_fn(self, loss_fn: Callable[[MicroBatch], dict[str, torch.Tensor]],
                ) -> Callable[[MicroBatch], dict[str, torch.Tensor]]:
        def faulty(batch: MicroBatch) -> dict[str, torch.Tensor]:
            sums = loss_fn(batch)
            if self.number in self.nan_steps:
                return {name: value * float("nan") for name, value in sums.items()}
            if self.number in self.spike_steps:
                return {name: value * self.spike_factor for name, value in sums.items()}
            return sums
        return faulty

    def crash_during_save(self, step: int) -> bool:
        return step in self.crash_save_steps

    def kill_if_due(self, step: int) -> None:
        """SIGKILL this process after update `step` if asked, once per run folder."""
        if step not in self.kill_steps or self.run_dir is None:
            return
        marker = self.run_dir / f".fault-killed-at-{step}"
        if marker.exists():
            return
        marker.write_text("")
        fsync_path(marker)
        os.kill(os.getpid(), signal.SIGKILL)


def corrupted(batch: StepBatch, vocab_size: int, seed: int) -> StepBatch:
    """The batch with uniformly random tokens (a corrupted shard)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch.step)
    tokens_KNT = batch.tokens_KNT.clone()
    rows, length = tokens_KNT.shape[1:]
    random_NT1 = torch.randint(0, vocab_size, (rows, length + 1), generator=generator)
    tokens_KNT[0], tokens_KNT[1] = random_NT1[:, :-1], random_NT1[:, 1:]
    return StepBatch(batch.step, batch.seq_len, tokens_KNT, batch.domains, batch.state)
