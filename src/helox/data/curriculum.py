"""Curriculum: what the loader feeds at each optimizer step, as a pure function of the step.

Three schedules, each a list of stages `{from_step: k, ...}` that take effect once k optimizer
steps are complete (the first update using a stage is logged as step k + 1; before the first
stage the defaults of `train` apply):
  seq_len     sequence length. A stored block holds train.seq_len + 1 tokens; a shorter length
              cuts each block into train.seq_len / seq_len sequences, so the tokens per step and
              the data order do not change with the length (Composer's SeqLengthWarmup without
              truncation). Every length must divide train.seq_len.
  batch_size  blocks (sequences of train.seq_len) per optimizer step over all ranks; the full
              batch is train.micro_batch_size * train.grad_accum_steps. The learning rate follows
              `lr_batch_scaling`: lr = schedule(step) * (batch / full batch) ** p with p = 0
              (`none`: GPT-3 ramps the batch under an unchanged LR schedule), 0.5 (`sqrt`: the
              square-root rule for Adam, Malladi et al. 2022) or 1 (`linear`: Goyal et al. 2017,
              for SGD).
  inject      a domain, or another prepared dataset, mixed in from a step with a fixed share of
              the sequences; the other domains share the rest in their own proportions.
Being pure, the curriculum needs no checkpoint state: the step the checkpoint holds is enough.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Literal

from pydantic import Field, model_validator

from helox.configbase import StrictModel


class LengthStage(StrictModel):
    from_step: int = Field(ge=0)
    """Optimizer steps completed before this stage starts."""
    value: int = Field(gt=0)
    """Sequence length in tokens; must divide train.seq_len."""


class BatchStage(StrictModel):
    from_step: int = Field(ge=0)
    """Optimizer steps completed before this stage starts."""
    value: int = Field(gt=0)
    """Sequences of train.seq_len per optimizer step, over all ranks."""


class InjectionStage(StrictModel):
    from_step: int = Field(ge=0)
    """Optimizer steps completed before the data is mixed in."""
    domain: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    """A domain of the training split (for example a synthetic task's domain)..."""
    dataset: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    """...or another prepared dataset of the workspace, by name (its head version) or version
    id; it must use the run's tokenizer. Its training split becomes one stream of that name."""
    weight: float = Field(gt=0, lt=1)
    """Share of the sequences drawn from it once it is mixed in."""

    @model_validator(mode="after")
    def _one_source(self) -> InjectionStage:
        if (self.domain is None) == (self.dataset is None):
            raise ValueError("give exactly one of `domain` or `dataset`")
        return self

    @property
    def stream(self) -> str:
        """The stream it feeds: the domain, or the dataset as written."""
        return self.domain or self.dataset


class CurriculumConfig(StrictModel):
    seq_len: list[LengthStage] = []
    """Sequence-length stages, e.g. [{from_step: 0, value: 64}, {from_step: 200, value: 256}]."""
    batch_size: list[BatchStage] = []
    """Batch-size stages in sequences per step; absent means the full batch throughout."""
    lr_batch_scaling: Literal["none", "sqrt", "linear"] = "none"
    """How the LR follows a smaller batch: unchanged, by its square root, or linearly."""
    inject: list[InjectionStage] = []
    """Domains mixed in from a given step with a fixed share."""

    @model_validator(mode="after")
    def _ordered(self) -> CurriculumConfig:
        for name in ("seq_len", "batch_size"):
            steps = [stage.from_step for stage in getattr(self, name)]
            if steps != sorted(set(steps)):
                raise ValueError(f"{name} stages must have strictly increasing from_step, got "
                                 f"{steps}")
        streams = [stage.stream for stage in self.inject]
        if len(streams) != len(set(streams)):
            raise ValueError(f"a domain or dataset is injected twice: {streams}")
        if sum(stage.weight for stage in self.inject) >= 1:
            raise ValueError("injected weights must sum to less than 1, leaving room for the "
                             "other domains")
        return self

    def problems(self, block_len: int, full_batch: int, world_size: int = 1) -> list[str]:
        """What does not fit the training shape (checked where train.* is known)."""
        found = []
        for stage in self.seq_len:
            if block_len % stage.value:
                found.append(f"seq_len stage at step {stage.from_step}: {stage.value} does not "
                             f"divide train.seq_len {block_len}")
        for stage in self.batch_size:
            if stage.value > full_batch:
                found.append(f"batch_size stage at step {stage.from_step}: {stage.value} exceeds "
                             f"the full batch {full_batch} (micro_batch_size × grad_accum_steps)")
            if stage.value % world_size:
                found.append(f"batch_size stage at step {stage.from_step}: {stage.value} is not "
                             f"a multiple of the world size {world_size}")
        if full_batch % world_size:
            found.append(f"the full batch {full_batch} is not a multiple of the world size "
                         f"{world_size}")
        return found


class Curriculum:
    """The schedules of a CurriculumConfig, evaluated at a step (0-based: completed steps)."""

    _SCALING_POWER = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}

    def __init__(self, config: CurriculumConfig, block_len: int, full_batch: int):
        self.config, self.block_len, self.full_batch = config, block_len, full_batch
        self._len_steps = [s.from_step for s in config.seq_len]
        self._batch_steps = [s.from_step for s in config.batch_size]

    def seq_len(self, step: int) -> int:
        index = bisect_right(self._len_steps, step) - 1
        return self.config.seq_len[index].value if index >= 0 else self.block_len

    def batch_blocks(self, step: int) -> int:
        index = bisect_right(self._batch_steps, step) - 1
        return self.config.batch_size[index].value if index >= 0 else self.full_batch

    def lr_factor(self, step: int) -> float:
        power = self._SCALING_POWER[self.config.lr_batch_scaling]
        return (self.batch_blocks(step) / self.full_batch) ** power

    def injected(self, step: int) -> dict[str, float]:
        """Streams (domains or datasets) mixed in at `step` and their shares."""
        return {s.stream: s.weight for s in self.config.inject if step >= s.from_step}

    def tokens_before(self, step: int) -> int:
        """Training tokens (inputs) consumed by the updates before `step`."""
        total, previous = 0, 0
        for stage_step in [*self._batch_steps, step]:
            stage_step = min(stage_step, step)
            if stage_step > previous:
                total += (stage_step - previous) * self.batch_blocks(previous)
                previous = stage_step
        return total * self.block_len
