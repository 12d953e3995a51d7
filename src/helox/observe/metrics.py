"""RUN_DIR/metrics.jsonl (one JSON object per line) and the step progress display."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


WALL_CLOCK_FIELDS = frozenset({"tokens_per_s", "mfu", "memory_peak_mib", "checkpoint_stall_s"})
"""Metrics that measure the machine, not the run: they differ between identical runs."""


def without_wall_clock(record: dict) -> dict:
    """The record without WALL_CLOCK_FIELDS: what must match between a run and its resume."""
    return {k: v for k, v in record.items() if k not in WALL_CLOCK_FIELDS}


class MetricsLog:
    """Append-only JSON lines, flushed per line so a crash loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def truncate_after_step(path: Path, step: int) -> None:
    """Drop records of steps after `step` (written before a crash, redone after resume)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepProgress:
    """A rich progress bar on a terminal; a plain line every ~5% of the run in logs."""

    def __init__(self, console: Console, total_steps: int, start_step: int):
        self.console, self.total = console, total_steps
        self.every = max(1, total_steps // 20)
        self._bar = None
        if console.is_terminal:
            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=console)
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step,
                                            info="")

    def __enter__(self) -> StepProgress:
        if self._bar:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar:
            self._bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float, val_loss: float | None) -> None:
        info = f"loss {loss:.3f}  {tokens_per_s:,.0f} tok/s"
        if val_loss is not None and math.isfinite(val_loss):
            info += f"  val {val_loss:.3f}"
        if self._bar:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            self.console.print(f"step {step}/{self.total}  {info}")
