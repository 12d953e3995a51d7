"""A trained model as every reader of checkpoints wants it (generate, eval, explain, export):
the model with its weights or their EMA, the tokenizer, its end-of-document id, and what the
checkpoint says about its run. Only the config sections a model needs are validated here
(`model`, `tokenizer.eos_token`); readers that want the whole run config parse config.yaml
with `helox.config.read_saved_config`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import json

import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

from helox.checkpoint.fingerprint import model_fingerprint
from helox.checkpoint.format import read_format
from helox.checkpoint.layout import (CHECKSUMS_FILE, CONFIG_FILE, EMA_WEIGHTS, MODEL_WEIGHTS,
                                     TOKENIZER_FILE, read_config_raw, read_run_info, run_dir_of,
                                     step_of)
from helox.checkpoint.reader import load_weights, resolve_checkpoint, weights_file
from helox.checkpoint.sharded import DCP_FOLDER
from helox.data.tokenizer import eos_id, load_tokenizer
from helox.errors import HeloxError
from helox.fileio import sha256_file, sha256_json
from helox.finetune.lora import LoraTrainConfig, attach_adapters, merge_lora
from helox.model.config import ModelConfig
from helox.model.generate import complete
from helox.model.llama import Llama


@dataclass
class Adapter:
    """What a LoRA run trained: its adapter, on which base."""

    config: LoraTrainConfig
    base_checkpoint: Path
    base_fingerprint: str
    state: dict[str, torch.Tensor]
    """The adapter's weights under the model's names (`AdapterWeights`)."""


@dataclass
class TrainedModel:
    model: Llama
    """In eval mode, on the CPU, in the dtype it was saved in (fp32)."""
    tokenizer: Tokenizer
    eos_id: int
    eos_token: str
    checkpoint: Path
    config: dict
    """The run's resolved config as saved (config.yaml), not validated beyond `model`."""
    run_info: dict
    """run.json: run fingerprint, dataset version, config hash, resume key, ..."""
    ema: bool
    """Whether `model` holds the moving average of the weights."""
    adapter: Adapter | None = None
    """A LoRA run's adapter; `model` is then its base with every adapter merged in."""

    @property
    def model_config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def step(self) -> int:
        return step_of(self.checkpoint)

    @property
    def run_dir(self) -> Path | None:
        return run_dir_of(self.checkpoint)

    def weights_digest(self, chars: int = 12) -> str:
        """First hex digits of the sha256 of the weights as stored: the weights file, or the
        checksums of a multi-process checkpoint's dcp/ files. Two versions with one name
        stay apart."""
        file = self.checkpoint / (EMA_WEIGHTS if self.ema else MODEL_WEIGHTS)
        if file.is_file() and self.adapter is not None:  # the adapter, and what it adapts
            return sha256_json([sha256_file(file), self.adapter.base_fingerprint])[:chars]
        if file.is_file():
            return sha256_file(file)[:chars]
        checksums = json.loads((self.checkpoint / CHECKSUMS_FILE).read_text())
        return sha256_json({name: digest for name, digest in checksums.items()
                            if name.startswith(f"{DCP_FOLDER}/")})[:chars]

    def complete(self, prompt: str, max_new_tokens: int = 48, temperature: float = 0.8,
                 top_k: int | None = 40, seed: int = 0) -> str:
        """The text that continues `prompt` (read as the start of a document); temperature
        0 is greedy."""
        return complete(self.model, self.tokenizer, prompt, self.eos_id, max_new_tokens,
                        temperature, top_k, seed)


def load_trained_model(path: Path, ema: bool = False) -> TrainedModel:
    """Rebuild the model of a checkpoint folder with its weights (or their EMA), tokenizer
    and run metadata, on the CPU."""
    path = Path(path)
    read_format(path)  # refuses a format this Helox cannot read, naming it
    raw = read_config_raw(path)
    run_info = read_run_info(path)
    model_config = model_config_of(raw, path)
    adapter = None
    if raw.get("lora"):
        model, adapter = _adapted_model(path, raw, run_info, ema)
    else:
        model = Llama(model_config)
        load_weights(path, model, ema)
    model.eval()
    tokenizer = load_tokenizer(weights_file(path, TOKENIZER_FILE))
    eos_token = (raw.get("tokenizer") or {}).get("eos_token")
    if not isinstance(eos_token, str):
        raise HeloxError(f"{path / CONFIG_FILE} names no tokenizer.eos_token",
                         hint="the checkpoint's config is damaged: use another checkpoint")
    return TrainedModel(model=model, tokenizer=tokenizer,
                        eos_id=eos_id(tokenizer, eos_token, path / TOKENIZER_FILE),
                        eos_token=eos_token, checkpoint=path, config=raw,
                        run_info=run_info, ema=ema, adapter=adapter)


def _adapted_model(path: Path, raw: dict, run_info: dict, ema: bool) -> tuple[Llama, Adapter]:
    """A LoRA run's model: its base (read again from where the run found it, and checked to
    be the same weights), the stacked adapters and the trained one, merged."""
    if ema:
        raise HeloxError(f"{path} is a LoRA run's checkpoint, which keeps no EMA",
                         hint="read it without --ema")
    lora = LoraTrainConfig.model_validate({**raw["lora"], "init_adapter": None},
                                          context={"check_files": False})
    info = run_info.get("lora") or {}
    base_path = Path(info.get("base_checkpoint") or raw["train"]["init_from"])
    if not base_path.exists():
        raise HeloxError(f"{path} holds a LoRA adapter whose base model {base_path} is gone",
                         hint="restore the base model's checkpoint at that path")
    base = load_trained_model(resolve_checkpoint(base_path, warn=lambda message: None)).model
    fingerprint = model_fingerprint(base)
    if info.get("base_fingerprint") not in (None, fingerprint):
        raise HeloxError(f"{path} holds an adapter trained on the base model with fingerprint "
                         f"{info['base_fingerprint']}, but {base_path} now holds one with "
                         f"fingerprint {fingerprint}",
                         hint="restore the original base model at that path")
    weights = attach_adapters(base, lora, fingerprint)
    load_weights(path, weights)
    state = {name: tensor.detach().clone() for name, tensor in weights.state_dict().items()}
    merge_lora(base)
    return base, Adapter(lora, base_path, fingerprint, state)


def model_config_of(raw: dict, path: Path) -> ModelConfig:
    """The `model` section of a saved config, validated."""
    try:
        return ModelConfig.model_validate(raw.get("model"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise HeloxError(f"{path / CONFIG_FILE}: its model section is invalid ({problems})",
                         hint="the checkpoint's config is damaged: use another checkpoint"
                         ) from None
