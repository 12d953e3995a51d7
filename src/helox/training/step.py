"""One optimizer step: the loss function in the run's precision, accumulation over
micro-batches, clipping, the NaN/spike gate and the update.

Legend: B micro-batch size, T sequence length, V vocabulary, N target tokens.
"""

from __future__ import annotations

import math
from typing import Callable, Collection, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from helox.data.loader import IGNORE_INDEX, MicroBatch
from helox.errors import HeloxError
from helox.hardware import cpu_has_native_bf16

LossFn = Callable[[MicroBatch], dict[str, torch.Tensor]]
"""A micro-batch -> each objective summed over its target tokens: {"lm": ..., ...}."""


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The precisions that run the forward under autocast, and its compute dtype."""


def make_loss_fn(model: nn.Module, device: torch.device, precision: str,
                 objectives: Collection[str] = ("lm",), compile_objectives: bool = False,
                 ) -> LossFn:
    """Forward in the run's precision (bf16/fp16 autocast keeps fp32 master weights and
    optimizer state) and the objectives in fp32. "lm" is always computed (it is what
    evaluation and the logs compare); "z_loss" adds Σ logsumexp(logits)² over the tokens.
    Targets set to IGNORE_INDEX (untrained chat tokens) count in neither.
    `compile_objectives` compiles the objectives on their own (`train.compile: blocks`)."""
    dtype = AUTOCAST_DTYPES.get(precision, torch.bfloat16)

    def objective_sums(logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                       ) -> dict[str, torch.Tensor]:
        logits_NV, targets_N = logits_BTV.flatten(0, 1), targets_BT.flatten()
        if fuses_cross_entropy(logits_NV):
            sums = {"lm": CrossEntropySum.apply(logits_NV, targets_N)}
        else:
            sums = {"lm": F.cross_entropy(logits_NV.float(), targets_N, reduction="sum")}
        if "z_loss" in objectives:
            logsumexp_N = torch.logsumexp(logits_NV.float(), dim=-1)
            sums["z_loss"] = (logsumexp_N.square() * (targets_N != IGNORE_INDEX)).sum()
        return sums

    objectives_fn = torch.compile(objective_sums) if compile_objectives else objective_sums

    def loss_sums(batch: MicroBatch) -> dict[str, torch.Tensor]:
        inputs_BT, targets_BT, positions_BT, doc_ids_BT = (
            None if t is None else t.to(device, non_blocking=True) for t in batch)
        with torch.autocast(device.type, dtype=dtype, enabled=precision in AUTOCAST_DTYPES):
            logits_BTV = model(inputs_BT, positions_BT, doc_ids_BT)
        return objectives_fn(logits_BTV, targets_BT)

    return loss_sums


def fuses_cross_entropy(logits: torch.Tensor) -> bool:
    """Whether the loss takes CrossEntropySum's path: 16-bit logits that need a gradient,
    inside torch.compile (decided while tracing), where it makes a bf16 step 1.014x faster.
    Eager steps, fp32 logits and evaluation keep F.cross_entropy."""
    return (torch.compiler.is_compiling() and logits.requires_grad
            and logits.dtype in (torch.bfloat16, torch.float16))


class CrossEntropySum(torch.autograd.Function):
    """Σ next-token cross-entropy over the targets that are not IGNORE_INDEX, in fp32, with
    its gradient computed in the forward and kept in the logits' 16-bit dtype, as Liger
    Kernel's fused cross-entropy does. Compiled, the forward reads the (N, V) logits for the
    log-sum-exp and once more to write softmax − one-hot, and the backward only scales it; F.
    cross_entropy's backward reads the logits again and recomputes the softmax. A compiled bf16
    step of the reference shape on a 2-core Xeon: 1.014x in two interleaved A/Bs. The gradient
    is rounded to 16 bits before it is multiplied by the loss's scale (in fp32), so it can
    differ from F.cross_entropy's by one more 16-bit rounding (tests/training/test_step.py)."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        x_NV = logits_NV.float()
        trained_N = targets_N != IGNORE_INDEX
        index_N1 = torch.where(trained_N, targets_N, 0).unsqueeze(1)
        logsumexp_N = torch.logsumexp(x_NV, dim=-1)
        picked_N = x_NV.gather(1, index_N1).squeeze(1)
        loss = torch.where(trained_N, logsumexp_N - picked_N, 0.0).sum()
        vocab_1V = torch.arange(x_NV.shape[1], device=x_NV.device).unsqueeze(0)
        one_hot_NV = vocab_1V == targets_N.unsqueeze(1)  # no row for IGNORE_INDEX (-100)
        grad_NV = (torch.exp(x_NV - logsumexp_N.unsqueeze(1)) - one_hot_NV.float()) \
            * trained_N.unsqueeze(1)
        ctx.save_for_backward(grad_NV.to(logits_NV.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        (grad_NV,) = ctx.saved_tensors
        return (grad_NV.float() * grad_loss).to(grad_NV.dtype), None


def compiled(loss_fn: LossFn) -> LossFn:
    """torch.compile of forward + loss together: the cross-entropy over (B*T, V) logits is
    memory-bound work the compiler fuses with the head (bench/: +30% over eager bf16 here).
    A compiler failure becomes a HeloxError that says how to run without it."""
    return compiler_errors(torch.compile(loss_fn))


def compile_blocks(model: nn.Module) -> None:
    """Regional compilation (`train.compile: blocks`): each transformer block's forward
    compiled on its own, as torchtitan compiles per block. The blocks share one compiled
    graph (inductor's cache keys on the code, not the module), so a cold start compiles one
    block instead of the whole model: the first step of a 124 M-parameter model took 22 s
    against 41 s, at 0.95-0.99x the one-graph steps' speed afterwards (docs/speed.md).
    Hooks (telemetry probes) stay outside the compiled code."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def compiler_errors(loss_fn: LossFn) -> LossFn:
    """`loss_fn` with a compiler failure turned into a HeloxError that says how to run
    without the compiler."""

    def call(batch: MicroBatch) -> dict[str, torch.Tensor]:
        try:
            return loss_fn(batch)
        except Exception as exc:
            if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise HeloxError(f"torch.compile failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                 hint="run eagerly with --set train.compile=false, or install "
                                      "a C++ compiler (inductor needs one on CPU)") from exc
            raise

    return call


class StepOutcome(NamedTuple):
    loss: float
    """Next-token cross-entropy per target token (the "lm" objective, unweighted), or the
    run's primary objective (DPO's loss per pair)."""
    grad_norm: float
    """Global gradient norm before clipping (of the unscaled gradients under fp16)."""
    terms: dict[str, float]
    """Every objective per target token, unweighted, and "total": the weighted sum."""
    skip_reason: str | None = None
    """Why the optimizer did not step: "nonfinite" (NaN/Inf loss or gradient norm) or what
    the gate returned; None when it stepped."""
    loss_scale: float | None = None
    """fp16: the loss scale this step's backward used (the next step's is halved after a
    non-finite step, doubled after growth_interval clean ones); None without a scaler."""

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None

    @property
    def overflowed(self) -> bool:
        """fp16: skipped because the scaled gradients overflowed while the loss was finite.
        That is the scaler probing its range (at the start, and once after each growth), not
        a fault of the run; a scale that keeps halving towards 1 and below is one."""
        return (self.loss_scale is not None and self.skip_reason == "nonfinite"
                and math.isfinite(self.terms["total"]))


Gate = Callable[[float, float], "str | None"]
"""(loss, grad norm) of a finite step -> a reason to skip its update, or None to apply it."""


def make_scaler(precision: str, device: torch.device, init_scale: float = 2.0**16,
                growth_interval: int = 2000) -> torch.amp.GradScaler | None:
    """Dynamic loss scaling for fp16, None otherwise. fp16's smallest normal is 6e-5, so small
    gradients underflow to zero unless the loss is multiplied up before the backward; bf16
    has fp32's exponent range and needs no scaling. Its state_dict() belongs in checkpoints."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=init_scale,
                                growth_interval=growth_interval)


