"""Streaming loader: packed sequences from memory-mapped shards, mixed by domain, on a curriculum,
split over ranks and DataLoader workers, resumable exactly mid-epoch.

Design: one global plan, replayed everywhere.
  - The unit of data is a *block*: train.seq_len + 1 consecutive tokens of a domain's shards
    (block k of a shard is tokens [k*L, k*L + L + 1)). Shards hold documents back to back, each
    followed by EOS, so blocks are packed with EOS separators.
  - A `Planner` decides, for optimizer step t, which blocks form the global batch: the batch
    size and sequence length come from the curriculum, the domain of each sequence from the
    mixture weights, the block from the domain's shuffled order. Orders are permutations seeded
    by (seed, dataset version, epoch, stream), so the plan is a pure function of the config,
    the weights, and the planner state (a few integers per domain).
  - Every (rank, worker) runs the same planner over every step and materialises only its share:
    rank r takes a contiguous slice of the global batch, worker w of W takes the steps with
    (t - t0) % W == w, t0 the first step of the iteration (torch's DataLoader asks the workers
    round-robin, so batches arrive in order). Every
    block of an epoch is therefore read by exactly one (rank, worker), and the global order does
    not depend on the world size or the number of workers.
  - Each batch carries the planner state after its step; the main process keeps the state of
    the last batch it consumed, and that is the checkpoint's loader state. Resuming replays from
    it with any number of workers, and on any world size that divides the batch.
  - Online mixture weights are decided in the main process from validation losses. Workers read
    them from a shared-memory board that says up to which step they are final; a worker that
    gets ahead of the last rebalancing waits there, so prefetching never plans with stale
    weights. We use our own protocol instead of torchdata's StatefulDataLoader because the state
    is global (not per worker) and the weights flow from the trainer into the workers, which
    StatefulDataLoader's per-worker snapshots do not cover.
  - A shorter curriculum length L' cuts every block into L / L' sequences, so the tokens per
    step and the data order are the same at every length.
  - With document masking, each sequence also carries position ids that restart after every
    EOS and document ids; the model then attends only within a document.

Legend: N rows of a step, T sequence length, L block length (train.seq_len).
"""

from __future__ import annotations

import signal
import time
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from helox.data.curriculum import Curriculum, CurriculumConfig
from helox.data.mixing import MixtureConfig, Rebalancer, initial_weights
from helox.data.shards import DatasetVersion
from helox.errors import HeloxError

STATE_FORMAT = 1
IGNORE_INDEX = -100
"""A target the loss skips (F.cross_entropy's default ignore_index): untrained chat tokens."""
WORKER_WAIT_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------------------------
# Blocks on disk


@dataclass(frozen=True)
class Stream:
    """The blocks of one domain of a split: shard files and how many blocks each holds."""

    name: str
    shard_paths: tuple[str, ...]
    shard_blocks: tuple[int, ...]
    mask_paths: tuple[str, ...] = ()
    """Chat data: per shard, the file of its trained flags (data/chat.py); () for text."""

    @property
    def num_blocks(self) -> int:
        return sum(self.shard_blocks)


def split_streams(dataset: DatasetVersion, split: str, block_len: int) -> list[Stream]:
    """One stream per domain of `split`, in sorted domain order."""
    streams = []
    for domain in dataset.domains(split):
        shards = [s for s in dataset.split(split)["shards"] if s["domain"] == domain]
        streams.append(shard_stream(domain, dataset, shards, block_len))
    return streams


