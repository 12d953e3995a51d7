"""Throughput of the streaming loader alone, against the skeleton model's training consumption
measured in the same run, and the time a real training loop spends waiting on data.

The data is the quickstart recipe's dataset (src/helox/recipes/quickstart.yaml, prepared into
a fresh workspace, ~20 s here, or into --workspace, where it is cached while the data code is
unchanged); the shape is the recipe's: blocks of 256 tokens, micro-batch 16 (4,096 tokens per step).

What is measured, in one process, the model and loader variants interleaved over `--rounds`
(each variant's result is its median over the rounds):
- model consumption: full optimizer steps of the quickstart model (helox.model.llama.Llama,
  d_model 256, 4 layers, GQA 4/2 heads, vocab of the tokenizer) through Helox's real step,
  `helox.training.step.train_step`, with `build_optimizer` and the LR schedule, on batches read
  beforehand: "helox default" as `helox train` runs the recipe (`pick_precision("auto")`, bf16
  autocast where the CPU has native bf16, and `train.compile`), and the same precision eager.
  The compiled variant's first step compiles; it is reported apart and never timed (the inductor
  cache is torch's usual one, so only the first run on a machine pays a cold compile).
- loader alone: `TrainLoader.next_step()` in a loop that does nothing else, with 0 and 2
  DataLoader workers: natural proportions; document masking (position and document ids);
  a fixed weighted mixture; the mixture rebalanced every `--rebalance-every` steps from fake
  per-domain losses (the loader's side of DoReMi: a worker that gets ahead of the last
  rebalancing waits for it); a curriculum at seq_len 64 (every block cut into 4 sequences).
  Warm-up steps (the first starts the workers) are not timed; the timed calls last at least
  `--loader-steps` steps and `--loader-seconds`. The ratio divides the loader's
  tokens/s by the default model's: the target is >= 50x.
- DataLoader transport only: torch's DataLoader with 2 workers passing ready-made tensors of the
  same shapes (no planning, no reading): the floor of moving a batch between processes.
- training loop: the default model trained on the loader's batches as `helox.training.loop.train`
  does it (next_step, train_step, rebalance after the step when due), timing the call to
  `next_step()`: mean and max wait per step, the share of the step it takes, the first batch
  (worker start-up, not in the mean) and how many steps waited more than 1% of the median step.

Run: .venv/bin/python bench/loader.py [--workspace DIR] [--rounds 3] [--no-compile]
(about 2 minutes on 2 cores, of which ~20 s prepare the data and 5-60 s compile the model,
depending on what torch's inductor cache already holds).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from helox.config import RunConfig, load_config
from helox.data.curriculum import CurriculumConfig, LengthStage
from helox.data.loader import LoaderOptions, MicroBatch, StepBatch, TrainLoader
from helox.data.mixing import MixtureConfig, RebalanceConfig
from helox.data.prepare import prepare_dataset
from helox.data.shards import DatasetVersion
from helox.model.llama import Llama
from helox.repro import seed_everything
from helox.testing.tiny import QUICKSTART
from helox.training.setup import micro_rows, resolve_vocab_size
from helox.training.step import compiled, make_loss_fn, pick_precision, train_step
from helox.training.optim import build_optimizer, lr_at, set_lr

DEVICE = torch.device("cpu")
TARGET_RATIO = 50.0
WORKER_COUNTS = (0, 2)
WAITING_SHARE = 0.01  # a step "waits on data" when next_step() takes over 1% of the median step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=None,
                        help="workspace to prepare the quickstart dataset in (kept; default: a "
                             "temporary one)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--loader-steps", type=int, default=500,
                        help="timed next_step() calls per loader variant per round")
    parser.add_argument("--loader-seconds", type=float, default=0.5,
                        help="and keep calling for at least this long (0 workers: ~0.1 s "
                             "for 500 steps, too short to be steady)")
    parser.add_argument("--loader-warmup", type=int, default=20,
                        help="untimed next_step() calls first (the first starts the workers)")
    parser.add_argument("--model-steps", type=int, default=6,
                        help="timed optimizer steps per model variant per round")
    parser.add_argument("--model-warmup", type=int, default=2)
    parser.add_argument("--loop-steps", type=int, default=16,
                        help="timed steps of each training loop (after 2 warm-up steps)")
    parser.add_argument("--rebalance-every", type=int, default=20,
                        help="mixture rebalancing interval of the loader-alone variant")
    parser.add_argument("--loop-rebalance-every", type=int, default=4,
                        help="rebalancing interval of the rebalanced training loop")
    parser.add_argument("--no-compile", action="store_true",
                        help="measure the model eagerly only (the default then is eager)")
    args = parser.parse_args()
    if min(args.rounds, args.loader_steps, args.loader_warmup, args.model_steps,
           args.model_warmup, args.loop_steps, args.rebalance_every,
           args.loop_rebalance_every) < 1:
        parser.error("every count must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# Loader variants


@dataclass(frozen=True)
class LoaderCase:
    """One way of configuring the loader; the shape is always the recipe's."""

    name: str
    document_masking: bool = False
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