def train_step(loss_fn: LossFn, model: nn.Module, optimizer: torch.optim.Optimizer,
               batches: list[MicroBatch], clip_norm: float | None,
               weights: dict[str, float] | None = None, gate: Gate | None = None,
               scaler: torch.amp.GradScaler | None = None,
               group: dist.ProcessGroup | None = None, masked: bool = False,
               divisor: Callable[[list[MicroBatch]], float] | None = None,
               primary: str = "lm") -> StepOutcome:
    """One optimizer step over the micro-batches on Σ weight × objective (default: lm alone).

    Each objective is summed over tokens and divided by the target tokens of *all*
    micro-batches, so accumulation gives the same gradient as one big batch whatever the
    micro-batch split. A NaN/Inf loss or gradient norm skips the update (the weights and the
    optimizer state stay as they were), and so does a step the `gate` rejects (a loss spike).
    With a `scaler` (fp16) each backward runs on the scaled loss, and the gradients are
    unscaled before the norm, the clipping and the decision; the reported terms are unscaled.
    Faults are injected by wrapping `loss_fn` (training/faults.py), never here.
    With a data-parallel `group`, the objectives are averaged over its ranks before the
    decision (the gradient norm already is global): every rank reports the global loss and
    skips, or steps, together, so the replicas never diverge.
    With `masked` targets (chat data: IGNORE_INDEX where no loss is taken), ranks hold
    different numbers of trained targets; their global count (one more all-reduce) is the
    divisor, so the averaged gradient is the one-process gradient of the global batch.
    A `divisor` replaces the count of trained targets (DPO: the number of pairs), and
    `primary` names the objective reported as the step's loss.
    """
    scaler = scaler if scaler is not None and scaler.is_enabled() else None
    weights = weights or {"lm": 1.0}
    if divisor is not None:
        num_targets = divisor(batches)
    elif masked:
        num_targets = trained_targets(batches, group)
    else:  # every target is trained, and every rank holds as many
        num_targets = sum(batch.targets.numel() for batch in batches)
    totals: dict[str, torch.Tensor] = {}
    for batch in batches:
        sums = loss_fn(batch)
        loss = sum(weight * sums[name] for name, weight in weights.items()) / num_targets
        (loss if scaler is None else scaler.scale(loss)).backward()
        for name, value in [*sums.items(), ("total", loss * num_targets)]:
            value = value.detach() / num_targets
            totals[name] = totals[name] + value if name in totals else value
    if scaler is not None:
        scaler.unscale_(optimizer)  # also records whether the scaled gradients overflowed
    params = [p for p in model.parameters() if p.grad is not None]
    clip_in_update = clip_norm is not None and clips_in_update(optimizer, params, scaler)
    if clip_norm is None or clip_in_update:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
    if isinstance(grad_norm, DTensor):  # FSDP2: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    if group is not None:  # every data-parallel rank decides on the global figures
        totals = mean_over_ranks(totals, group)
    # The one host sync of the step, before the update: it decides whether there is one.
    # The scale rides along (scaler.get_scale() would be a sync of its own).
    device = totals["total"].device  # FSDP2's CPU offload keeps the gradients on the host
    synced = [*totals.values(), grad_norm.float().to(device)]
    if scaler is not None:
        synced.append(scaler._get_scale_async())
    values = torch.stack(synced).tolist()
    loss_scale = None if scaler is None else values.pop()
    *term_values, norm_value = values
    terms = dict(zip(totals, term_values))
    reason = None
    if not (math.isfinite(terms["total"]) and math.isfinite(norm_value)):
        reason = "nonfinite"
    elif gate is not None:
        reason = gate(terms[primary], norm_value)
    if reason is None:
        # Not scaler.step(): a finite norm means finite gradients, which is all it checks,
        # with a host sync of its own.
        if clip_in_update:
            step_clipped(optimizer, grad_norm, clip_norm)
        else:
            optimizer.step()
    if scaler is not None:
        update_scale(scaler, reason, loss_scale)
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(terms[primary], norm_value, terms, reason, loss_scale)


