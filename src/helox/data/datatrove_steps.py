"""Helox's data steps as datatrove `PipelineStep`s, for corpora that outgrow one machine.

`HeloxStep(config)` runs one entry of a recipe's `data.pipeline` inside a datatrove pipeline, so
datatrove's executors (local, Slurm, Ray) shard the corpus over tasks and its readers and
writers do the I/O, while the cleaning is exactly Helox's. Counts land in datatrove's stats
under its filter names (`total`, `forwarded`, `dropped`, `dropped_<reason>`) plus
`changed_<reason>` for edits. Needs the optional extra: `pip install 'helox[datatrove]'`.

    from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from helox.config import load_config
    from helox.data.datatrove_steps import helox_pipeline

    recipe = load_config("my_recipe.yaml")
    pipeline = [ParquetReader("s3://bucket/raw/"), *helox_pipeline(recipe.data.pipeline),
                ParquetWriter("s3://bucket/clean/")]
    LocalPipelineExecutor(pipeline, tasks=8, workers=2, logging_dir="logs/clean").run()
    # or, on a cluster:
    SlurmPipelineExecutor(pipeline, tasks=512, time="10:00:00", partition="cpu",
                          logging_dir="s3://bucket/logs/clean").run()

Corpus steps (exact_dedup, near_dedup, semantic_dedup) must see every document, which a task
holding one shard does not: they are refused when tasks > 1. Run them in a second executor with
tasks=1 (`depends=` the first), or use datatrove's own multi-task dedup stages instead.
datatrove's JSONL reader and writer need its `io` extra (orjson); Parquet needs only pyarrow.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict, deque
from typing import Callable, Iterator

from helox.data.document import Document
from helox.data.pipeline import StepConfig, StepStats, run_steps
from helox.data.sources import DEFAULT_DOMAIN
from helox.errors import HeloxError


class MissingExtraError(HeloxError, ImportError):
    """An optional extra is not installed: a HeloxError (clear message and fix) that callers
    probing for optional modules can still catch as ImportError."""


try:
    from datatrove.data import Document as DatatroveDocument
    from datatrove.data import DocumentsPipeline
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.writers.disk_base import DiskWriter
    from datatrove.utils.typeshelper import StatHints
except ImportError as exc:
    raise MissingExtraError("helox.data.datatrove_steps needs the optional package "
                            f"'datatrove', which could not be imported ({exc})",
                            hint="pip install 'helox[datatrove]'") from exc

DEFAULT_SOURCE = "datatrove"
"""Source of documents whose datatrove metadata names none."""
DATATROVE_DEDUP_STAGES = (
    "MinhashDedupSignature -> MinhashDedupBuckets -> MinhashDedupCluster -> MinhashDedupFilter "
    "(near duplicates) or ExactDedupSignature -> ExactFindDedups -> ExactDedupFilter (exact)")


class HeloxStep(PipelineStep):
    """One Helox data step (any config with `step`, `scope` and `build()`) as a datatrove step.

    The step is built inside `run`, i.e. once per task in the task's own process. Dropped
    documents go to `exclusion_writer` when given, as they entered the step, with the reason in
    `metadata["filter_reason"]` (datatrove's filter convention).
    """

    type = "🧹 - HELOX"

    def __init__(self, config: StepConfig, exclusion_writer: DiskWriter | None = None):
        if not callable(getattr(config, "build", None)) or not isinstance(
                getattr(config, "step", None), str):
            raise HeloxError(f"HeloxStep needs a Helox step config, got {type(config).__name__}",
                             hint="pass an entry of a recipe's data.pipeline, e.g. "
                                  "helox.data.filters.QualityConfig()")
        self.name = config.step  # before PipelineStep.__init__, which names the stats after it
        super().__init__()
        self.config = config
        self.exclusion_writer = exclusion_writer

    @property
    def scope(self) -> str:
        return getattr(self.config, "scope", "document")

    def run(self, data: DocumentsPipeline, rank: int = 0,
            world_size: int = 1) -> DocumentsPipeline:
        self._refuse_sharded_corpus_step(world_size)
        if data is None:
            return
        writer_context = (self.exclusion_writer if self.exclusion_writer is not None
                          else contextlib.nullcontext())
        with writer_context as writer:
            shard = _Shard(self, writer, rank)
            step = self.config.build()
            stats = _ForwardedStats(step.name, shard.on_drop, shard.on_change)
            kept = run_steps(shard.to_helox(data), [step], [stats])
            for doc in self._timed(kept, shard):
                out = shard.to_datatrove(doc)
                self.stat_update(StatHints.forwarded)
                self.update_doc_stats(out)
                yield out

    def _refuse_sharded_corpus_step(self, world_size: int) -> None:
        if self.scope == "corpus" and world_size > 1:
            raise HeloxError(
                f"data step '{self.name}' must see the whole corpus, but datatrove runs it on "
                f"{world_size} tasks that each see only their own shard",
                hint=f"run '{self.name}' in an executor with tasks=1 (depends= the sharded "
                     f"one), or use datatrove's own dedup stages, which work across tasks: "
                     f"{DATATROVE_DEDUP_STAGES}")

    def _timed(self, kept: Iterator[Document], shard: _Shard) -> Iterator[Document]:
        """Datatrove's per-document time of this step, without the upstream steps' time
        (datatrove keeps a distribution of per-document times; run_steps keeps a total).
        One observation per kept document, plus one for the work after the last of them."""
        while True:
            start, upstream_before = time.perf_counter(), shard.upstream_seconds
            doc = next(kept, None)
            upstream = shard.upstream_seconds - upstream_before
            self.stats.time_stats.update(time.perf_counter() - start - upstream)
            if doc is None:
                return
            yield doc


def helox_pipeline(configs: list[StepConfig]) -> list[HeloxStep]:
    """A recipe's `data.pipeline` as datatrove steps, to put between a reader and a writer."""
    return [HeloxStep(config) for config in configs]


class _Shard:
    """One task's run of a step: the datatrove documents in flight (to give back with their
    media and metadata), the time spent upstream, and the exclusion writer."""

    def __init__(self, owner: HeloxStep, writer: DiskWriter | None, rank: int):
        self.owner, self.writer, self.rank = owner, writer, rank
        # Keyed by id, a queue per id: ids are not guaranteed unique across a corpus.
        self.in_flight: dict[str, deque[DatatroveDocument]] = defaultdict(deque)
        self.upstream_seconds = 0.0

    def to_helox(self, data: DocumentsPipeline) -> Iterator[Document]:
        data = iter(data)
        while True:
            start = time.perf_counter()
            original = next(data, None)
            self.upstream_seconds += time.perf_counter() - start
            if original is None:
                return
            self.owner.stat_update(StatHints.total)
            doc_id = str(original.id)
            self.in_flight[doc_id].append(original)
            metadata = original.metadata
            yield Document(id=doc_id, text=original.text,
                           domain=str(metadata.get("domain") or DEFAULT_DOMAIN),
                           source=str(metadata.get("source") or DEFAULT_SOURCE),
                           metadata=dict(metadata))

    def to_datatrove(self, doc: Document) -> DatatroveDocument:
        out = self._take(doc)
        out.text = doc.text
        # Always set: writers infer their schema from the first document they see.
        out.metadata = {**doc.metadata, "domain": doc.domain}
        return out

    def on_drop(self, doc: Document, reason: str) -> None:
        self.owner.stat_update(StatHints.dropped, f"{StatHints.dropped}_{reason}")
        original = self._take(doc)
        if self.writer is not None:
            original.metadata["filter_reason"] = reason
            self.writer.write(original, self.rank)

    def on_change(self, reason: str, count: int) -> None:
        self.owner.stat_update(f"changed_{reason}", value=count)

    def _take(self, doc: Document) -> DatatroveDocument:
        queue = self.in_flight.get(doc.id)
        if not queue:  # not one the step received (no current step makes documents)
            return DatatroveDocument(text=doc.text, id=doc.id, metadata=dict(doc.metadata))
        original = queue.popleft()
        if not queue:
            del self.in_flight[doc.id]
        return original


class _ForwardedStats(StepStats):
    """StepStats whose drops and edits also reach datatrove's stats as they happen."""

    def __init__(self, name: str, on_drop: Callable[[Document, str], None],
                 on_change: Callable[[str, int], None]):
        super().__init__(name)
        self._on_drop, self._on_change = on_drop, on_change

    def drop(self, doc: Document, reason: str, detail: str = "") -> None:
        # Counted, not kept as a Removal: under datatrove the exclusion writer is the audit
        # trail, and a list of every removal would grow with the shard.
        self.dropped[reason] += 1
        self._on_drop(doc, reason)

    def change(self, reason: str, count: int = 1) -> None:
        super().change(reason, count)
        self._on_change(reason, count)