def uneven_weights(domains: list[str]) -> dict[str, float]:
    return {d: float(i + 1) for i, d in enumerate(domains)}  # 1 : 2 : 3 ...


def loader_cases(domains: list[str], rebalance_every: int) -> list[LoaderCase]:
    weights = uneven_weights(domains)
    return [
        LoaderCase("natural proportions"),
        LoaderCase("document masking", document_masking=True),
        LoaderCase("weighted mixture", mixture=MixtureConfig(weights=weights)),
        rebalanced_case(weights, rebalance_every),
        LoaderCase("curriculum seq_len 64",
                   curriculum=CurriculumConfig(seq_len=[LengthStage(from_step=0, value=64)])),
    ]


def rebalanced_case(weights: dict[str, float], every_steps: int) -> LoaderCase:
    mixture = MixtureConfig(weights=weights, rebalance=RebalanceConfig(every_steps=every_steps))
    return LoaderCase(f"mixture, rebalanced every {every_steps}", mixture=mixture)


def loader_options(config: RunConfig, case: LoaderCase, num_workers: int) -> LoaderOptions:
    tc = config.train
    return LoaderOptions(block_len=tc.seq_len, micro_batch_size=tc.micro_batch_size,
                         grad_accum_steps=tc.grad_accum_steps, seed=tc.seed,
                         max_steps=10**6,  # sizes the weights board; no schedule here
                         num_workers=num_workers,
                         document_masking=case.document_masking, mixture=case.mixture,
                         curriculum=case.curriculum)


def fake_losses(domains: list[str], update: int) -> dict[str, float]:
    """Per-domain losses whose highest moves to another domain at every update, so that the
    weights keep changing."""
    return {d: 3.0 + 0.5 * ((update + i) % len(domains)) for i, d in enumerate(domains)}


def rebalance_if_due(loader: TrainLoader) -> None:
    if loader.rebalance_due(loader.step):
        losses = fake_losses(loader.domains, loader.rebalancer.updates)
        loader.rebalance(loader.step, losses)


@dataclass
class Rate:
    """Per-round results of one measured thing."""

    name: str
    workers: int | None = None
    sequences_per_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)


def time_loader(dataset: DatasetVersion, options: LoaderOptions, warmup: int, steps: int,
                seconds: float) -> tuple[float, float]:
    """(sequences/s, tokens/s) of next_step() after `warmup` untimed calls: at least `steps`
    calls and at least `seconds`."""
    loader = TrainLoader(dataset, options)

    def pull() -> StepBatch:
        rebalance_if_due(loader)
        return loader.next_step()

    try:
        return timed_batches(pull, warmup, steps, seconds)
    finally:
        loader.close()


def timed_batches(pull: Callable[[], StepBatch], warmup: int, steps: int,
                  seconds: float) -> tuple[float, float]:
    for _ in range(warmup):
        pull()
    calls = sequences = tokens = 0
    started = time.perf_counter()
    while calls < steps or time.perf_counter() - started < seconds:
        batch = pull()
        calls += 1
        sequences += batch.num_rows
        tokens += batch.data.inputs.numel()
    elapsed = time.perf_counter() - started
    return sequences / elapsed, tokens / elapsed


class ReadyBatches(IterableDataset):
    """Copies of one StepBatch, forever: what a worker sends without planning or reading
    (fresh tensors every time, as the loader makes, so each one is moved to shared memory)."""

    def __init__(self, batch: StepBatch):
        super().__init__()
        self.batch = batch

    def __iter__(self):
        b = self.batch
        while True:
            yield StepBatch(b.step, b.seq_len, b.tokens_KNT.clone(), b.domains, dict(b.state))