def clips_in_update(optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                    scaler: torch.amp.GradScaler | None) -> bool:
    """Whether the update can apply the gradient clipping itself (`step_clipped`): torch's
    fused Adam/AdamW divides every gradient by the optimizer's `grad_scale` inside its one
    pass over the parameters, which saves clip_grad_norm_'s own pass reading and writing every
    gradient (1.026x a compiled bf16 step of the reference shape on a 2-core Xeon). Not with
    a loss scaler, whose protocol `grad_scale` is, nor with DTensor gradients (FSDP2) or
    another optimizer (Adafactor, ZeRO-1's wrapper), which clip first."""
    return (scaler is None and isinstance(optimizer, torch.optim.Adam)
            and bool(optimizer.defaults.get("fused"))
            and not any(isinstance(p.grad, DTensor) for p in params))


def step_clipped(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor,
                 clip_norm: float) -> None:
    """optimizer.step() on the gradients clipped to `clip_norm`: clip_grads_with_norm_'s
    coefficient, min(1, clip_norm / (norm + 1e-6)), applied by the fused update as a division
    by its inverse, the way GradScaler hands the fused optimizers its scale. Nothing clipped,
    that is a division by 1 and the update is bitwise clipping-first's; otherwise they agree
    to fp32 rounding (tests/training/test_optim.py). No host sync."""
    coefficient = torch.clamp(clip_norm / (grad_norm + 1e-6), max=1.0)
    optimizer.grad_scale = 1.0 / coefficient.float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


