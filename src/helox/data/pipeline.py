"""Running data steps: generators in, generators out, every drop counted with its reason.

A step is an object with
    name: str                                   label in the report ("quality", "near_dedup")
    scope: "document" | "corpus"                document steps look at one document at a time;
                                                corpus steps (dedup) need to see every document
    run(docs, stats) -> Iterator[Document]      yields the documents it keeps (possibly changed)
and is built from its typed config by `config.build()`. A step calls `stats.drop(doc, reason)`
for every document it does not yield and `stats.change(reason, n)` when it edits text; the
runner counts documents in and out, times each step, and checks that in = out + dropped.

With `num_workers > 1`, each maximal run of document steps runs in a process pool over batches
of documents (`imap`, so the order and therefore the dataset version do not depend on the number
of workers); corpus steps run in this process over the merged, ordered stream.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

from helox.data.document import Document

MAX_EXAMPLES_PER_REASON = 20
WORKER_BATCH_DOCUMENTS = 256


class Step(Protocol):
    name: str
    scope: str

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]: ...


class StepConfig(Protocol):
    def build(self) -> Step: ...


@dataclass(frozen=True)
class Removal:
    """One document a step dropped: enough to find it in the sources and to audit why."""

    doc_id: str
    source: str
    step: str
    reason: str
    detail: str = ""


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    """Documents removed, by reason."""
    changed: Counter = field(default_factory=Counter)
    """Edits made to kept documents, by reason (e.g. emails replaced); counts items, not docs."""
    removals: list[Removal] = field(default_factory=list)
    seconds: float = 0.0
    """Time spent inside this step (upstream steps excluded), summed over worker processes."""

    def drop(self, doc: Document, reason: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        self.removals.append(Removal(doc.id, doc.source, self.name, reason, detail))

    def change(self, reason: str, count: int = 1) -> None:
        self.changed[reason] += count

    def merge(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.dropped.update(other.dropped)
        self.changed.update(other.changed)
        self.removals.extend(other.removals)
        self.seconds += other.seconds

    def check_balance(self) -> None:
        """A step that loses a document without saying why is a bug, not a statistic."""
        accounted = self.docs_out + sum(self.dropped.values())
        if accounted != self.docs_in:
            raise RuntimeError(f"data step '{self.name}' took {self.docs_in} documents but "
                               f"yielded {self.docs_out} and dropped {sum(self.dropped.values())}")

    def summary(self) -> dict[str, Any]:
        """JSON form for the report (the full removal list is written separately)."""
        return {"step": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out,
                "dropped": dict(sorted(self.dropped.items())),
                "changed": dict(sorted(self.changed.items())),
                "seconds": round(self.seconds, 3)}


def run_steps(docs: Iterable[Document], steps: list[Step],
              stats: list[StepStats]) -> Iterator[Document]:
    """Chain `steps` in this process; `stats[i]` receives step i's counts and self time."""
    stream: Iterable[Document] = docs
    inclusive = [0.0] * len(steps)
    for i, step in enumerate(steps):
        stream = _timed(step.run(_counted_in(stream, stats[i]), stats[i]), stats[i],
                        inclusive, i)
    yield from stream
    for i, step_stats in enumerate(stats):
        # A step's own time is its inclusive time minus the time spent pulling from upstream.
        step_stats.seconds += inclusive[i] - (inclusive[i - 1] if i else 0.0)
        step_stats.check_balance()


def _counted_in(docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
    for doc in docs:
        stats.docs_in += 1
        yield doc


def _timed(docs: Iterator[Document], stats: StepStats, inclusive: list[float],
           index: int) -> Iterator[Document]:
    while True:
        start = time.perf_counter()
        try:
            doc = next(docs)
        except StopIteration:
            inclusive[index] += time.perf_counter() - start
            return
        inclusive[index] += time.perf_counter() - start
        stats.docs_out += 1
        yield doc


def run_pipeline(docs: Iterable[Document], configs: list[StepConfig], num_workers: int = 1,
                 on_document: Callable[[int], None] | None = None
                 ) -> tuple[Iterator[Document], list[StepStats]]:
    """Build the steps of `configs` and stream `docs` through them.

    Returns the output stream and one StepStats per step, filled as the stream is consumed.
    `on_document(n)` is called with the number of documents read so far (for progress bars).
    """
    stats = [StepStats(_step_name(c)) for c in configs]
    stream: Iterable[Document] = _reporting(docs, on_document) if on_document else docs
    start = 0
    for end in range(len(configs) + 1):
        if end < len(configs) and _scope(configs[end]) == "document":
            continue
        if start < end:  # a run of document steps [start, end)
            stream = _document_segment(stream, configs[start:end], stats[start:end],
                                       num_workers)
        if end < len(configs):
            stream = run_steps(stream, [configs[end].build()], [stats[end]])
        start = end + 1
    return iter(stream), stats


def _step_name(config: StepConfig) -> str:
    return getattr(config, "step")


def _scope(config: StepConfig) -> str:
    return getattr(config, "scope", "document")


def _reporting(docs: Iterable[Document], on_document: Callable[[int], None]
               ) -> Iterator[Document]:
    for done, doc in enumerate(docs, start=1):
        if done % WORKER_BATCH_DOCUMENTS == 0:
            on_document(done)
        yield doc


def _document_segment(docs: Iterable[Document], configs: list[StepConfig],
                      stats: list[StepStats], num_workers: int) -> Iterator[Document]:
    if num_workers <= 1:
        yield from run_steps(docs, [c.build() for c in configs], stats)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=_init_worker, initargs=(configs,)) as pool:
        for kept, batch_stats in pool.imap(_run_batch, _batches(docs, WORKER_BATCH_DOCUMENTS)):
            for total, part in zip(stats, batch_stats):
                total.merge(part)
            yield from kept


_worker_steps: list[Step] = []


def _init_worker(configs: list[StepConfig]) -> None:
    _worker_steps[:] = [c.build() for c in configs]


def _run_batch(batch: list[Document]) -> tuple[list[Document], list[StepStats]]:
    stats = [StepStats(step.name) for step in _worker_steps]
    return list(run_steps(batch, _worker_steps, stats)), stats


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
