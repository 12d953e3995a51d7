"""The trainer's state, registered once: every stateful part of a run (model, optimizer, EMA,
loss scaler, loader, clipping window, spike detector, recovery, health monitor, telemetry
windows, RNG, counters) is registered under a name, and saving, resuming and rolling back
iterate the registry (torchtitan's `CheckpointManager(states=...)` is the model). Adding a
stateful part is one `register` call; the checkpoint layer decides where each part is kept
(a module in NAME.safetensors, an optimizer in NAME.pt, the rest in state.pt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from helox.checkpoint import Restored, has_part, load_part
from helox.errors import HeloxError


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


Rollback = bool | Callable[[Any], None]
"""What a rollback does with a part: True restores it from the checkpoint, False keeps its
live state (the data position moves on, the counters keep counting), a function receives the
saved state and restores what it chooses."""


@dataclass
class Entry:
    part: Any
    """A torch module, a torch optimizer, or anything `Stateful`."""
    rollback: Rollback
    required: bool
    """A checkpoint without it cannot be resumed; an optional part (one a config switch may
    add on resume, such as telemetry) keeps its fresh state instead."""
    per_rank: bool = False
    """Each rank of a multi-process job keeps its own (its RNGs, its loader position)."""


class ValueState:
    """A `Stateful` over a getter and a setter: the global RNGs, a counter another object
    keeps (the EMA's number of updates)."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]):
        self._get, self._set = get, set

    def state_dict(self) -> Any:
        return self._get()

    def load_state_dict(self, state: Any) -> None:
        self._set(state)


@dataclass
class Counters:
    """The loop's own counters."""

    step: int = 0
    """Optimizer steps done (as metrics.jsonl numbers them)."""
    skipped_steps: int = 0
    """Steps whose update was skipped (NaN/Inf, loss spike)."""

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped_steps = int(state["step"]), int(state["skipped_steps"])


class TrainerState:
    """Name → part, in registration order (the order parts are saved and restored)."""

    def __init__(self):
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, part: Any, *, rollback: Rollback = False,
                 required: bool = True, per_rank: bool = False) -> None:
        if name in self._entries:
            raise ValueError(f"trainer state {name!r} is registered twice")
        self._entries[name] = Entry(part, rollback, required, per_rank)

    def names(self) -> list[str]:
        return list(self._entries)

    def parts(self) -> dict[str, Any]:
        """What a checkpoint saves: every registered part by name."""
        return {name: entry.part for name, entry in self._entries.items()}

    def per_rank(self) -> set[str]:
        """The parts each rank of a multi-process job saves for itself."""
        return {name for name, entry in self._entries.items() if entry.per_rank}

    def restore(self, restored: Restored, *, rollback: bool = False) -> None:
        """Every part from the checkpoint (a resume), or with `rollback` the parts whose
        `rollback` says so. A required part the checkpoint lacks is an error naming it."""
        model = self._entries["model"].part if "model" in self._entries else None
        for name, entry in self._entries.items():
            if rollback and entry.rollback is False:
                continue
            if not has_part(restored, name, entry.part):
                if entry.required:
                    raise HeloxError(f"{restored.path} holds no state for {name!r}, which this "
                                     "run needs to resume exactly",
                                     hint="resume with the config the checkpoint was trained "
                                          "with, or start a new run from its weights with "
                                          "train.init_from")
                continue
            if rollback and callable(entry.rollback):
                entry.rollback(restored.state[name])
            else:
                load_part(restored, name, entry.part, model)
