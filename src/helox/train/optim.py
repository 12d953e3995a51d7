"""AdamW with decoupled weight decay on matrices, and the warmup + cosine learning-rate schedule.

The schedule is a pure function of the step, so its whole state is the step the checkpoint holds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from helox.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on 2-D weights except embeddings; norms and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_embedding = name.endswith("embed.weight")
        (decay if param.dim() >= 2 and not is_embedding else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type in ("cpu", "cuda"))


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for the update made at `step` (0-based): linear warmup to cfg.lr, then cosine decay
    to cfg.lr * cfg.min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
