"""The same training steps on one process, or data-parallel on the ranks of a gloo group, for
tests that compare them (tests/distributed/). Every rank takes its contiguous share of each
global batch; the loss reported is the mean over the global batch.

Legend: S steps, G global batch sequences, T sequence length.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from helox.checkpoint.sharded import load_sharded, save_sharded
from helox.data.loader import MicroBatch
from helox.distributed.config import ParallelConfig
from helox.distributed.parallelize import build_mesh, parallelize, zero1_optimizer
from helox.model.config import ModelConfig
from helox.model.llama import Llama
from helox.training.optim import OptimConfig, build_optimizer, optimizer_spec
from helox.training.step import make_loss_fn, train_step

TINY = ModelConfig(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=16)
GLOBAL_BATCH, SEQ_LEN = 8, 16
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0)
MODES = {"ddp": ParallelConfig(dp_replicate=2, dp_shard=1),
         "fsdp": ParallelConfig(dp_replicate=1, dp_shard=2),
         "zero1": ParallelConfig(dp_replicate=2, dp_shard=1, zero1=True),
         "ddp_summed": ParallelConfig(dp_replicate=2, dp_shard=1)}
"""What each mode runs on 2 ranks; ddp_summed is DDP with a planted bug: gradients summed
over the ranks instead of averaged (what PyTorch issue #162338 reports of FSDP2 on gloo)."""
CPU = torch.device("cpu")


def global_batches(steps: int, seed: int) -> torch.Tensor:
    """S × G × (T + 1) random tokens, the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (steps, GLOBAL_BATCH, SEQ_LEN + 1),
                         generator=generator)


def train_steps(mode: str | None, steps: int = 20, seed: int = 0) -> dict:
    """`steps` optimizer steps (fp32, clipping at 1.0); mode None runs one process. Returns
    each step's global loss and gradient norm, and the final weights in full."""
    world = dist.get_world_size() if mode else 1
    rank = dist.get_rank() if mode else 0
    torch.manual_seed(seed)
    model = Llama(TINY)
    parallel, optimizer = _parallel(model, mode)
    loss_fn = make_loss_fn(parallel, CPU, "fp32")
    rows = GLOBAL_BATCH // world
    losses, grad_norms = [], []
    for tokens_GT in global_batches(steps, seed):
        local_NT = tokens_GT[rank * rows:(rank + 1) * rows]
        batch = MicroBatch(local_NT[:, :-1], local_NT[:, 1:], None, None)
        outcome = train_step(loss_fn, parallel, optimizer, [batch], clip_norm=1.0)
        losses.append(_global_mean(outcome.loss, world))
        grad_norms.append(outcome.grad_norm)
    weights = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for name, p in model.named_parameters()}
    return {"losses": losses, "grad_norms": grad_norms, "weights": weights}


def _global_mean(value: float, world: int) -> float:
    if world == 1:
        return value
    total = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / world


def _summed(_state, bucket):
    """A DDP communication hook that sums the ranks' gradients (the planted bug)."""
    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def resharded_steps(save_mode: str | None, load_mode: str | None, folder: str, stop_at: int,
                    steps: int = 20, seed: int = 0) -> dict | None:
    """Phase one of a resharding test when `load_mode` is "-": `stop_at` steps under
    `save_mode`, saved with `save_sharded`. Otherwise phase two: a fresh model under
    `load_mode` loads that checkpoint and runs steps stop_at..steps-1 of the same batches;
    returns their losses and gradient norms and the final weights, as `train_steps` does."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mode = save_mode if load_mode == "-" else load_mode
    torch.manual_seed(seed + 1 if load_mode != "-" else seed)  # phase two starts elsewhere
    model = Llama(TINY)
    parallel, optimizer = _parallel(model, mode)
    loss_fn = make_loss_fn(parallel, CPU, "fp32")
    batches = global_batches(steps, seed)
    if load_mode != "-":
        load_sharded(Path(folder), parallel, optimizer)
    span = range(stop_at) if load_mode == "-" else range(stop_at, steps)
    rows = GLOBAL_BATCH // world
    losses, grad_norms = [], []
    for step in span:
        local_NT = batches[step][rank * rows:(rank + 1) * rows]
        outcome = train_step(loss_fn, parallel, optimizer,
                             [MicroBatch(local_NT[:, :-1], local_NT[:, 1:], None, None)], 1.0)
        losses.append(_global_mean(outcome.loss, world))
        grad_norms.append(outcome.grad_norm)
    if load_mode == "-":
        save_sharded(Path(folder), parallel, optimizer)
        return None
    weights = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for name, p in model.named_parameters()}
    return {"losses": losses, "grad_norms": grad_norms, "weights": weights}


def _parallel(model: Llama, mode: str | None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer as `mode` trains them (None: one process)."""
    if mode is None:
        return model, build_optimizer(model, OPTIM)
    cfg = MODES[mode]
    mesh = build_mesh(cfg, CPU)
    parallel = parallelize(model, mesh, cfg)
    optimizer = (zero1_optimizer(*optimizer_spec(parallel, OPTIM), mesh) if cfg.zero1
                 else build_optimizer(parallel, OPTIM))
    if mode == "ddp_summed":
        parallel.register_comm_hook(None, _summed)
    return parallel, optimizer


def spike_on_one_rank(mode: str, reduce: bool, steps: int = 6, spike_at: int = 3,
                      seed: int = 0) -> dict:
    """Rank 1's loss × 10 at step `spike_at` (0-based), under a gate that rejects a loss above
    1.5 × ln V. With `reduce` the ranks decide on the global loss (train_step's `group`);
    without, each on its own: the bug a data-parallel loop must not have. Returns each step's
    skip reason and loss, and the final weights."""
    rank = dist.get_rank()
    torch.manual_seed(seed)
    model = Llama(TINY)
    parallel, optimizer = _parallel(model, mode)
    loss_fn = make_loss_fn(parallel, CPU, "fp32")
    step_now = [0]

    def spiky(batch: MicroBatch) -> dict[str, torch.Tensor]:
        sums = loss_fn(batch)
        if rank == 1 and step_now[0] == spike_at:
            return {name: value * 10 for name, value in sums.items()}
        return sums

    limit = 1.5 * math.log(TINY.vocab_size)
    rows = GLOBAL_BATCH // dist.get_world_size()
    group = dist.group.WORLD if reduce else None
    reasons, losses = [], []
    for step, tokens_GT in enumerate(global_batches(steps, seed)):
        step_now[0] = step
        local_NT = tokens_GT[rank * rows:(rank + 1) * rows]
        outcome = train_step(spiky, parallel, optimizer,
                             [MicroBatch(local_NT[:, :-1], local_NT[:, 1:], None, None)], 1.0,
                             gate=lambda terms, _norm: "loss_spike" if terms["total"] > limit
                             else None, group=group)
        reasons.append(outcome.skip_reason)
        losses.append(outcome.loss)
    weights = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
               for name, p in model.named_parameters()}
    return {"reasons": reasons, "losses": losses, "weights": weights}
