"""Per-layer precision policy: the modules named by glob patterns compute in fp32 under
bf16/fp16 autocast.

Autocast picks a dtype op by op (matmuls in 16 bits, a few reductions in fp32). Some layers are
better off wholly in fp32: normalisations, whose statistics lose digits in 16 bits, and often
the output head, whose logits feed a softmax over the whole vocabulary. A matched module's
class is swapped for a subclass whose forward casts floating inputs to fp32 and turns autocast
off. The parameters and state_dict names do not change (checkpoints, HF export), copies keep
the policy (the EMA is a deepcopy), and torch.compile traces the subclass like any forward.
The weights must be fp32 (autocast's master weights), as they are in training.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from helox.allocator import reuses_memory
from helox.errors import HeloxError
from helox.finetune.lora import apply_lora, read_adapter_config, set_trainable
from helox.model.llama import Llama
from helox.training.step import AUTOCAST_DTYPES, pick_attention

if TYPE_CHECKING:  # the composition of configs sits above the trainer: annotations only
    from helox.config import RunConfig

_FP32_CLASSES: dict[tuple[type, str], type] = {}
"""(module class, device type) -> its fp32 subclass, made once so compiled graphs that guard
on the class are shared by every matched module."""


def apply_precision_policy(model: nn.Module, patterns: list[str], device_type: str) -> list[str]:
    """Make the modules matching `patterns` compute in fp32 under `device_type` autocast;
    return their names. Only the outermost match is wrapped: a matched parent already runs
    its children in fp32. Applying the same policy twice changes nothing."""
    names = match_fp32_modules(model, patterns)
    for name in names:
        module = model.get_submodule(name)
        if not getattr(module, "computes_in_fp32", False):
            module.__class__ = _fp32_class(type(module), device_type)
    return names


def match_fp32_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names (from model.named_modules()) of the outermost modules matching a pattern, in
    module order. A pattern that matches no module is an error listing the names there are."""
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in patterns if not any(fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise HeloxError(f"train.fp32_modules pattern(s) {unmatched} match no module; the "
                         f"model's modules are: {shorten_names(names)}",
                         hint="use fnmatch globs over these names, e.g. '*norm', 'lm_head' or "
                              "'blocks.*.mlp'; `helox train RECIPE --dry-run` shows what "
                              "each module computes in")
    matched = [name for name in names if any(fnmatchcase(name, p) for p in patterns)]
    return [name for name in matched if _covering(name, matched) is None]


def shorten_names(names: list[str], limit: int = 30) -> str:
    """Module names with block indices folded into `*` (blocks.0.mlp, blocks.1.mlp ->
    blocks.*.mlp), each once, at most `limit` of them."""
    folded = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name) for name in names))
    more = f", … ({len(folded) - limit} more)" if len(folded) > limit else ""
    return ", ".join(folded[:limit]) + more


def _covering(name: str, matched: list[str]) -> str | None:
    """The matched module strictly enclosing `name`, if any."""
    return next((m for m in matched if name.startswith(m + ".")), None)


def _fp32_class(cls: type[nn.Module], device_type: str) -> type[nn.Module]:
    key = (cls, device_type)
    if key not in _FP32_CLASSES:
        base_forward = cls.forward

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type, enabled=False):
                return base_forward(self, *(_to_fp32(a) for a in args),
                                    **{k: _to_fp32(v) for k, v in kwargs.items()})

        _FP32_CLASSES[key] = type(f"FP32{cls.__name__}", (cls,), {
            "forward": forward, "computes_in_fp32": True, "base_class": cls,
            "__module__": cls.__module__})
    return _FP32_CLASSES[key]


def _to_fp32(value: Any) -> Any:
    """Floating tensors in fp32 (bf16/fp16 activations coming out of autocast regions)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


class PrecisionRow(NamedTuple):
    name: str
    kind: str
    """The module's class ("(tied)" when its weights are counted in an earlier row)."""
    params: int
    """Parameters not counted in an earlier row, so the rows add up to the model's."""
    compute: str
    """What its matmuls compute in under the run's precision ("fp32" for modules with none,
    such as embeddings and norms), and why when the policy decides."""
    trainable: int = 0
    """Of `params`, those the run trains (all but a LoRA run's frozen base)."""


def describe_precision(model: nn.Module, precision: str, patterns: list[str],
                       ) -> list[PrecisionRow]:
    """One row per layer (a module whose children are all leaves, or a leaf outside one: for
    Llama embed, blocks.i.{attn_norm, attn, mlp_norm, mlp}, norm, lm_head) for a dry run."""
    fp32_names = match_fp32_modules(model, patterns)
    counted: set[int] = set()
    rows = []
    for name, module in _layers(model):
        params = [p for p in module.parameters() if id(p) not in counted]
        tied = len(params) < len(list(module.parameters()))
        counted.update(id(p) for p in params)
        kind = getattr(module, "base_class", type(module)).__name__ + (" (tied)" if tied else "")
        rows.append(PrecisionRow(name, kind, sum(p.numel() for p in params),
                                 _compute(name, module, precision, fp32_names),
                                 sum(p.numel() for p in params if p.requires_grad)))
    return rows


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    def is_layer(module: nn.Module) -> bool:
        return all(not any(child.children()) for child in module.children())

    layers = [(n, m) for n, m in model.named_modules() if n and is_layer(m)]
    layer_names = {n for n, m in layers if any(m.children())}
    return [(n, m) for n, m in layers if n.rpartition(".")[0] not in layer_names]


