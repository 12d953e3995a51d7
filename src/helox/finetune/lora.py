"""LoRA adapters, applied to a model from outside (the model code never knows), saved and loaded
in PEFT's format, stacked, and merged.

`apply_lora(model, config, name)` replaces each targeted `nn.Linear` with a `LoraLinear` that
holds the frozen base layer and, per adapter name, A (rank × in) and B (out × rank):
    y = base(x) + Σ over active adapters  scaling · B(A(dropout(x))),  scaling = alpha / rank
B starts at zero, so a fresh adapter leaves the model's function unchanged; A starts as PEFT
initialises it (Kaiming-uniform with a = √5). Every base parameter is frozen.

Why not peft itself: peft wraps transformers models, and Helox trains its own `Llama`. The file
format is PEFT's (`adapter_config.json`, `adapter_model.safetensors` with PEFT's key names on
the transformers model), so that `PeftModel.from_pretrained(<transformers base>, <folder>)`
loads what Helox saves and Helox loads what PEFT saves (tests/finetune/test_lora.py compares
logits both ways).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from helox.configbase import StrictModel
from helox.errors import HeloxError
from helox.model.hf import helox_to_hf_name, hf_to_helox_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before the transformers model's parameter names."""
DEFAULT_ADAPTER = "default"
"""PEFT's name of an adapter loaded without one; its keys carry no name in the file."""


class LoraConfig(StrictModel):
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    """The update is scaled by alpha / rank."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input (training only)."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Names of the linear layers to adapt (their last path component): any of q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` (`base_layer`, PEFT's name) plus named low-rank adapters."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []
        """The adapters whose deltas are added, in order."""
        base_layer.requires_grad_(False)

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        base = self.base_layer
        self.lora_A[name] = nn.Linear(base.in_features, config.rank, bias=False,
                                      device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B[name] = nn.Linear(config.rank, base.out_features, bias=False,
                                      device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout else \
            nn.Identity()
        self.scaling[name] = config.scaling
        self.active.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        for name in self.active:
            delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
            y = y + delta * self.scaling[name]
        return y

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B A: what merging adapter `name` adds to the base weight."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]


# ---------------------------------------------------------------------------------------------
# Applying, choosing, merging


def apply_lora(model: nn.Module, config: LoraConfig, name: str = DEFAULT_ADAPTER,
               ) -> list[str]:
    """Add adapter `name` to every targeted linear layer of `model` (wrapping it the first
    time), freeze everything that is not an adapter, and return the adapted layers' paths."""
    adapted = []
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in config.target_modules:
            continue
        if isinstance(module, nn.Linear):
            module = _wrap(model, path, module)
        if not isinstance(module, LoraLinear):
            continue
        if name in module.lora_A:
            raise HeloxError(f"{path} already has an adapter named {name!r}",
                             hint="give the new adapter another name")
        module.add_adapter(name, config)
        adapted.append(path)
    if not adapted:
        raise HeloxError(f"lora.target_modules {config.target_modules} match no linear layer",
                         hint="use names such as q_proj, v_proj, gate_proj, down_proj")
    _freeze_base(model)
    return adapted