def time_transport(batch: StepBatch, num_workers: int, warmup: int, steps: int,
                   seconds: float) -> tuple[float, float]:
    """(sequences/s, tokens/s) of torch's DataLoader passing ready-made batches, with the
    loader's settings."""
    loader = DataLoader(ReadyBatches(batch), batch_size=None, num_workers=num_workers,
                        prefetch_factor=2)
    iterator = iter(loader)  # its workers stop when it is freed, on return
    return timed_batches(iterator.__next__, warmup, steps, seconds)


# ---------------------------------------------------------------------------------------------
# Model variants


@dataclass
class ModelVariant:
    """The quickstart model, its optimizer and loss function; `step` is one optimizer step."""

    name: str
    config: RunConfig
    model: Llama
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[MicroBatch], torch.Tensor]
    compiled: bool
    steps_done: int = 0
    compile_s: float | None = None
    rate: Rate = field(init=False)

    def __post_init__(self) -> None:
        self.rate = Rate(self.name)

    def step(self, micro_batches: list[MicroBatch]) -> float:
        """As helox.training.loop.train does: the schedule's LR, then train_step."""
        set_lr(self.optimizer, lr_at(self.steps_done, self.config.optim,
                                     self.config.train.max_steps))
        loss = train_step(self.loss_fn, self.model, self.optimizer, micro_batches,
                          self.config.optim.grad_clip_norm).loss
        self.steps_done += 1
        return loss


def model_variant(name: str, config: RunConfig, precision: str, compile_model: bool,
                  ) -> ModelVariant:
    seed_everything(config.train.seed, deterministic=True)  # as train() does on CPU
    model = Llama(config.model).to(DEVICE)
    loss_fn = make_loss_fn(model, DEVICE, precision)
    return ModelVariant(name, config, model, build_optimizer(model, config.optim),
                        compiled(loss_fn) if compile_model else loss_fn, compile_model)


def build_models(config: RunConfig, precision: str, compile_default: bool) -> list[ModelVariant]:
    """The default first: the one the loader must keep up with."""
    variants = [model_variant(f"helox default ({precision}"
                              f"{', compiled' if compile_default else ', eager'})",
                              config, precision, compile_default)]
    if compile_default:
        variants.append(model_variant(f"helox {precision} eager", config, precision, False))
    return variants


def time_model(variant: ModelVariant, batches: list[MicroBatch], warmup: int,
               steps: int) -> None:
    """Warm-up steps (a compiled variant's first compiles), then timed steps."""
    gc.collect()
    for i in range(warmup):
        started = time.perf_counter()
        variant.step([batches[i % len(batches)]])
        if variant.compiled and variant.compile_s is None:
            variant.compile_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(steps):
        variant.step([batches[(warmup + i) % len(batches)]])
    elapsed = time.perf_counter() - started
    rows, tokens = batches[0].inputs.shape[0], batches[0].inputs.numel()
    variant.rate.sequences_per_s.append(steps * rows / elapsed)
    variant.rate.tokens_per_s.append(steps * tokens / elapsed)


def read_batches(dataset: DatasetVersion, config: RunConfig, count: int) -> list[StepBatch]:
    """The first batches of the recipe's loader, read before any timing."""
    loader = TrainLoader(dataset, loader_options(config, LoaderCase("natural"), 0))
    try:
        return [loader.next_step() for _ in range(count)]
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------
# Rounds


def run_rounds(models: list[ModelVariant], cases: list[LoaderCase], dataset: DatasetVersion,
               config: RunConfig, args: argparse.Namespace) -> list[Rate]:
    """Round-robin over the model and loader variants; returns the loader rates."""
    step_batches = read_batches(dataset, config, args.model_warmup + args.model_steps)
    batches = [b.data for b in step_batches]  # the model's: no loading in its timing
    pairs = [(case, workers) for case in cases for workers in WORKER_COUNTS]
    rates = [Rate(case.name, workers) for case, workers in pairs]
    transport = Rate("DataLoader transport only", 2)
    for round_index in range(args.rounds):
        for variant in models:
            time_model(variant, batches, args.model_warmup, args.model_steps)
            print(f"  round {round_index + 1}/{args.rounds}  {variant.name:<34} "
                  f"{variant.rate.tokens_per_s[-1]:9,.0f} tokens/s", flush=True)
        for rate, (case, workers) in zip(rates, pairs):
            seqs, tokens = time_loader(dataset, loader_options(config, case, workers),
                                       args.loader_warmup, args.loader_steps,
                                       args.loader_seconds)
            rate.sequences_per_s.append(seqs)
            rate.tokens_per_s.append(tokens)
        seqs, tokens = time_transport(step_batches[0], 2, args.loader_warmup, args.loader_steps,
                                      args.loader_seconds)
        transport.sequences_per_s.append(seqs)
        transport.tokens_per_s.append(tokens)
        print(f"  round {round_index + 1}/{args.rounds}  loader variants: "
              + ", ".join(f"{r.tokens_per_s[-1] / 1e6:.2f}" for r in rates)
              + " M tokens/s", flush=True)
    return [*rates, transport]


