"""AdamW or Adafactor with decoupled weight decay on matrices, and the learning-rate schedules:
warmup, then cosine decay, WSD (warmup-stable-decay) or constant.

A schedule is a pure function of the step, so its whole state is the step the checkpoint holds.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from helox.configbase import StrictModel


class AdaptiveClipConfig(StrictModel):
    window_steps: int = Field(default=100, gt=0)
    """Pre-clip gradient norms of this many recent steps form the reference."""
    percentile: float = Field(default=90.0, gt=0, le=100)
    """Percentile of the window's norms that the threshold is a multiple of."""
    multiplier: float = Field(default=2.0, gt=0)
    """threshold = multiplier × percentile(window), clamped to [floor, ceiling]."""
    floor: float = Field(default=0.05, gt=0)
    """The threshold never goes below this."""
    ceiling: float = Field(default=10.0, gt=0)
    """Nor above this."""
    min_history: int = Field(default=10, gt=0)
    """Norms needed before the threshold adapts; before, optim.grad_clip_norm applies."""

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> AdaptiveClipConfig:
        if self.floor > self.ceiling:
            raise ValueError(f"floor {self.floor} is above ceiling {self.ceiling}")
        if self.min_history > self.window_steps:
            raise ValueError(f"min_history {self.min_history} exceeds window_steps "
                             f"{self.window_steps}")
        return self


class OptimConfig(StrictModel):
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """AdamW (fused), or Adafactor (torch.optim.Adafactor: factored second moments and no first
    moment, so ~no optimizer memory for matrices; beta1, beta2 and eps do not apply, and its
    step is relative to each parameter's RMS, capped by the scheduled lr)."""
    lr: float = Field(default=3e-3, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine decay to lr * min_lr_ratio at the last step; WSD (warmup-stable-
    decay: lr until the last decay_fraction of the steps, then down to lr * min_lr_ratio); or
    constant lr."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Cosine and WSD decay end at lr * min_lr_ratio."""
    decay_fraction: float = Field(default=0.2, gt=0, le=1)
    """WSD: share of train.max_steps spent decaying (Hägele et al. 2024 use 0.1-0.2)."""
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"
    """WSD: the decay's shape; 1-sqrt (lr factor 1 − √progress) beat linear in Hägele et al."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay (AdamW) on matrices; norms and embeddings are not decayed."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """Adam first-moment decay."""
    beta2: float = Field(default=0.95, ge=0, lt=1)
    """Adam second-moment decay."""
    eps: float = Field(default=1e-8, gt=0)
    """Adam epsilon."""
    adaptive_clip: AdaptiveClipConfig | None = None
    """Clip at a threshold that follows the recent gradient norms instead of the fixed
    grad_clip_norm (which still applies until the window has `min_history` norms)."""
    grad_clip_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping."""



def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on 2-D weights except embeddings; norms and embeddings are not decayed."""
    optimizer_class, groups, options = optimizer_spec(model, cfg)
    return optimizer_class(groups, **options)


def optimizer_spec(model: nn.Module, cfg: OptimConfig,
                   ) -> tuple[type[torch.optim.Optimizer], list[dict], dict]:
    """(optimizer class, param groups, constructor options): what `build_optimizer` builds,
    apart, so that ZeRO-1 (helox.distributed) can shard the same optimizer over ranks."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen (a LoRA run's base): no state, no updates
            continue
        is_embedding = name.endswith("embed.weight")
        (decay if param.dim() >= 2 and not is_embedding else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor, groups, {"lr": cfg.lr, "foreach": True}
    device = next(model.parameters()).device
    return torch.optim.AdamW, groups, {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2),
                                       "eps": cfg.eps, "fused": device.type in ("cpu", "cuda")}


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for the update made at `step` (0-based): linear warmup to cfg.lr, then the schedule;
    cosine and WSD reach cfg.lr * cfg.min_lr_ratio at the last step (max_steps - 1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        return min_lr + (cfg.lr - min_lr) * _wsd_factor(step, cfg, max_steps)
    decay_steps = max(1, max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _wsd_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """1 during the stable phase, then down to 0 at the last step over the decay steps."""
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - progress if cfg.decay_shape == "linear" else 1.0 - math.sqrt(progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class AdaptiveClip:
    """The clipping threshold for the next step: multiplier × a percentile of the recent
    pre-clip norms, clamped to [floor, ceiling]; the fixed norm until the window fills enough.
    A spike is clipped against what the run's norms have been, not against a guess made before
    the run. Its window is part of the checkpoint, so resume stays exact."""

    def __init__(self, config: AdaptiveClipConfig | None, fixed_norm: float | None):
        self.config, self.fixed_norm = config, fixed_norm
        self.history: list[float] = []

    def threshold(self) -> float | None:
        cfg = self.config
        if cfg is None or len(self.history) < cfg.min_history:
            return self.fixed_norm
        reference = float(np.percentile(self.history, cfg.percentile))
        return min(cfg.ceiling, max(cfg.floor, cfg.multiplier * reference))

    def record(self, grad_norm: float) -> None:
        if self.config is not None and math.isfinite(grad_norm):
            self.history = (self.history + [grad_norm])[-self.config.window_steps:]

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])


def effective_betas(cfg: OptimConfig, step: int) -> tuple[float, float]:
    """(β1, β2) as the update at `step` (0-based) really applies them after bias correction:
    m̂_t = β_eff · m̂_(t-1) + (1 − β_eff) · g_t with β_eff = β(1 − β^(t−1)) / (1 − β^t), t = step + 1
    (0 at the first step: only the current gradient counts). Adafactor has no first moment and
    its second-moment decay is 1 − t^-0.8 (torch's default beta2_decay)."""
    t = step + 1
    if cfg.optimizer == "adafactor":
        return 0.0, 1.0 - t ** -0.8
    return tuple(b * (1 - b ** (t - 1)) / (1 - b ** t) for b in (cfg.beta1, cfg.beta2))
