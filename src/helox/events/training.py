"""A training run's events on the training stream: started, progress, checkpoint-saved, and how
it ended. The loop opens one on its main rank (`open_training_events`) and calls it where
each thing happens; this module knows nothing of the loop, it takes plain values.

Every event carries `run_name`, `run_dir` and `run_fingerprint`, and the fingerprint is its
`correlation_id`: the same as in RUN_DIR/run.json and in every checkpoint the run writes, so
the registry's model events about a checkpoint can carry the run's correlation id too.

How a run ends, on the wire:
- it reached train.max_steps: `training-complete`, after the final `checkpoint-saved`;
- it raised (a diverged run stopped by its rollback budget, a bad batch, Ctrl-C twice):
  `training-failed` with the error's type and message;
- it stopped early on purpose, resumable (SIGTERM/SIGINT preemption, `--until-step`): a last
  `training-progress` with `stopped_by` (`SIGTERM`, `SIGINT`, `until_step`) and the
  checkpoint it resumes from, and no complete event: the run is not finished, and its
  resumption publishes `training-started` again with `resumed_from_step`.

A checkpoint is announced once it is on disk: with asynchronous saves, when its folder
appears (polled each step) or when the writer has waited for it, never when it is handed to
the writer. Publishing never raises into training: an event that cannot be stored is warned
about once and the run's events stop there, as a failing metrics sink is disabled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from helox.events.config import EventsConfig
from helox.events.publisher import Publisher, open_publisher

MAX_MESSAGE_CHARS = 2000
"""An error message longer than this is cut (a stream entry is not a log)."""


class TrainingEvents:
    """The events of one training run (one process: the main rank)."""

    def __init__(self, publisher: Publisher, run: Mapping[str, Any], correlation_id: str,
                 progress_every_steps: int, warn: Callable[[str], None]):
        self._publisher: Publisher | None = publisher
        self._run = dict(run)
        self._correlation_id = correlation_id
        self._every = progress_every_steps
        self._warn = warn
        self._unannounced: list[tuple[int, Path, float | None]] = []
        """Checkpoints handed to the writer and not yet published: (step, folder, val_loss)."""

    def started(self, step: int, max_steps: int, resumed_from_step: int | None,
                dataset_version: str, config_hash: str) -> None:
        self._publish("training-started", step=step, max_steps=max_steps,
                      resumed_from_step=resumed_from_step, dataset_version=dataset_version,
                      config_hash=config_hash)

    def progress(self, step: int, loss: float, tokens_per_s: float | None = None) -> None:
        """training-progress, when `step` is a multiple of events.progress_every_steps."""
        if self._every and step % self._every == 0:
            self._publish("training-progress", step=step, loss=loss, tokens_per_s=tokens_per_s)

    def checkpoint_saving(self, step: int, path: Path, val_loss: float | None) -> None:
        """The writer took checkpoint `path`. It waited for the previous save first, so those
        are on disk: they are announced now, and this one once its folder exists."""
        self.checkpoints_written()
        self._unannounced.append((step, Path(path), val_loss))
        self.checkpoints_on_disk()

    def checkpoints_on_disk(self) -> None:
        """Announce the checkpoints whose folder is in place (renamed there once complete)."""
        while self._unannounced and self._unannounced[0][1].is_dir():
            self._announce(*self._unannounced.pop(0))

    def checkpoints_written(self) -> None:
        """Announce every checkpoint handed to the writer: it has finished them (called after
        the writer's wait or close returned without an error)."""
        while self._unannounced:
            self._announce(*self._unannounced.pop(0))

    def complete(self, step: int, loss: float | None, val_loss: float | None,
                 checkpoint: Path | None) -> None:
        self._publish("training-complete", step=step, loss=loss, val_loss=val_loss,
                      checkpoint_path=_absolute(checkpoint))

    def stopped(self, step: int, stopped_by: str, loss: float | None,
                checkpoint: Path | None) -> None:
        """A resumable early stop: a last training-progress saying why (module docstring)."""
        self._publish("training-progress", step=step, loss=loss, stopped_by=stopped_by,
                      checkpoint_path=_absolute(checkpoint))

    def failed(self, step: int, error: BaseException) -> None:
        self._publish("training-failed", step=step, error_type=type(error).__name__,
                      error_message=str(error)[:MAX_MESSAGE_CHARS])

    def close(self, timeout_s: float | None = None) -> int:
        """Deliver what is queued within events.close_timeout_s (or `timeout_s`); returns how
        many events still wait in the outbox for the next publisher or drain."""
        publisher, self._publisher = self._publisher, None
        if publisher is None:
            return 0
        try:
            return publisher.close(timeout_s)
        except Exception as exc:  # the outbox went bad at the very end: say so, go on
            self._warn(f"events: closing the publisher failed ({type(exc).__name__}: {exc})")
            return 0

    def _announce(self, step: int, path: Path, val_loss: float | None) -> None:
        self._publish("checkpoint-saved", step=step, checkpoint_path=_absolute(path),
                      val_loss=val_loss)

    def _publish(self, event: str, **fields: Any) -> None:
        if self._publisher is None:
            return
        try:
            self._publisher.publish("training", event, {**self._run, **fields},
                                    self._correlation_id)
        except Exception as exc:  # the outbox (disk full, locked): never stop training
            self._warn(f"events: {event} could not be stored ({type(exc).__name__}: {exc}); "
                       "this run publishes no more events, training goes on")
            publisher, self._publisher = self._publisher, None
            try:
                publisher.close(timeout_s=0)
            except Exception:  # already failing; the warning above says so
                pass


def open_training_events(config: EventsConfig, workspace: Path, run_name: str, run_dir: Path,
                         run_fingerprint: str, warn: Callable[[str], None]) -> TrainingEvents:
    """The run's events, published to the workspace's outbox (and Redis when configured).
    Raises a HeloxError when the outbox cannot be opened or the redis package is missing."""
    publisher = open_publisher(config, workspace, warn)
    run = {"run_name": run_name, "run_dir": _absolute(run_dir), "run_fingerprint": run_fingerprint}
    return TrainingEvents(publisher, run, run_fingerprint, config.progress_every_steps, warn)


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
