"""AdamW or Adafactor with decoupled weight decay on matrices, and the learning-rate schedules:
warmup, then cosine decay, WSD (warmup-stable-decay) or constant.

A schedule is a pure function of the step, so its whole state is the step the checkpoint holds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from helox.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on 2-D weights except embeddings; norms and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_embedding = name.endswith("embed.weight")
        (decay if param.dim() >= 2 and not is_embedding else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr, foreach=True)
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cpu", "cuda"))


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