def rows(batches: list[MicroBatch]) -> int:
    """Sequences in the micro-batches: DPO's divisor (one preference pair per row)."""
    return sum(batch.inputs.shape[0] for batch in batches)


def trained_targets(batches: list[MicroBatch], group: dist.ProcessGroup | None = None,
                    ) -> float:
    """The divisor of this rank's objective sums: its targets that are not IGNORE_INDEX, or,
    with a `group`, the group's total over its size (the gradient averaging across ranks then
    divides by the global count). At least 1, so a batch of padding divides nothing by 0."""
    count = sum(int((batch.targets != IGNORE_INDEX).sum()) for batch in batches)
    if group is None:
        return max(1, count)
    total = torch.tensor([count], dtype=torch.float64)
    dist.all_reduce(total, group=group)
    return max(1.0, float(total) / dist.get_world_size(group))


def mean_over_ranks(totals: dict[str, torch.Tensor], group: dist.ProcessGroup,
                    ) -> dict[str, torch.Tensor]:
    """Each objective averaged over the group's ranks (one all-reduce of a few numbers; a SUM
    then a division, as gloo has no AVG), so that ranks with equal token counts report the
    loss of the global batch."""
    stacked = torch.stack(list(totals.values()))
    dist.all_reduce(stacked, group=group)
    stacked = stacked / dist.get_world_size(group)
    return dict(zip(totals, stacked.unbind()))


def update_scale(scaler: torch.amp.GradScaler, reason: str | None, used_scale: float) -> None:
    """Back off after a non-finite step, else count a clean one towards growth.

    update() reads what unscale_ found: an inf/NaN gradient multiplies the scale by
    backoff_factor and restarts the growth count. A step the gate rejected had finite
    gradients at this scale, so it counts as clean: the scale is not what went wrong. A
    non-finite loss or norm with finite gradients (the norm itself overflowing) is invisible
    to update(), so the back-off is written in; the state_dict() syncs cost nothing on a
    skipped step."""
    scaler.update()
    if reason == "nonfinite":
        backed_off = used_scale * scaler.get_backoff_factor()
        scaler.load_state_dict(scaler.state_dict() | {"scale": backed_off, "_growth_tracker": 0})


MATH_ATTENTION_MAX_TOKENS = 256
"""The longest training sequence `train.attention: auto` computes with math attention."""


def pick_attention(name: str, device: torch.device, precision: str, seq_len: int) -> str:
    """The attention kernel of `train.attention`: "auto" resolved by a table of device,
    precision and sequence length (not timed at start, so that a run and its rerun compute
    alike). Measured on a 2-core Xeon with AMX, forward + backward of causal bf16 attention,
    compiled (head dim 64): math attention against SDPA's CPU flash kernel took 0.86× the
    time at 256 tokens (its bf16 matmuls run on AMX, the compiler fuses mask and softmax), but
    1.39× at 384, 1.66× at 512 and 2.97× at 1,024 (it materialises T² scores); a compiled bf16
    step of the reference shape (256 tokens) ran 1.07–1.13× faster with it, one of a 110 M
    model at 1,024 tokens 0.75×. In fp32 SDPA was faster at 256 too (16.3 against 20.6 ms
    eager), and on CUDA SDPA runs FlashAttention."""
    if name != "auto":
        return name
    short = seq_len <= MATH_ATTENTION_MAX_TOKENS
    return "math" if device.type == "cpu" and precision in ("bf16", "fp16") and short \
        else "sdpa"


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