def _compute(name: str, module: nn.Module, precision: str, fp32_names: list[str]) -> str:
    if precision not in AUTOCAST_DTYPES:
        return "fp32"
    if name in fp32_names:
        return "fp32 (policy)"
    parent = _covering(name, fp32_names)
    if parent is not None:
        return f"fp32 (policy, in {parent})"
    if not _has_matmuls(module):
        return "fp32"  # an embedding lookup or a norm: autocast lowers none of their ops
    inner = [n.removeprefix(name + ".") for n in fp32_names if n.startswith(name + ".")]
    return precision + (f"; fp32: {', '.join(inner)}" if inner else "")


def _has_matmuls(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
               for m in module.modules())


def dry_run_plan(config: RunConfig, device: torch.device, precision: str) -> dict:
    """The dry run: the model of `config` (built on the meta device, so any size is instant)
    with the run's precision policy and activation checkpointing, one row per layer, and what
    the weights, gradients and optimizer state will take in memory; the attention kernel and
    memory reuse the run would use."""
    with torch.device("meta"):
        model = Llama(config.model)
        if config.lora is not None:  # the adapters as the run attaches them
            for folder, name in zip(config.lora.stack, config.lora.adapter_names()):
                apply_lora(model, read_adapter_config(folder), name)
            apply_lora(model, config.lora, config.lora.name)
            set_trainable(model, [config.lora.name])
    model.set_activation_checkpointing(config.train.activation_checkpointing)
    apply_precision_policy(model, config.train.fp32_modules, device.type)
    layers = []
    for row in describe_precision(model, precision, config.train.fp32_modules):
        block = re.match(r"blocks\.(\d+)(\.|$)", row.name)
        layers.append({"module": row.name, "type": row.kind, "params": row.params,
                       "trainable": row.trainable, "compute": row.compute,
                       "checkpointed": block is not None
                       and int(block[1]) in model.checkpointed_blocks})
    num_params = model.num_params()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    attention = pick_attention(config.train.attention, device, precision, config.train.seq_len)
    return {"name": config.name, "precision": precision, "attention": attention,
            "device": str(device),
            "reuse_memory": reuses_memory(config.train.reuse_memory, device),
            "layers": layers, "num_params": num_params, "trainable_params": trainable,
            "frozen_params": num_params - trainable,
            "weights_bytes": 4 * num_params,  # fp32 master weights under autocast
            "gradients_bytes": 4 * trainable,  # and fp32 gradients of what trains
            "optimizer": config.optim.optimizer,
            "optimizer_state_bytes": optimizer_state_bytes(model, config.optim.optimizer),
            "checkpointed_blocks": len(model.checkpointed_blocks),
            "blocks": len(model.blocks)}


def print_plan(console: Console, plan: dict) -> None:
    """`dry_run_plan` as a table and a memory line."""
    reused = ", freed memory reused" if plan["reuse_memory"] else ""
    table = Table(title=f"{plan['name']}: {plan['precision']}, {plan['attention']} attention, "
                        f"on {plan['device']}{reused}")
    table.add_column("module", no_wrap=True)
    table.add_column("type")
    frozen = plan["frozen_params"] > 0  # a LoRA run: say what trains
    table.add_column("params", justify="right")
    if frozen:
        table.add_column("trainable", justify="right")
    table.add_column("compute")
    table.add_column("checkpointed")
    for layer in plan["layers"]:
        trainable = [f"{layer['trainable']:,}"] if frozen else []
        table.add_row(layer["module"], layer["type"], f"{layer['params']:,}", *trainable,
                      layer["compute"], "yes" if layer["checkpointed"] else "")
    console.print(table)
    weights, state = plan["weights_bytes"], plan["optimizer_state_bytes"]
    split = f" ({plan['trainable_params']:,} trainable, {plan['frozen_params']:,} frozen)" \
        if frozen else ""
    console.print(f"{plan['num_params']:,} parameters{split}; weights {_gib(weights)} + gradients "
                  f"{_gib(plan['gradients_bytes'])} + {plan['optimizer']} state {_gib(state)} "
                  f"= {_gib(weights + plan['gradients_bytes'] + state)} before activations; "
                  f"{plan['checkpointed_blocks']} of {plan['blocks']} blocks checkpointed",
                  soft_wrap=True)


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """fp32 optimizer state: AdamW keeps two moments per parameter; Adafactor a row and a
    column second moment per matrix and a full one per vector (torch.optim.Adafactor)."""
    trained = [p for p in model.parameters() if p.requires_grad]  # frozen ones keep none
    if optimizer == "adamw":
        return 8 * sum(p.numel() for p in trained)
    return 4 * sum(p.numel() // p.shape[-1] + p.numel() // p.shape[-2] if p.dim() >= 2
                   else p.numel() for p in trained)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**28 else f"{num_bytes / 2**20:.1f} MiB"