def injected_stream(dataset: DatasetVersion, name: str, other: DatasetVersion,
                    block_len: int) -> Stream:
    """Another dataset's training split as one stream (all its domains pooled)."""
    if name in dataset.domains("train"):
        raise HeloxError(f"curriculum.inject dataset '{name}' has the name of a domain of "
                         f"dataset {dataset.version}",
                         hint="inject the domain with `domain:` instead, or rename the dataset")
    if other.manifest["tokenizer"]["sha256"] != dataset.manifest["tokenizer"]["sha256"]:
        raise HeloxError(f"dataset {other.version} ('{name}') was tokenized with another "
                         f"tokenizer than the run's dataset {dataset.version}",
                         hint=f"prepare '{name}' with tokenizer.path set to "
                              f"{dataset.tokenizer_path}")
    return shard_stream(name, other, other.split("train")["shards"], block_len)


def shard_stream(name: str, dataset: DatasetVersion, shards: list[dict],
                 block_len: int) -> Stream:
    """A stream over manifest shard entries: a shard of n tokens holds (n - 1) // L blocks."""
    chat = dataset.chat
    if chat is not None and chat["row_tokens"] != block_len:
        raise HeloxError(f"dataset {dataset.version} packs conversations into rows of "
                         f"{chat['row_tokens']} tokens; this run's train.seq_len is {block_len}",
                         hint=f"set train.seq_len to {chat['row_tokens']}, or prepare the "
                              "dataset again with this train.seq_len")
    masks = tuple(str(dataset.path / s["mask"]["file"]) for s in shards if "mask" in s)
    return Stream(name, tuple(str(dataset.path / s["file"]) for s in shards),
                  tuple(max(0, (s["num_tokens"] - 1) // block_len) for s in shards), masks)


class BlockReader:
    """Reads blocks from memory-mapped shards. Maps are opened on first use, in the process that
    reads (a pickled np.memmap would be copied into every worker)."""

    def __init__(self, streams: list[Stream], block_len: int, dtype: np.dtype):
        self.streams, self.block_len, self.dtype = streams, block_len, np.dtype(dtype)
        self._first_block = [np.concatenate([[0], np.cumsum(s.shard_blocks)]) for s in streams]
        self._maps: dict[tuple[int, int, bool], np.memmap] = {}
        self.masked = any(s.mask_paths for s in streams)

    def block(self, stream: int, index: int, mask: bool = False) -> np.ndarray:
        """Block `index` of `stream`: L + 1 tokens (or, with `mask`, their trained flags)."""
        shard = int(np.searchsorted(self._first_block[stream], index, side="right")) - 1
        start = (index - int(self._first_block[stream][shard])) * self.block_len
        return self._map(stream, shard, mask)[start: start + self.block_len + 1]

    def blocks(self, picks: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """(stream, block) pairs → int64 tokens (len(picks), L + 1) and, when any stream is
        chat data, bool trained flags of the same shape (all set for a text stream)."""
        out = np.empty((len(picks), self.block_len + 1), dtype=np.int64)
        trained = np.ones(out.shape, dtype=bool) if self.masked else None
        for row, (stream, index) in enumerate(picks):
            out[row] = self.block(stream, index)
            if trained is not None and self.streams[stream].mask_paths:
                trained[row] = self.block(stream, index, mask=True)
        return out, trained

    def _map(self, stream: int, shard: int, mask: bool) -> np.memmap:
        key = (stream, shard, mask)
        if key not in self._maps:
            source = self.streams[stream]
            self._maps[key] = np.memmap(
                source.mask_paths[shard] if mask else source.shard_paths[shard],
                dtype=np.uint8 if mask else self.dtype, mode="r")
        return self._maps[key]


# ---------------------------------------------------------------------------------------------
# Batches


class MicroBatch(NamedTuple):
    inputs: torch.Tensor
    """Token ids (N, T), int64."""
    targets: torch.Tensor
    """Next-token ids (N, T), int64."""
    position_ids: torch.Tensor | None = None
    """Positions restarting at every document (N, T); None: 0..T-1 for every row."""
    doc_ids: torch.Tensor | None = None
    """Document index within the row (N, T); None: attend across documents."""


    @classmethod
    def from_stacked(cls, tokens_KNT: torch.Tensor) -> MicroBatch:
        """Views of a (2 or 4, N, T) stack: inputs, targets[, position ids, document ids]."""
        fields = list(tokens_KNT.unbind(0))
        return cls(*fields) if len(fields) == 4 else cls(fields[0], fields[1])


@dataclass
class StepBatch:
    """This rank's sequences for one optimizer step."""

    step: int
    """Optimizer steps completed before this batch (0-based index of the update)."""
    seq_len: int
    tokens_KNT: torch.Tensor
    """Inputs, targets (and with document masking, position and document ids) stacked in one
    tensor: a DataLoader worker hands over one shared-memory block per batch, not four."""
    domains: tuple[int, ...]
    """Stream index of every row."""
    state: dict
    """Planner state after this step: what a checkpoint stores to resume after it."""

    @property
    def data(self) -> MicroBatch:
        return MicroBatch.from_stacked(self.tokens_KNT)

    @property
    def num_rows(self) -> int:
        return self.tokens_KNT.shape[1]

    def micro_batches(self, rows: int) -> list[MicroBatch]:
        """Consecutive slices of at most `rows` sequences."""
        return split_rows(self.data, rows)

    def pin_memory(self) -> StepBatch:
        return StepBatch(self.step, self.seq_len, self.tokens_KNT.pin_memory(), self.domains,
                         self.state)


def split_rows(data: MicroBatch, rows: int) -> list[MicroBatch]:
    """Consecutive slices of at most `rows` sequences."""
    return [MicroBatch(*(None if t is None else t[i: i + rows] for t in data))
            for i in range(0, data.inputs.shape[0], rows)]


def pack(rows_NL1: np.ndarray, seq_len: int, eos_id: int, document_masking: bool,
         trained_NL1: np.ndarray | None = None) -> torch.Tensor:
    """Cut blocks of L + 1 tokens into sequences of `seq_len` and their next-token targets;
    a target whose token is not trained (chat data) is IGNORE_INDEX. Returns the (2 or 4, N, T)
    stack of StepBatch.tokens_KNT."""
    num_rows = rows_NL1.shape[0] * ((rows_NL1.shape[1] - 1) // seq_len)
    out_KNT = np.empty((4 if document_masking else 2, num_rows, seq_len), dtype=np.int64)
    out_KNT[0] = rows_NL1[:, :-1].reshape(num_rows, seq_len)
    targets_NL = rows_NL1[:, 1:]
    if trained_NL1 is not None:
        targets_NL = np.where(trained_NL1[:, 1:], targets_NL, IGNORE_INDEX)
    out_KNT[1] = targets_NL.reshape(num_rows, seq_len)
    if document_masking:
        out_KNT[2], out_KNT[3] = document_positions(out_KNT[0], eos_id)
    return torch.from_numpy(out_KNT)


def document_positions(inputs_NT: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token: its position within its document and the document's index within the row.
    A document ends with its EOS token; the next token starts a new one at position 0."""
    is_eos = inputs_NT == eos_id
    starts = np.zeros_like(is_eos)
    starts[:, 0] = True
    starts[:, 1:] = is_eos[:, :-1]
    doc_ids = np.cumsum(starts, axis=1) - 1
    arange = np.broadcast_to(np.arange(inputs_NT.shape[1]), inputs_NT.shape)
    last_start = np.maximum.accumulate(np.where(starts, arange, 0), axis=1)
    return (arange - last_start).astype(np.int64), doc_ids.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a process needs to replay the plan (picklable, sent to every worker)."""

    streams: tuple[Stream, ...]
    block_len: int
    dtype: str
    eos_id: int
    seed: int
    dataset_version: str
    shuffle: bool
    weighted: bool
    curriculum: CurriculumConfig
    full_batch: int
    document_masking: bool
    rank: int = 0
    world_size: int = 1

    @property
    def num_pools(self) -> int:
        return len(self.streams) if self.weighted else 1


@dataclass
class PlannerState:
    step: int
    """Steps planned so far."""
    epochs: list[int]
    """Per pool (one per domain when weighted, else one for all): the epoch being read."""
    positions: list[int]
    """Per pool: blocks of the current epoch already used."""
    credits: list[float]
    """Per domain: the weighted round-robin's running credit."""
    drawn: list[int]
    """Per domain: sequences drawn since the start of the run (realised proportions)."""

    @classmethod
    def initial(cls, spec: LoaderSpec) -> PlannerState:
        pools, domains = spec.num_pools, len(spec.streams)
        return cls(0, [0] * pools, [0] * pools, [0.0] * domains, [0] * domains)

    def to_dict(self) -> dict:
        return {"step": self.step, "epochs": list(self.epochs), "positions": list(self.positions),
                "credits": list(self.credits), "drawn": list(self.drawn)}

    @classmethod
    def from_dict(cls, state: dict) -> PlannerState:
        return cls(int(state["step"]), list(state["epochs"]), list(state["positions"]),
                   [float(c) for c in state["credits"]], list(state["drawn"]))


@dataclass
class StepPlan:
    step: int
    seq_len: int
    picks: list[tuple[int, int]]
    """(stream, block) of every global row of the step, in order."""


class Planner:
    """Decides the global batch of each step (see the module docstring)."""

    def __init__(self, spec: LoaderSpec, state: PlannerState):
        self.spec, self.state = spec, state
        self.curriculum = Curriculum(spec.curriculum, spec.block_len, spec.full_batch)
        sizes = [s.num_blocks for s in spec.streams]
        self._pool_sizes = sizes if spec.weighted else [sum(sizes)]
        self._pool_offsets = np.concatenate([[0], np.cumsum(sizes)])  # natural pool → stream
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self._names = [s.name for s in spec.streams]
        self._version_int = int(spec.dataset_version, 16)

    def plan(self, base_weights: list[float] | None) -> StepPlan:
        """The next step's plan; `base_weights` are the mixture's (None when unweighted)."""
        step = self.state.step
        num_rows = self.curriculum.batch_blocks(step)
        if self.spec.weighted:
            weights = effective_weights(base_weights, self._names, self.curriculum.injected(step))
            picks = [self._next_block(self._pick_domain(weights)) for _ in range(num_rows)]
        else:
            picks = [self._natural_pick(self._next_in_pool(0)) for _ in range(num_rows)]
        for stream, _ in picks:
            self.state.drawn[stream] += 1
        self.state.step += 1
        return StepPlan(step, self.curriculum.seq_len(step), picks)

    def _pick_domain(self, weights: list[float]) -> int:
        """Smooth weighted round-robin: credit += weight, take the largest, charge it 1."""
        credits = self.state.credits
        best = -1
        for i, w in enumerate(weights):
            if w > 0:
                credits[i] += w
                if best < 0 or credits[i] > credits[best]:
                    best = i
        credits[best] -= 1.0
        return best

    def _next_block(self, stream: int) -> tuple[int, int]:
        return stream, self._next_in_pool(stream)

    def _natural_pick(self, pooled: int) -> tuple[int, int]:
        stream = int(np.searchsorted(self._pool_offsets, pooled, side="right")) - 1
        return stream, pooled - int(self._pool_offsets[stream])

    def _next_in_pool(self, pool: int) -> int:
        state = self.state
        if state.positions[pool] == self._pool_sizes[pool]:
            state.epochs[pool] += 1
            state.positions[pool] = 0
        order = self._order(pool, state.epochs[pool])
        index = int(order[state.positions[pool]])
        state.positions[pool] += 1
        return index

    def _order(self, pool: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(pool)
        if cached is None or cached[0] != epoch:
            size = self._pool_sizes[pool]
            if not self.spec.shuffle:
                order = np.arange(size)
            else:
                key = zlib.crc32(self._names[pool].encode()) + 1 if self.spec.weighted else 0
                rng = np.random.default_rng([self.spec.seed, self._version_int, epoch, key])
                order = rng.permutation(size)
            self._orders[pool] = cached = (epoch, order)
        return cached[1]


def effective_weights(base: list[float], names: list[str], injected: dict[str, float],
                      ) -> list[float]:
    """Injected domains take their shares; the base weights share the rest."""
    rest = 1.0 - sum(injected.values())
    return [injected[name] if name in injected else rest * w for name, w in zip(names, base)]


def rank_slice(num_rows: int, rank: int, world_size: int) -> slice:
    per_rank = num_rows // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


# ---------------------------------------------------------------------------------------------
# Weights shared with workers


class WeightsBoard:
    """Mixture weights by step, in shared memory: rows of (from_step, weights), and the last
    step whose weights are final. The main process writes, workers read."""

    def __init__(self, num_domains: int, capacity: int):
        self.from_step = torch.full((capacity,), -1, dtype=torch.int64).share_memory_()
        self.table = torch.zeros(capacity, num_domains, dtype=torch.float64).share_memory_()
        # rows, last step whose weights are final, closing flag
        self.meta = torch.zeros(3, dtype=torch.int64).share_memory_()

    def publish(self, from_step: int, weights: list[float]) -> None:
        rows = int(self.meta[0])
        if rows == len(self.from_step):
            raise HeloxError(f"mixture weight board is full ({rows} updates)",
                             hint="raise mixture.rebalance.every_steps")
        self.table[rows] = torch.tensor(weights, dtype=torch.float64)
        self.from_step[rows] = from_step
        self.meta[0] = rows + 1  # written last: a reader never sees a half-written row

    def release(self, through_step: int) -> None:
        self.meta[1] = through_step

    def close(self) -> None:
        """Tell waiting workers to stop, so that shutting the DataLoader down is immediate."""
        self.meta[2] = 1

    def weights_at(self, step: int, wait: bool) -> list[float] | None:
        """Weights of `step` once final; None when the board is closing."""
        deadline = time.monotonic() + WORKER_WAIT_TIMEOUT_S
        while int(self.meta[1]) < step:
            if int(self.meta[2]):
                return None
            if not wait:
                raise RuntimeError(f"mixture weights of step {step} are not final yet (final "
                                   f"through {int(self.meta[1])}): rebalance before next_step()")
            if time.monotonic() > deadline:
                raise HeloxError(f"a data worker waited {WORKER_WAIT_TIMEOUT_S:.0f} s for the "
                                 f"mixture weights of step {step}",
                                 hint="the training process stopped publishing; restart the run")
            time.sleep(0.0005)
        rows = int(self.meta[0])
        steps = self.from_step[:rows].tolist()
        row = max(i for i, s in enumerate(steps) if s <= step)
        return self.table[row].tolist()


# ---------------------------------------------------------------------------------------------
# The iterable dataset


class PackedSequences(IterableDataset):
    """Yields this (rank, worker)'s StepBatches from `start` on, forever (epochs wrap)."""

    def __init__(self, spec: LoaderSpec, start: PlannerState, board: WeightsBoard | None):
        super().__init__()
        self.spec, self.start, self.board = spec, start, board

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        spec = self.spec
        reader = BlockReader(list(spec.streams), spec.block_len, np.dtype(spec.dtype))
        planner = Planner(spec, PlannerState.from_dict(self.start.to_dict()))
        while True:
            step = planner.state.step
            weights = None
            if spec.weighted:
                weights = self.board.weights_at(step, wait=info is not None)
                if weights is None:
                    return  # the loader is closing
            plan = planner.plan(weights)
            if (step - self.start.step) % num_workers == worker:  # DataLoader's round-robin
                yield self._materialise(reader, plan, planner.state.to_dict())

    def _materialise(self, reader: BlockReader, plan: StepPlan, state: dict) -> StepBatch:
        spec = self.spec
        mine = plan.picks[rank_slice(len(plan.picks), spec.rank, spec.world_size)]
        rows, trained = reader.blocks(mine)
        tokens_KNT = pack(rows, plan.seq_len, spec.eos_id, spec.document_masking, trained)
        pieces = spec.block_len // plan.seq_len
        domains = tuple(stream for stream, _ in mine for _ in range(pieces))
        return StepBatch(plan.step, plan.seq_len, tokens_KNT, domains, state)


# ---------------------------------------------------------------------------------------------
# The training loop's side


@dataclass
class LoaderOptions:
    """The parts of a run's config the loader needs (kept apart so tests and benches can build
    a loader without a whole RunConfig)."""

    block_len: int
    micro_batch_size: int
    grad_accum_steps: int
    seed: int
    max_steps: int
    num_workers: int = 0
    document_masking: bool = False
    shuffle: bool = True
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    @property
    def full_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


class TrainLoader:
    """Batches for the training loop, the mixture's rebalancing, and the resumable state."""

    def __init__(self, dataset: DatasetVersion, options: LoaderOptions, rank: int = 0,
                 world_size: int = 1, injected: dict[str, DatasetVersion] | None = None):
        """`injected`: the datasets that curriculum.inject names, opened by the caller (who
        checks access); each one's training split becomes a stream of that name."""
        self.dataset, self.options = dataset, options
        self.injected = dict(injected or {})
        self._board: WeightsBoard | None = None
        self._iterator = None
        self._loader: DataLoader | None = None
        streams = split_streams(dataset, "train", options.block_len)
        streams += [injected_stream(dataset, name, other, options.block_len)
                    for name, other in self.injected.items()]
        self.domains = [s.name for s in streams]
        self.masked = any(s.mask_paths for s in streams)
        """Some targets are IGNORE_INDEX (chat data): the trainer counts trained targets."""
        _check_shape(options, world_size)
        self.spec = LoaderSpec(tuple(streams), options.block_len, dataset.dtype.str,
                               dataset.eos_id, options.seed, dataset.version, options.shuffle,
                               options.mixture.weighted or bool(options.curriculum.inject),
                               options.curriculum, options.full_batch,
                               options.document_masking, rank, world_size)
        self.curriculum = Curriculum(options.curriculum, options.block_len, options.full_batch)
        _check_domain_names(self.domains, options)
        self.base_weights = self._initial_weights(streams)
        _check_stream_sizes(dataset, streams, self.spec, self.base_weights, options)
        self.rebalancer = (Rebalancer(options.mixture.rebalance, self.domains, self.base_weights)
                           if options.mixture.rebalance else None)
        if self.rebalancer:
            self.base_weights = self.rebalancer.weights()
        self._state = PlannerState.initial(self.spec)
        self._rebalanced_at = 0

    # -- consuming --------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Steps whose batches have been consumed."""
        return self._state.step

    def next_step(self) -> StepBatch:
        """This rank's batch for the next optimizer step."""
        if self.rebalance_due(self.step) and self._rebalanced_at != self.step:
            raise RuntimeError(f"mixture rebalancing is due after step {self.step}; call "
                               "rebalance() before next_step()")
        if self._iterator is None:
            self._start()
        if self._board is not None:
            self._board.release(self._final_through(self.step))
        batch = next(self._iterator)
        if batch.step != self.step:
            raise RuntimeError(f"loader produced step {batch.step}, expected {self.step}")
        self._state = PlannerState.from_dict(batch.state)
        return batch

    def _start(self) -> None:
        if self.spec.weighted:
            capacity = self.options.max_steps // self._every_steps + 2
            self._board = WeightsBoard(len(self.domains), capacity)
            self._board.publish(self.step, self.base_weights)
            self._board.release(self._final_through(self.step))
        dataset = PackedSequences(self.spec, self._state, self._board)
        workers = self.options.num_workers
        self._loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                                  prefetch_factor=2 if workers else None,
                                  pin_memory=torch.cuda.is_available(),
                                  worker_init_fn=_ignore_interrupts if workers else None)
        self._iterator = iter(self._loader)

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage-collected)."""
        if self._board is not None:
            self._board.close()
        self._iterator, self._loader, self._board = None, None, None

    def __del__(self) -> None:
        self.close()  # release waiting workers first, or the DataLoader waits 5 s for each

    # -- mixture ----------------------------------------------------------------------------

    @property
    def _every_steps(self) -> int:
        rebalance = self.options.mixture.rebalance
        return rebalance.every_steps if rebalance else max(1, self.options.max_steps)

    def rebalance_due(self, completed_steps: int) -> bool:
        return (self.rebalancer is not None and completed_steps > 0
                and completed_steps % self._every_steps == 0)

    def rebalance(self, completed_steps: int, losses: dict[str, float]) -> list[float]:
        """Update the weights from per-domain validation losses; they apply from the next step."""
        if (completed_steps != self.step or not self.rebalance_due(completed_steps)
                or self._rebalanced_at == completed_steps):
            raise RuntimeError(f"rebalance() after step {completed_steps}: the loader is at "
                               f"step {self.step}, rebalances every {self._every_steps} steps, "
                               f"last after step {self._rebalanced_at}")
        self.base_weights = self.rebalancer.update(losses)
        self._rebalanced_at = completed_steps
        if self._board is not None:
            self._board.publish(completed_steps, self.base_weights)
        return self.base_weights

    def _final_through(self, completed_steps: int) -> int:
        """Last step whose weights are known once `completed_steps` are done (and rebalanced)."""
        if self.rebalancer is None:
            return np.iinfo(np.int64).max
        every = self._every_steps
        return (completed_steps // every) * every + every - 1

    def weights_for(self, step: int) -> list[float]:
        """Sampling weight of every domain at `step` (injections included); valid for steps up
        to the next rebalancing."""
        if not self.spec.weighted:
            total = sum(s.num_blocks for s in self.spec.streams)
            return [s.num_blocks / total for s in self.spec.streams]
        return effective_weights(self.base_weights, self.domains,
                                 self.curriculum.injected(step))

    def realised_shares(self) -> list[float]:
        """Share of each domain among the sequences drawn so far."""
        total = sum(self._state.drawn)
        return [d / total if total else 0.0 for d in self._state.drawn]

    def val_streams_missing(self) -> list[str]:
        val = set(self.dataset.domains("val")) if "val" in self.dataset.splits() else set()
        return [d for d, w in zip(self.domains, self.base_weights) if w > 0 and d not in val]

    # -- checkpoint state -------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, **self._identity(), "planner": self._state.to_dict(),
                "base_weights": list(self.base_weights), "rebalanced_at": self._rebalanced_at,
                "rebalancer": self.rebalancer.state_dict() if self.rebalancer else None}

    def _identity(self) -> dict:
        return {"dataset_version": self.spec.dataset_version,
                "injected_versions": {n: d.version for n, d in self.injected.items()},
                "block_len": self.spec.block_len,
                "seed": self.spec.seed, "shuffle": self.spec.shuffle, "domains": self.domains,
                "weighted": self.spec.weighted}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise HeloxError(f"cannot resume the data loader: state format "
                             f"{state.get('format')!r}, this Helox writes {STATE_FORMAT}",
                             hint="resume with the Helox version that wrote the checkpoint")
        for key, mine in self._identity().items():
            if state[key] != mine:
                raise HeloxError(f"cannot resume the data loader: saved {key} is "
                                 f"{state[key]!r}, this run has {mine!r}",
                                 hint="resume with the config and dataset the checkpoint was "
                                      "written with")
        self._state = PlannerState.from_dict(state["planner"])
        self.base_weights = list(state["base_weights"])
        self._rebalanced_at = state["rebalanced_at"]
        if self.rebalancer:
            self.rebalancer.load_state_dict(state["rebalancer"])
        self.close()

    def _initial_weights(self, streams: list[Stream]) -> list[float]:
        injected = {s.stream for s in self.options.curriculum.inject}
        natural = {s.name: s.num_blocks for s in streams}
        return initial_weights(self.options.mixture, self.domains, natural, injected)


def _ignore_interrupts(_worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: workers leave it to the trainer, which
    checkpoints and then closes them (a worker dying of KeyboardInterrupt would abort the
    step being finished)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_shape(options: LoaderOptions, world_size: int) -> None:
    problems = options.curriculum.problems(options.block_len, options.full_batch, world_size)
    if problems:
        raise HeloxError("the curriculum does not fit the training shape: " + "; ".join(problems),
                         hint="change curriculum.* or train.seq_len / micro_batch_size / "
                              "grad_accum_steps")


def _check_domain_names(names: list[str], options: LoaderOptions) -> None:
    listed, injected = set(options.mixture.weights), {i.stream for i in options.curriculum.inject}
    hint_names = "use the domain names `helox data show` lists"
    if listed - set(names):
        raise HeloxError(f"mixture.weights names domains the training split does not have: "
                         f"{sorted(listed - set(names))}; it has {names}", hint=hint_names)
    if listed and set(names) - listed - injected:
        raise HeloxError(f"mixture.weights gives no weight to {sorted(set(names) - listed)}",
                         hint="give every domain a weight (0 leaves one out)")
    if injected - set(names):
        raise HeloxError(f"curriculum.inject names domains the training split does not have: "
                         f"{sorted(injected - set(names))}; it has {names}", hint=hint_names)
    if any(options.mixture.weights.get(d, 0) > 0 for d in injected):
        raise HeloxError("a domain is both injected (curriculum.inject) and weighted "
                         "(mixture.weights)", hint="give injected domains weight 0")


def _check_stream_sizes(dataset: DatasetVersion, streams: list[Stream], spec: LoaderSpec,
                        base_weights: list[float], options: LoaderOptions) -> None:
    injected = {i.stream for i in options.curriculum.inject}
    if not spec.weighted:
        if sum(s.num_blocks for s in streams) < options.full_batch:
            raise HeloxError(f"the training split of dataset {dataset.version} holds "
                             f"{sum(s.num_blocks for s in streams)} sequences of "
                             f"{spec.block_len} tokens, fewer than one batch of "
                             f"{options.full_batch}",
                             hint="add data, or lower train.seq_len or train.micro_batch_size")
        return
    for stream, weight in zip(streams, base_weights):
        if (weight > 0 or stream.name in injected) and stream.num_blocks == 0:
            raise HeloxError(f"domain '{stream.name}' of dataset {dataset.version} holds fewer "
                             f"than {spec.block_len + 1} tokens, not one sequence",
                             hint="give it weight 0, add data, or lower train.seq_len")


# ---------------------------------------------------------------------------------------------
# Fixed evaluation sequences


def fixed_sequences(dataset: DatasetVersion, split: str, block_len: int, per_domain: int,
                    document_masking: bool) -> dict[str, MicroBatch]:
    """The first `per_domain` blocks of every domain of `split`, unshuffled: the same sequences
    at every evaluation, so losses are comparable over the run."""
    streams = split_streams(dataset, split, block_len)
    reader = BlockReader(streams, block_len, dataset.dtype)
    out = {}
    for index, stream in enumerate(streams):
        count = min(per_domain, stream.num_blocks)
        if count:
            rows, trained = reader.blocks([(index, b) for b in range(count)])
            out[stream.name] = MicroBatch.from_stacked(
                pack(rows, block_len, dataset.eos_id, document_masking, trained))
    return out
