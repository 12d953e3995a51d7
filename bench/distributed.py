"""Data parallelism on one machine's cores: 1 process × 2 threads against 2 processes × 1 thread
(gloo) for DDP, FSDP2 and ZeRO-1, on the reference shape (6 layers, d_model 384, 6 heads,
SwiGLU 1024, context 256, vocab 8192, untied embeddings: 16.9 M parameters) and one global
batch of 8 sequences (2,048 tokens) per step, fp32 AdamW with clipping, Helox's `train_step`.

What is measured, interleaved round by round (each round starts every variant's processes
afresh): tokens/s of the global batch (median of the timed steps after warm-up), and for the
2-process variants the time of the step's collectives run alone on the same group with the
same volumes (DDP and ZeRO-1: an all-reduce of every gradient; ZeRO-1 adds the broadcast of
the updated parameters; FSDP2: an all-gather of the parameters for forward and again for
backward, and a reduce-scatter of the gradients). Ratios are of medians, against 1 × 2.

What 2 CPU cores can show: whether the distributed paths cost more than they split. They
cannot show a speed-up from data parallelism: 2 processes × 1 thread do the same matmul work
as 1 process × 2 threads, plus the collectives, on the same 2 cores and the same memory bus.

    .venv/bin/python bench/distributed.py [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from helox.data.loader import MicroBatch
from helox.distributed.config import ParallelConfig
from helox.model.config import ModelConfig
from helox.model.llama import Llama
from helox.testing.distributed import run_distributed
from helox.training.optim import OptimConfig
from helox.training.setup import parallel_training
from helox.training.step import make_loss_fn, train_step

SHAPE = ModelConfig(vocab_size=8192, d_model=384, num_layers=6, num_heads=6, num_kv_heads=6,
                    d_ffn=1024, max_seq_len=256, tie_embeddings=False)
OPTIM = OptimConfig(lr=3e-4, weight_decay=0.1, grad_clip_norm=1.0)
GLOBAL_BATCH, SEQ_LEN, WARMUP_STEPS = 8, 256, 2
CPU = torch.device("cpu")
VARIANTS = {"1 process × 2 threads": None,
            "DDP, 2 processes × 1 thread": ParallelConfig(dp_replicate=2, dp_shard=1),
            "FSDP2, 2 processes × 1 thread": ParallelConfig(dp_replicate=1, dp_shard=2),
            "ZeRO-1, 2 processes × 1 thread": ParallelConfig(dp_replicate=2, dp_shard=1,
                                                             zero1=True)}


def measure(cfg: ParallelConfig | None, steps: int) -> dict:
    """On each rank (or the one process): step times of the global batch, then the time of
    this layout's collectives alone."""
    world = dist.get_world_size() if cfg else 1
    rank = dist.get_rank() if cfg else 0
    torch.set_num_threads(2 // world)
    torch.manual_seed(0)
    model = Llama(SHAPE)
    num_params = model.num_params()
    parallel, optimizer = parallel_training(model, OPTIM, cfg, CPU)
    loss_fn = make_loss_fn(parallel, CPU, "fp32")
    rows = GLOBAL_BATCH // world
    generator = torch.Generator().manual_seed(1)
    times_s = []
    for step in range(WARMUP_STEPS + steps):
        tokens = torch.randint(0, SHAPE.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1),
                               generator=generator)[rank * rows:(rank + 1) * rows]
        if cfg is not None:
            dist.barrier()
        started = time.perf_counter()
        train_step(loss_fn, parallel, optimizer,
                   [MicroBatch(tokens[:, :-1], tokens[:, 1:], None, None)], OPTIM.grad_clip_norm)
        if step >= WARMUP_STEPS:
            times_s.append(time.perf_counter() - started)
    return {"step_s": statistics.median(times_s),
            "comm_s": collectives_s(cfg, num_params) if cfg is not None else 0.0}


def collectives_s(cfg: ParallelConfig, num_params: int, repeats: int = 3) -> float:
    """The step's collectives with its volumes, alone on the group (median of `repeats`)."""
    world = dist.get_world_size()
    per_rank = num_params // world
    full, shard = torch.randn(per_rank * world), torch.randn(per_rank)
    times = []
    for _ in range(repeats):
        dist.barrier()
        started = time.perf_counter()
        if cfg.dp_shard > 1:
            for _ in range(2):  # forward and backward each gather the parameters
                dist.all_gather_single(full, shard)
            dist.reduce_scatter_single(shard, full)
        else:
            dist.all_reduce(full)
            if cfg.zero1:  # each rank broadcasts the parameters it updated
                dist.all_gather_single(full, shard)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    args = parser.parse_args()
    tokens = GLOBAL_BATCH * SEQ_LEN
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name, cfg in VARIANTS.items():
            if cfg is None:
                measured = measure(None, args.steps)
            else:  # every rank times the same steps; the slowest rank sets the pace
                ranks = run_distributed(measure, 2, (cfg, args.steps))
                measured = {key: max(r[key] for r in ranks) for key in ranks[0]}
            results[name].append(measured)
            print(f"round {round_index + 1}: {name}: {tokens / measured['step_s']:,.0f} "
                  f"tokens/s, collectives {measured['comm_s'] * 1000:.0f} ms", flush=True)
    base = statistics.median(tokens / r["step_s"] for r in results["1 process × 2 threads"])
    print(f"\n{'variant':<32} {'tokens/s':>10} {'× 1×2':>7} {'collectives':>12} {'of step':>8}")
    for name, rows in results.items():
        rate = statistics.median(tokens / r["step_s"] for r in rows)
        comm = statistics.median(r["comm_s"] for r in rows)
        step = statistics.median(r["step_s"] for r in rows)
        print(f"{name:<32} {rate:>10,.0f} {rate / base:>7.2f} {comm * 1000:>9.0f} ms "
              f"{comm / step:>8.0%}")


if __name__ == "__main__":
    main()
