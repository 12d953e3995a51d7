"""The same training steps on one process, or data-parallel on the ranks of a gloo group, for
tests that compare them (tests/distributed/). Every rank takes its contiguous share of each
global batch and passes its group to `train_step`, so the loss reported is the global
batch's.

Legend: S steps, G global batch sequences, T sequence length.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from helox.checkpoint.sharded import load_dcp_part, save_dcp, sharded_state
from helox.data.loader import MicroBatch
from helox.distributed.config import ParallelConfig
from helox.distributed.parallelize import full_weights
from helox.model.config import ModelConfig
from helox.model.llama import Llama
from helox.training.optim import OptimConfig
from helox.training.setup import parallel_training
from helox.training.step import Gate, LossFn, make_loss_fn, train_step

TINY = ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=16)
GLOBAL_BATCH, SEQ_LEN = 8, 16
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0)
MODES = {"ddp": ParallelConfig(dp_replicate=2, dp_shard=1),
         "fsdp": ParallelConfig(dp_replicate=1, dp_shard=2),
         "zero1": ParallelConfig(dp_replicate=2, dp_shard=1, zero1=True),
         "ddp_summed": ParallelConfig(dp_replicate=2, dp_shard=1),
         "hsdp": ParallelConfig(dp_replicate=2, dp_shard=2),  # on 4 ranks
         "fsdp_any": ParallelConfig(),
         "fsdp_offload": ParallelConfig(cpu_offload=True)}
"""What each mode runs on 2 ranks (hsdp: 2 replicas of 2 shards, 4 ranks). ddp_summed is DDP
with a planted bug: gradients summed over the ranks instead of averaged (what PyTorch issue
#162338 reports of FSDP2 on gloo). fsdp_any and fsdp_offload shard over every rank there is
(the GPU tests: 1 or 2 GPUs)."""
CPU = torch.device("cpu")


def global_batches(steps: int, seed: int) -> torch.Tensor:
    """S × G × (T + 1) random tokens, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (steps, GLOBAL_BATCH, SEQ_LEN + 1),
                         generator=generator)


class Run:
    """One process's (or rank's) model, optimizer and loss under `mode` (None: one process),
    started from `seed`; `steps` trains it on a range of the shared global batches."""

    def __init__(self, mode: str | None, seed: int, device: torch.device = CPU,
                 precision: str = "fp32"):
        self.group = dist.group.WORLD if mode else None
        """Passed to train_step: the ranks decide on the global loss."""
        self.rank = dist.get_rank() if mode else 0
        self.rows = GLOBAL_BATCH // (dist.get_world_size() if mode else 1)
        self.device = device
        torch.manual_seed(seed)
        self.model = Llama(TINY).to(device)
        self.parallel, self.optimizer = parallel_training(
            self.model, OPTIM, MODES[mode] if mode else None, device)
        if mode == "ddp_summed":
            self.parallel.register_comm_hook(None, _summed)
        self.loss_fn: LossFn = make_loss_fn(self.parallel, device, precision)
        self.reasons: list[str | None] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def steps(self, batches_SGT: torch.Tensor, span: range, gate: Gate | None = None,
              loss_fn: LossFn | None = None) -> Run:
        for step in span:
            local_NT = batches_SGT[step][self.rank * self.rows:(self.rank + 1) * self.rows]
            local_NT = local_NT.to(self.device)
            outcome = train_step(loss_fn or self.loss_fn, self.parallel, self.optimizer,
                                 [MicroBatch(local_NT[:, :-1], local_NT[:, 1:], None, None)],
                                 1.0, gate=gate, group=self.group)
            self.reasons.append(outcome.skip_reason)
            self.losses.append(outcome.loss)
            self.grad_norms.append(outcome.grad_norm)
        return self

    def result(self) -> dict:
        return {"reasons": self.reasons, "losses": self.losses, "grad_norms": self.grad_norms,
                "weights": full_weights(self.model)}


def train_steps(mode: str | None, steps: int = 20, seed: int = 0, device: str = "cpu",
                precision: str = "fp32") -> dict:
    """`steps` optimizer steps (fp32 unless `precision`, clipping at 1.0) on `device`; mode
    None runs one process. Returns each step's global loss and gradient norm, and the final
    weights in full (on the CPU)."""
    run = Run(mode, seed, _rank_device(device, mode), precision)
    result = run.steps(global_batches(steps, seed), range(steps)).result()
    result["weights"] = {name: w.cpu() for name, w in result["weights"].items()}
    return result


def _rank_device(device: str, mode: str | None) -> torch.device:
    """CUDA: each rank its own GPU (LOCAL_RANK)."""
    if device == "cuda":
        return torch.device("cuda", dist.get_rank() if mode else 0)
    return torch.device(device)


def save_after(mode: str | None, folder: str, stop_at: int, steps: int = 20,
               seed: int = 0) -> None:
    """The first `stop_at` steps of `train_steps`, then the model and optimizer saved through
    DCP (every rank calls it)."""
    run = Run(mode, seed).steps(global_batches(steps, seed), range(stop_at))
    save_dcp(Path(folder), sharded_state({"model": run.parallel, "optimizer": run.optimizer}))


def resume_from(mode: str | None, folder: str, stop_at: int, steps: int = 20,
                seed: int = 0) -> dict:
    """A model started from another seed (so a load that did nothing shows) loads what
    `save_after` wrote, resharded to `mode`, and runs the remaining steps."""
    run = Run(mode, seed + 1)
    load_dcp_part(Path(folder), "model", run.parallel)
    load_dcp_part(Path(folder), "optimizer", run.optimizer, run.parallel)
    return run.steps(global_batches(steps, seed), range(stop_at, steps)).result()


def spike_on_one_rank(mode: str, reduce: bool, steps: int = 6, spike_at: int = 3,
                      seed: int = 0) -> dict:
    """Rank 1's loss × 10 at step `spike_at` (0-based), under a gate that rejects a loss above
    1.5 × ln V. With `reduce` the ranks decide on the global loss (train_step's `group`);
    without, each on its own: the bug a data-parallel loop must not have. Returns each step's
    skip reason and loss, and the final weights."""
    run = Run(mode, seed)
    if not reduce:
        run.group = None
    step_now = [0]

    def spiky(batch: MicroBatch) -> dict[str, torch.Tensor]:
        sums = run.loss_fn(batch)
        if run.rank == 1 and step_now[0] == spike_at:
            return {name: value * 10 for name, value in sums.items()}
        return sums

    limit = 1.5 * math.log(TINY.vocab_size)
    batches = global_batches(steps, seed)
    for step in range(steps):
        step_now[0] = step
        run.steps(batches, range(step, step + 1), loss_fn=spiky,
                  gate=lambda loss, _norm: "loss_spike" if loss > limit else None)
    return run.result()


def _summed(_state, bucket):
    """A DDP communication hook that sums the ranks' gradients (the planted bug)."""
    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])
