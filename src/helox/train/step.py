"""One optimizer step: the loss function in the run's precision, accumulation over
micro-batches, clipping, the NaN/spike gate and the update.

Legend: B micro-batch size, T sequence length, V vocabulary, N target tokens.
"""

from __future__ import annotations

import math
from typing import Callable, Collection, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from helox.data.loader import MicroBatch
from helox.errors import HeloxError
from helox.hardware import cpu_has_native_bf16

LossFn = Callable[[MicroBatch], dict[str, torch.Tensor]]
"""A micro-batch -> each objective summed over its target tokens: {"lm": ..., ...}."""


def make_loss_fn(model: nn.Module, device: torch.device, precision: str,
                 objectives: Collection[str] = ("lm",)) -> LossFn:
    """Forward in the run's precision (bf16 autocast keeps fp32 master weights and optimizer
    state) and the objectives in fp32. "lm" is always computed (it is what evaluation and the
    logs compare); "z_loss" adds Σ logsumexp(logits)² over the tokens."""

    def loss_sums(batch: MicroBatch) -> dict[str, torch.Tensor]:
        inputs_BT, targets_BT, positions_BT, doc_ids_BT = (
            None if t is None else t.to(device, non_blocking=True) for t in batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits_BTV = model(inputs_BT, positions_BT, doc_ids_BT)
        logits_NV = logits_BTV.float().flatten(0, 1)
        sums = {"lm": F.cross_entropy(logits_NV, targets_BT.flatten(), reduction="sum")}
        if "z_loss" in objectives:
            sums["z_loss"] = torch.logsumexp(logits_NV, dim=-1).square().sum()
        return sums

    return loss_sums


def compiled(loss_fn: LossFn) -> LossFn:
    """torch.compile of forward + loss together: the cross-entropy over (B*T, V) logits is
    memory-bound work the compiler fuses with the head (bench/: +30% over eager bf16 here).
    A compiler failure becomes a HeloxError that says how to run without it."""
    compiled_fn = torch.compile(loss_fn)

    def call(batch: MicroBatch) -> dict[str, torch.Tensor]:
        try:
            return compiled_fn(batch)
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
    """Next-token cross-entropy per target token (the "lm" objective, unweighted)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    terms: dict[str, float]
    """Every objective per target token, unweighted, and "total": the weighted sum."""
    skip_reason: str | None = None
    """Why the optimizer did not step: "nonfinite" (NaN/Inf loss or gradient norm) or what
    the gate returned; None when it stepped."""

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None


Gate = Callable[[dict[str, float], float], "str | None"]
"""(terms, grad norm) of a finite step -> a reason to skip its update, or None to apply it."""


def train_step(loss_fn: LossFn, model: nn.Module, optimizer: torch.optim.Optimizer,
               batches: list[MicroBatch], clip_norm: float | None,
               weights: dict[str, float] | None = None, poison: bool = False,
               loss_factor: float = 1.0, gate: Gate | None = None) -> StepOutcome:
    """One optimizer step over the micro-batches on Σ weight × objective (default: lm alone).

    Each objective is summed over tokens and divided by the target tokens of *all*
    micro-batches, so accumulation gives the same gradient as one big batch whatever the
    micro-batch split. A NaN/Inf loss or gradient norm skips the update (the weights and the
    optimizer state stay as they were), and so does a step the `gate` rejects (a loss spike).
    Fault injection: `poison` makes the loss NaN, `loss_factor` multiplies it (a spike).
    """
    weights = weights or {"lm": 1.0}
    num_targets = sum(batch.targets.numel() for batch in batches)
    totals: dict[str, torch.Tensor] = {}
    for batch in batches:
        sums = loss_fn(batch)
        if poison or loss_factor != 1.0:
            scale = float("nan") if poison else loss_factor
            sums = {name: value * scale for name, value in sums.items()}
        loss = sum(weight * sums[name] for name, weight in weights.items()) / num_targets
        loss.backward()
        for name, value in [*sums.items(), ("total", loss * num_targets)]:
            value = value.detach() / num_targets
            totals[name] = totals[name] + value if name in totals else value
    params = [p for p in model.parameters() if p.grad is not None]
    if clip_norm is None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
    # The one host sync of the step, before the update: it decides whether there is one.
    *term_values, norm_value = torch.stack([*totals.values(), grad_norm.float()]).tolist()
    terms = dict(zip(totals, term_values))
    reason = None
    if not (math.isfinite(terms["total"]) and math.isfinite(norm_value)):
        reason = "nonfinite"
    elif gate is not None:
        reason = gate(terms, norm_value)
    if reason is None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(terms["lm"], norm_value, terms, reason)


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


