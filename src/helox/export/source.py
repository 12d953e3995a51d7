"""What every exporter starts from: a trained checkpoint, rebuilt in fp32 on the CPU, with its
tokenizer and the training metadata that goes into every artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from helox.checkpoint import (CONFIG_FILE, TOKENIZER_FILE, load_trained_model,
                              resolve_checkpoint, step_of)
from helox.checkpoint.trained import Adapter
from helox.config import RunConfig, read_saved_config
from helox.model.llama import Llama


@dataclass
class ExportSource:
    model: Llama
    """fp32, eval mode, on the CPU."""
    tokenizer: Tokenizer
    tokenizer_json: Path
    config: RunConfig
    checkpoint: Path
    run_info: dict
    """The checkpoint's run.json: run fingerprint, dataset version, config hash, ..."""
    eos_id: int
    ema: bool
    adapter: Adapter | None = None
    """A LoRA run's adapter; `model` then has it (and any stacked one) merged in."""

    @property
    def eos_token(self) -> str:
        return self.config.tokenizer.eos_token

    @property
    def step(self) -> int:
        return step_of(self.checkpoint)

    @property
    def name(self) -> str:
        """The run's folder name (for file names and the model's display name)."""
        return self.checkpoint.parent.parent.name or "helox-model"


def load_export_source(path: Path, ema: bool = False,
                       warn=lambda message: None) -> ExportSource:
    """A run folder (its newest valid checkpoint) or one checkpoint folder."""
    checkpoint = resolve_checkpoint(path, warn)
    trained = load_trained_model(checkpoint, ema=ema)
    return ExportSource(model=trained.model.float().eval(), tokenizer=trained.tokenizer,
                        tokenizer_json=checkpoint / TOKENIZER_FILE,
                        config=read_saved_config(checkpoint / CONFIG_FILE),
                        checkpoint=checkpoint, run_info=trained.run_info,
                        eos_id=trained.eos_id, ema=ema, adapter=trained.adapter)
