"""LoRA adapters with random weights, in PEFT's format, for tests and benchmarks of serving: a
fresh adapter's B is zero (a no-op), and serving a random one costs what a trained one does."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from helox.finetune.lora import BASE_FINGERPRINT_KEY, LoraConfig, apply_lora, save_adapter


def write_random_adapter(base: torch.nn.Module, folder: Path, config: LoraConfig, seed: int,
                         fingerprint: str, scale: float = 0.3) -> Path:
    """An adapter of `base` whose A and B are N(0, scale²), recording `fingerprint` as its
    base's (pass another model's to make one a server must refuse)."""
    model = copy.deepcopy(base)
    apply_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    save_adapter(model, folder, config, metadata={BASE_FINGERPRINT_KEY: fingerprint})
    return folder