# ---------------------------------------------------------------------------------------------
# The training loop's wait on data


@dataclass
class LoopResult:
    name: str
    workers: int
    first_wait_s: float
    waits_s: list[float]
    steps_s: list[float]


def training_loop(variant: ModelVariant, dataset: DatasetVersion, case: LoaderCase,
                  workers: int, steps: int, warmup: int = 2) -> LoopResult:
    """The body of helox.training.loop.train around the loader, timing next_step()."""
    config = variant.config
    loader = TrainLoader(dataset, loader_options(config, case, workers))
    waits, step_times, first_wait = [], [], 0.0
    try:
        for i in range(warmup + steps):
            started = time.perf_counter()
            batch = loader.next_step()
            got = time.perf_counter()
            variant.step(batch.micro_batches(micro_rows(config, batch)))
            ended = time.perf_counter()
            rebalance_if_due(loader)  # after the step, as train() does (its eval is not here)
            if i == 0:
                first_wait = got - started
            if i >= warmup:
                waits.append(got - started)
                step_times.append(ended - started)
    finally:
        loader.close()
    return LoopResult(case.name, workers, first_wait, waits, step_times)


def run_loops(variant: ModelVariant, dataset: DatasetVersion, args: argparse.Namespace
              ) -> list[LoopResult]:
    """Natural proportions with 0 and 2 workers, and the rebalanced mixture with 2 (with 0
    workers rebalancing changes nothing: every batch is read when it is asked for)."""
    plain = LoaderCase("natural proportions")
    rebalanced = rebalanced_case(uneven_weights(dataset.domains("train")),
                                 args.loop_rebalance_every)
    runs = [(plain, 0), (plain, 2), (rebalanced, 2)]
    results = []
    for case, workers in runs:
        results.append(training_loop(variant, dataset, case, workers, args.loop_steps))
        print(f"  training loop: {case.name}, {workers} workers done", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Reporting


def spread(values: list[float], scale: float = 1.0) -> str:
    return f"{min(values) / scale:,.2f}–{max(values) / scale:,.2f}"


def print_models(models: list[ModelVariant], tokens_per_step: int) -> None:
    print(f"\n## model consumption (full optimizer steps, {tokens_per_step:,} tokens each; "
          f"median of rounds)")
    print(f"{'variant':<34} {'tokens/s':>9} {'min–max':>15} {'sequences/s':>12} "
          f"{'ms/step':>8}")
    for v in models:
        tokens = statistics.median(v.rate.tokens_per_s)
        low, high = min(v.rate.tokens_per_s), max(v.rate.tokens_per_s)
        print(f"{v.name:<34} {tokens:9,.0f} {f'{low:,.0f}–{high:,.0f}':>15} "
              f"{statistics.median(v.rate.sequences_per_s):12,.1f} "
              f"{1e3 * tokens_per_step / tokens:8,.0f}")
    for v in models:
        if v.compile_s is not None:
            print(f"{v.name}: first step (compiles; not timed) {v.compile_s:.1f} s")


def print_loader(rates: list[Rate], model_tokens_per_s: float, args: argparse.Namespace) -> None:
    print(f"\n## loader alone (next_step() ≥ {args.loader_steps} times and ≥ "
          f"{args.loader_seconds:g} s after {args.loader_warmup} warm-up, median of "
          f"{args.rounds} rounds; ratio = loader tokens/s ÷ the default "
          f"model's {model_tokens_per_s:,.0f} tokens/s, target ≥ {TARGET_RATIO:g}×)")
    print(f"{'loader':<34} {'workers':>7} {'sequences/s':>12} {'M tokens/s':>11} "
          f"{'min–max':>11} {'ratio':>8}  verdict")
    for rate in rates:
        tokens = statistics.median(rate.tokens_per_s)
        ratio = tokens / model_tokens_per_s
        verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
        print(f"{rate.name:<34} {rate.workers:>7} "
              f"{statistics.median(rate.sequences_per_s):12,.0f} {tokens / 1e6:11.2f} "
              f"{spread(rate.tokens_per_s, 1e6):>11} {ratio:7,.0f}×  {verdict}")


def print_loops(results: list[LoopResult], tokens_per_step: int) -> None:
    print("\n## training loop: time inside loader.next_step() (default model; "
          f"{len(results[0].waits_s)} timed steps after 2 warm-up)")
    print(f"{'loader':<30} {'workers':>7} {'step ms':>8} {'wait mean ms':>13} "
          f"{'wait max ms':>12} {'wait/step':>10} {'first batch ms':>15} "
          f"{'steps waiting':>14} {'tokens/s':>9}")
    for r in results:
        median_step = statistics.median(r.steps_s)
        waiting = sum(w > WAITING_SHARE * median_step for w in r.waits_s)
        print(f"{r.name:<30} {r.workers:>7} {1e3 * median_step:8,.0f} "
              f"{1e3 * statistics.mean(r.waits_s):13.3f} {1e3 * max(r.waits_s):12.3f} "
              f"{sum(r.waits_s) / sum(r.steps_s):10.3%} {1e3 * r.first_wait_s:15.1f} "
              f"{f'{waiting} of {len(r.waits_s)}':>14} "
              f"{len(r.steps_s) * tokens_per_step / sum(r.steps_s):9,.0f}")
    print(f"(step ms: median over the timed steps, next_step() included; a step is waiting when "
          f"its next_step() takes over {WAITING_SHARE:.0%} of that median; first batch: the "
          f"first next_step() of the loop, which starts the workers, not in the mean)")


# ---------------------------------------------------------------------------------------------


def prepare(workspace: Path) -> tuple[RunConfig, DatasetVersion, float]:
    started = time.perf_counter()
    config = load_config(QUICKSTART, [f"workspace={workspace}"])
    dataset = prepare_dataset(config, purpose="bench")
    return resolve_vocab_size(config, dataset), dataset, time.perf_counter() - started


def describe(config: RunConfig, dataset: DatasetVersion, prepare_s: float, precision: str,
             ) -> None:
    train_split = dataset.split("train")
    domains = dataset.domains("train")
    m = config.model
    params = Llama(m).num_params()
    print(f"dataset {dataset.version} (quickstart recipe, prepared or found in {prepare_s:.0f} "
          f"s): {train_split['num_tokens']:,} training tokens, {len(domains)} domains "
          f"({', '.join(domains)}), {dataset.dtype.name}")
    print(f"model: quickstart shape, {m.num_layers} layers, d_model {m.d_model}, "
          f"{m.num_heads}/{m.kv_heads} heads, vocab {m.vocab_size}, {params:,} parameters; "
          f"{config.train.micro_batch_size} × {config.train.seq_len} tokens per step; "
          f"helox default precision on this CPU: {precision}, train.compile "
          f"{config.train.compile}")


def main() -> None:
    args = parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average "
          f"{os.getloadavg()[0]:.2f} before the run; {args.rounds} rounds", flush=True)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workspace = args.workspace or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="helox-bench-loader-")))
        config, dataset, prepare_s = prepare(workspace)
        if args.no_compile:
            config = config.model_copy(update={"train": config.train.model_copy(
                update={"compile": False})})
        precision = pick_precision(config.train.precision, DEVICE)
        describe(config, dataset, prepare_s, precision)
        models = build_models(config, precision, config.train.compile)
        cases = loader_cases(dataset.domains("train"), args.rebalance_every)
        rates = run_rounds(models, cases, dataset, config, args)
        loops = run_loops(models[0], dataset, args)
    tokens_per_step = config.train.micro_batch_size * config.train.seq_len
    print_models(models, tokens_per_step)
    print_loader(rates, statistics.median(models[0].rate.tokens_per_s), args)
    print_loops(loops, tokens_per_step)
    print(f"\nbenchmark time {time.perf_counter() - started:.0f} s "
          f"(load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    main()
