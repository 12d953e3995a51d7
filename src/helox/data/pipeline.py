"""Running data steps: generators in, generators out, every drop counted with its reason.

A step is an object with
    name: str                                   label in the report ("quality", "near_dedup")
    scope: "document" | "corpus"                document steps look at one document at a time;
                                                corpus steps (dedup) need to see every document
    run(docs, stats) -> Iterator[Document]      yields the documents it keeps (possibly changed)
and is built from its typed config by `config.build()`. A step calls `stats.drop(doc, reason)`
for every document it does not yield and `stats.change(reason, n)` when it edits text; the
runner counts documents in and out, times each step, and checks that in = out + dropped.

With `num_workers > 1`, each maximal run of document steps runs in one process pool (started
once per pipeline) over batches of documents (`imap`, so the order and therefore the dataset
version do not depend on the number of workers); corpus steps run in this process over the
merged, ordered stream.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

from helox.data.document import Document

MAX_EXAMPLES_PER_REASON = 20
WORKER_BATCH_DOCUMENTS = 256
clock: Callable[[], float] = time.perf_counter
"""Where step times are read; tests replace it with a fake clock to check the arithmetic
without timing real work."""
T = TypeVar("T")


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
    """Chain `steps` in this process; `stats[i]` receives step i's counts and self time.

    A step's own time is the time inside its next() minus the time it spends pulling from
    upstream, whatever the upstream is (another step, a worker pool, a reader).
    """
    stream: Iterable[Document] = docs
    meters = [(_Meter(), _Meter()) for _ in steps]  # (pulled from upstream, yielded)
    for step, step_stats, (pulled, yielded) in zip(steps, stats, meters):
        stream = _metered(step.run(_metered(iter(stream), pulled), step_stats), yielded)
    yield from stream
    for step_stats, (pulled, yielded) in zip(stats, meters):
        step_stats.docs_in += pulled.count
        step_stats.docs_out += yielded.count
        step_stats.seconds += yielded.seconds - pulled.seconds
        step_stats.check_balance()


@dataclass
class _Meter:
    count: int = 0
    seconds: float = 0.0


def _metered(docs: Iterator[Document], meter: _Meter) -> Iterator[Document]:
    """Yield from `docs`, counting them and the time spent inside each next()."""
    while True:
        start = clock()
        try:
            doc = next(docs)
        except StopIteration:
            meter.seconds += clock() - start
            return
        meter.seconds += clock() - start
        meter.count += 1
        yield doc


def run_pipeline(docs: Iterable[Document], configs: list[StepConfig], num_workers: int = 1,
                 on_document: Callable[[int], None] | None = None
                 ) -> tuple[Iterator[Document], list[StepStats]]:
    """Build the steps of `configs` and stream `docs` through them.

    Returns the output stream and one StepStats per step, filled as the stream is consumed.
    `on_document(n)` is called with the number of documents read so far (for progress bars).
    """
    stats = [StepStats(_step_name(c)) for c in configs]
    stream: Iterable[Document] = reporting(docs, on_document) if on_document else docs
    return _stream(stream, configs, stats, num_workers), stats


def _stream(docs: Iterable[Document], configs: list[StepConfig], stats: list[StepStats],
            num_workers: int) -> Iterator[Document]:
    """Chain the segments; one process pool (started once) serves every document segment."""
    segments = _segments(configs)
    parallel = num_workers > 1 and any(scope == "document" for _, _, scope in segments)
    pool = multiprocessing.get_context("spawn").Pool(
        num_workers, initializer=_init_worker, initargs=(configs,)) if parallel else None
    try:
        stream: Iterable[Document] = docs
        for start, end, scope in segments:
            if pool is not None and scope == "document":
                stream = _pooled(pool, stream, start, end, stats[start:end],
                                 window=2 * num_workers + 1)
            else:
                stream = run_steps(stream, [c.build() for c in configs[start:end]],
                                   stats[start:end])
        yield from stream
    finally:
        if pool is not None:
            pool.terminate()


def _segments(configs: list[StepConfig]) -> list[tuple[int, int, str]]:
    """Maximal runs of document steps, and each corpus step on its own: (start, end, scope)."""
    segments: list[tuple[int, int, str]] = []
    for i, config in enumerate(configs):
        scope = _scope(config)
        if scope == "document" and segments and segments[-1][2] == "document":
            segments[-1] = (segments[-1][0], i + 1, scope)
        else:
            segments.append((i, i + 1, scope))
    return segments


def _step_name(config: StepConfig) -> str:
    return getattr(config, "step")


def _scope(config: StepConfig) -> str:
    return getattr(config, "scope", "document")


def reporting(items: Iterable[T], on_count: Callable[[int], None],
              every: int = WORKER_BATCH_DOCUMENTS) -> Iterator[T]:
    """Yield `items`, calling `on_count(n)` every `every` items (drives progress displays)."""
    for done, item in enumerate(items, start=1):
        if done % every == 0:
            on_count(done)
        yield item


def _pooled(pool, docs: Iterable[Document], start: int, end: int, stats: list[StepStats],
            window: int) -> Iterator[Document]:
    """Batches to the pool, results back in order. Submitting from this (the consuming) thread,
    not through `imap`'s feeder thread, lets two segments share the pool: a feeder blocked on
    the upstream segment's results would starve that segment of workers."""
    pending: collections.deque = collections.deque()
    for batch in batched(docs, WORKER_BATCH_DOCUMENTS):
        pending.append(pool.apply_async(_run_batch, ((start, end, batch),)))
        if len(pending) >= window:
            yield from _collect(pending.popleft().get(), stats)
    while pending:
        yield from _collect(pending.popleft().get(), stats)


def _collect(result: tuple[list[Document], list[StepStats]],
             stats: list[StepStats]) -> list[Document]:
    kept, batch_stats = result
    for total, part in zip(stats, batch_stats):
        total.merge(part)
    return kept


_worker_steps: dict[int, Step] = {}


def _init_worker(configs: list[StepConfig]) -> None:
    _worker_steps.clear()
    _worker_steps.update({i: c.build() for i, c in enumerate(configs)
                          if _scope(c) == "document"})


def _run_batch(task: tuple[int, int, list[Document]]) -> tuple[list[Document], list[StepStats]]:
    start, end, batch = task
    steps = [_worker_steps[i] for i in range(start, end)]
    stats = [StepStats(step.name) for step in steps]
    return list(run_steps(batch, steps, stats)), stats


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` items (the last may be shorter); itertools.batched needs Python 3.12."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