def _wrap(model: nn.Module, path: str, linear: nn.Linear) -> LoraLinear:
    wrapped = LoraLinear(linear)
    _replace(model, path, wrapped)
    return wrapped


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` in `model` (where the wrapped or unwrapped layer goes)."""
    parent_path, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, module)


def _freeze_base(model: nn.Module) -> None:
    for param_name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in param_name or ".lora_B." in param_name)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLinear)}


def set_active(model: nn.Module, names: list[str]) -> None:
    """Which adapters add their deltas (several at once: they add, as PEFT's do)."""
    for layer in lora_layers(model).values():
        layer.active = [name for name in names if name in layer.lora_A]


def set_trainable(model: nn.Module, names: list[str]) -> None:
    """Train only adapters `names`; the others (and the base) stay frozen."""
    for layer in lora_layers(model).values():
        for name in layer.lora_A:
            for part in (layer.lora_A[name], layer.lora_B[name]):
                part.requires_grad_(name in names)


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapters into their base weights and unwrap every LoraLinear: the
    model is a plain one again, with the same function."""
    for path, layer in lora_layers(model).items():
        base = layer.base_layer
        with torch.no_grad():
            for name in layer.active:
                base.weight += layer.delta_weight(name).to(base.weight.dtype)
        _replace(model, path, base)


# ---------------------------------------------------------------------------------------------
# PEFT's format


def save_adapter(model: nn.Module, folder: Path, config: LoraConfig,
                 name: str = DEFAULT_ADAPTER, base_model: str | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Adapter `name` as PEFT saves one: adapter_config.json and adapter_model.safetensors
    (keys `base_model.model.<transformers name>.lora_A.weight`); `metadata` goes into the
    safetensors header (the base model's fingerprint, say)."""
    tensors = {}
    for path, layer in lora_layers(model).items():
        if name not in layer.lora_A:
            continue
        key = PEFT_PREFIX + helox_to_hf_name(f"{path}.weight").removesuffix(".weight")
        tensors[f"{key}.lora_A.weight"] = layer.lora_A[name].weight.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B[name].weight.detach().cpu().contiguous()
    if not tensors:
        raise HeloxError(f"the model has no adapter named {name!r}",
                         hint="apply one with apply_lora first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt",
                                                                **(metadata or {})})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_config(config, base_model), indent=2))
    return folder


def peft_config(config: LoraConfig, base_model: str | None) -> dict:
    """adapter_config.json as PEFT writes it for a plain LoRA."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": sorted(config.target_modules), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}


def read_adapter_config(folder: Path) -> LoraConfig:
    """An adapter folder's config (PEFT's adapter_config.json), refusing what Helox's LoRA
    does not implement rather than loading it wrongly."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise HeloxError(f"{folder} has no {ADAPTER_CONFIG}",
                         hint="pass a folder written by PEFT's save_pretrained or by Helox")
    raw = json.loads(path.read_text())
    unsupported = {key: raw.get(key) for key in ("use_rslora", "use_dora", "fan_in_fan_out")
                   if raw.get(key)}
    if raw.get("peft_type") != "LORA" or raw.get("bias", "none") != "none" or unsupported \
            or raw.get("modules_to_save") or raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise HeloxError(f"{path}: Helox loads plain LoRA adapters (no bias, DoRA, rsLoRA, "
                         f"per-layer ranks or extra trained modules)",
                         hint="train the adapter as plain LoRA")
    targets = raw["target_modules"]
    return LoraConfig(rank=raw["r"], alpha=raw["lora_alpha"],
                      dropout=raw.get("lora_dropout", 0.0),
                      target_modules=sorted(targets) if isinstance(targets, list) else [targets])


def load_adapter(model: nn.Module, folder: Path, name: str = DEFAULT_ADAPTER) -> LoraConfig:
    """A PEFT-format adapter folder into `model` as adapter `name` (added, then filled)."""
    config = read_adapter_config(folder)
    apply_lora(model, config, name)
    saved = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    layers = lora_layers(model)
    loaded = set()
    for key, tensor in saved.items():
        hf_name, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        path = hf_to_helox_name(f"{hf_name}.weight").removesuffix(".weight")
        matrix, _, _ = part.partition(".")
        if path not in layers or matrix not in ("A", "B"):
            raise HeloxError(f"{folder}: {key} adapts no layer of this model",
                             hint="load the adapter on the base model it was trained on")
        target = (layers[path].lora_A if matrix == "A" else layers[path].lora_B)[name].weight
        if target.shape != tensor.shape:
            raise HeloxError(f"{folder}: {key} has shape {list(tensor.shape)}, the model's "
                             f"layer wants {list(target.shape)}",
                             hint="load the adapter on the base model it was trained on")
        with torch.no_grad():
            target.copy_(tensor)
        loaded.add((path, matrix))
    missing = [p for p in layers if name in layers[p].lora_A
               and {(p, "A"), (p, "B")} - loaded]
    if missing:
        raise HeloxError(f"{folder} holds no weights for {', '.join(missing[:3])}",
                         hint="the adapter file is incomplete: save it again")
    return config
