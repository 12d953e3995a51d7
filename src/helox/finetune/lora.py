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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from helox.configbase import StrictModel, resolve_input_path
from helox.errors import HeloxError
from helox.model.hf import helox_to_hf_name, hf_to_helox_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before the transformers model's parameter names."""
DEFAULT_ADAPTER = "default"
"""PEFT's name of an adapter loaded without one; its keys carry no name in the file."""
BASE_FINGERPRINT_KEY = "helox.base_model_fingerprint"
"""In an adapter file's safetensors metadata: the fingerprint of the base it was trained on."""


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


class LoraTrainConfig(LoraConfig):
    """The `lora` section of a recipe: train one adapter on the frozen base that
    train.init_from names, optionally above frozen adapters and from an earlier version."""

    name: str = Field(default=DEFAULT_ADAPTER, pattern=r"^[A-Za-z0-9_-]+$")
    """The trained adapter's name (PEFT's adapter name)."""
    stack: list[Path] = []
    """Adapters (PEFT-format folders) loaded below the trained one, frozen but active: their
    deltas add to the base's, in training and in the result."""
    init_adapter: Path | None = None
    """Start the trained adapter from this adapter (a PEFT-format folder with the same rank
    and target modules), e.g. the previous version in a rolling update; None: fresh."""

    _check_init = field_validator("init_adapter")(resolve_input_path)

    @field_validator("stack")
    @classmethod
    def _check_stack(cls, value: list[Path], info) -> list[Path]:
        return [resolve_input_path(path, info) for path in value]

    def adapter_names(self) -> list[str]:
        """Stacked adapters' names, then the trained one's: the order their deltas add in."""
        return [*(f"stack{i}" for i in range(len(self.stack))), self.name]


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
        self.row_adapters: dict[str, torch.Tensor] | None = None
        """Serving a batch that mixes adapters (`per_row_adapters`): adapter name → the batch
        rows (a 1-D index tensor) it applies to; `active` is then not used."""
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
        if self.row_adapters is not None:
            return self._add_row_deltas(x, y)
        for name in self.active:
            delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
            y = y + delta * self.scaling[name]
        return y

    def _add_row_deltas(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The base output for every row plus, for each adapter, scaling · B A x on its own
        rows only (the rows of one adapter gathered into one matmul: punica's and S-LoRA's
        grouping, written simply with index_select and an accumulating index_put)."""
        for name, rows_R in self.row_adapters.items():
            if name not in self.lora_A:
                continue  # this adapter does not target this layer
            x_R = x.index_select(0, rows_R)
            delta_R = self.lora_B[name](self.lora_A[name](x_R)) * self.scaling[name]
            y = y.index_put((rows_R,), delta_R.to(y.dtype), accumulate=True)
        return y

    def remove_adapter(self, name: str) -> None:
        for part in (self.lora_A, self.lora_B, self.lora_dropout):
            del part[name]
        del self.scaling[name]
        self.active = [active for active in self.active if active != name]

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies: the base's plus every active adapter's delta."""
        weight = self.base_layer.weight
        for name in self.active:
            weight = weight + self.delta_weight(name).to(weight.dtype)
        return weight

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


class AdapterWeights(nn.Module):
    """Adapters `names` of a model as a module of their own, under the model's names
    (`blocks.0.attn.q_proj.lora_A.default.weight`): the same parameter objects, so its
    state_dict is what a LoRA run checkpoints (the adapters alone, a small file) and an
    optimizer over its parameters trains the model's adapters."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        for path, layer in lora_layers(model).items():
            mine = [name for name in names if name in layer.lora_A]
            if not mine:
                continue
            leaf = self
            for component in path.split("."):
                if not hasattr(leaf, component):
                    leaf.add_module(component, nn.Module())
                leaf = getattr(leaf, component)
            leaf.add_module("lora_A", nn.ModuleDict({n: layer.lora_A[n] for n in mine}))
            leaf.add_module("lora_B", nn.ModuleDict({n: layer.lora_B[n] for n in mine}))

    def forward(self, *args, **kwargs):
        raise TypeError("AdapterWeights only holds parameters; run the model instead")


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLinear)}


def set_active(model: nn.Module, names: list[str]) -> None:
    """Which adapters add their deltas (several at once: they add, as PEFT's do)."""
    for layer in lora_layers(model).values():
        layer.active = [name for name in names if name in layer.lora_A]


@contextmanager
def only_active(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Run with only adapters `names` active (none: the base alone), then as before: a LoRA
    run's DPO reference is its base, without a second copy of the model."""
    layers = lora_layers(model)
    saved = {path: list(layer.active) for path, layer in layers.items()}
    set_active(model, names)
    try:
        yield
    finally:
        for path, layer in layers.items():
            layer.active = saved[path]


@contextmanager
def per_row_adapters(model: nn.Module, row_names: Sequence[str | None]) -> Iterator[None]:
    """Run a batch whose row i gets adapter `row_names[i]`'s delta (None: the base alone),
    whatever `active` says; then as before. How a server batches requests for different
    adapters of one base."""
    layers = lora_layers(model)
    known = {name for layer in layers.values() for name in layer.lora_A}
    unknown = sorted({name for name in row_names if name is not None} - known)
    if unknown:
        raise HeloxError(f"no adapter named {', '.join(map(repr, unknown))} is loaded",
                         hint=f"load it first; loaded: {sorted(known) or 'none'}")
    if not layers:
        yield
        return
    device = next(iter(layers.values())).base_layer.weight.device
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(row_names):
        if name is not None:
            groups.setdefault(name, []).append(row)
    rows = {name: torch.tensor(indices, device=device) for name, indices in groups.items()}
    for layer in layers.values():
        layer.row_adapters = rows
    try:
        yield
    finally:
        for layer in layers.values():
            layer.row_adapters = None


def remove_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name` from every layer; a layer left without adapters is unwrapped (the
    plain `nn.Linear` again), so removing every adapter gives back the base model."""
    found = False
    for path, layer in lora_layers(model).items():
        if name in layer.lora_A:
            layer.remove_adapter(name)
            found = True
        if not layer.lora_A:
            _replace(model, path, layer.base_layer)
    if not found:
        raise HeloxError(f"the model has no adapter named {name!r}",
                         hint="name one of the adapters that were loaded")


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
    safetensors header (the base model's fingerprint under BASE_FINGERPRINT_KEY, say)."""
    return save_adapter_tensors(AdapterWeights(model, [name]).state_dict(), folder, config,
                                base_model, metadata)


def save_adapter_tensors(adapter_state: dict[str, torch.Tensor], folder: Path,
                         config: LoraConfig, base_model: str | None = None,
                         metadata: dict[str, str] | None = None) -> Path:
    """An `AdapterWeights` state dict of one adapter (what a LoRA run's checkpoint holds) in
    PEFT's format."""
    tensors = {}
    for name, tensor in adapter_state.items():
        path, matrix, _adapter, _ = name.rsplit(".", 3)
        key = PEFT_PREFIX + helox_to_hf_name(f"{path}.weight").removesuffix(".weight")
        tensors[f"{key}.{matrix}.weight"] = tensor.detach().cpu().contiguous()
    if not tensors:
        raise HeloxError("there are no adapter weights to save",
                         hint="apply an adapter with apply_lora first")
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


def adapter_base_fingerprint(folder: Path) -> str | None:
    """The base model fingerprint an adapter file records (Helox writes it), or None."""
    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), "pt") as f:
        return (f.metadata() or {}).get(BASE_FINGERPRINT_KEY)


def check_base(folder: Path, base_fingerprint: str | None) -> None:
    """Refuse an adapter trained on another base than this one, naming both fingerprints;
    an adapter that records none (PEFT's own) is taken on trust."""
    recorded = adapter_base_fingerprint(folder)
    if recorded is not None and base_fingerprint is not None and recorded != base_fingerprint:
        raise HeloxError(f"adapter {folder} was trained on the base model with fingerprint "
                         f"{recorded}, not on this one ({base_fingerprint})",
                         hint="load it on the base it was trained on, or train the adapter "
                              "again on this base")


def load_adapter(model: nn.Module, folder: Path, name: str = DEFAULT_ADAPTER,
                 base_fingerprint: str | None = None) -> LoraConfig:
    """A PEFT-format adapter folder into `model` as adapter `name` (added, then filled);
    with `base_fingerprint`, one trained on another base is refused (`check_base`)."""
    check_base(folder, base_fingerprint)
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


def attach_adapters(model: nn.Module, config: LoraTrainConfig,
                    base_fingerprint: str | None) -> AdapterWeights:
    """A LoRA run's adapters on its base `model`: the stacked ones (frozen), then the trained
    one (fresh, or from `config.init_adapter`), all active; returns the trained adapter's
    weights as a module (what the run optimizes and checkpoints)."""
    for folder, name in zip(config.stack, config.adapter_names()):
        load_adapter(model, folder, name, base_fingerprint)
    if config.init_adapter is not None:
        previous = read_adapter_config(config.init_adapter)
        if (previous.rank, sorted(previous.target_modules)) != (
                config.rank, sorted(config.target_modules)):
            raise HeloxError(f"lora.init_adapter {config.init_adapter} has rank "
                             f"{previous.rank} on {sorted(previous.target_modules)}; this run "
                             f"trains rank {config.rank} on {sorted(config.target_modules)}",
                             hint="give lora.rank and lora.target_modules the adapter's values")
        load_adapter(model, config.init_adapter, config.name, base_fingerprint)
    else:
        apply_lora(model, config, config.name)
    set_active(model, config.adapter_names())
    set_trainable(model, [config.name])
    for layer in lora_layers(model).values():  # the run's dropout and scaling, not the file's
        if config.name in layer.lora_A:
            layer.scaling[config.name] = config.scaling
            layer.lora_dropout[config.name] = nn.Dropout(config.dropout) if config.dropout \
                else nn.Identity()
    return AdapterWeights(model, [config.name])
