"""Building a run: the device, the model's final shape, the EMA, the loader's options, and
the resume key that decides whether a run folder's checkpoints belong to this run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from helox.checkpoint import (CONFIG_FILE, RUN_INFO_FILE, load_trained_model, read_config_raw,
                              resolve_checkpoint, verify_checkpoint)
from helox.checkpoint.fingerprint import model_fingerprint
from helox.checkpoint.layout import write_config
from helox.data.loader import LoaderOptions, StepBatch
from helox.distributed.config import ParallelConfig
from helox.distributed.job import Job
from helox.distributed.parallelize import build_mesh, parallelize, zero1_optimizer
from helox.data.shards import DatasetVersion
from helox.errors import HeloxError
from helox.fileio import sha256_json
from helox.finetune.lora import AdapterWeights, attach_adapters
from helox.model.llama import Llama
from helox.observe.sinks import flatten
from helox.training.optim import OptimConfig, build_optimizer, optimizer_spec

if TYPE_CHECKING:  # the composition of configs sits above the trainer: annotations only
    from helox.config import RunConfig

# Config fields that may change when resuming: they do not change the trajectory (compile
# changes only rounding, and turning it off must stay possible when a compiler breaks; the data
# order does not depend on the number of data workers; activation checkpointing recomputes the
# same values, tested bitwise equal, and may be switched on after running out of memory). The
# `stability`, `checkpoint` and `faults` sections are not part of the trajectory either: they
# are the operator's knobs.
RESUMABLE_CHANGES = {"train": {"eval_every_steps", "eval_batches", "compile", "data_workers",
                               "activation_checkpointing", "reuse_memory"}}
TRAJECTORY_SECTIONS = ("model", "train", "optim", "mixture", "curriculum")
# A trajectory field added after runs were saved without it resumes those runs when it holds
# the value that reproduces them: its default, as a new field's default keeps the old
# behaviour, except where listed here (the default changed what such a run computed: before
# train.attention existed every run attended through SDPA; `auto` now picks math attention
# for 16-bit CPU training).
LEGACY_VALUES = {"train.attention": "sdpa"}


def model_flops_per_token(model: Llama, seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul parameter (forward and backward) plus attention
    scores and values, 12 × layers × d_model × context (PaLM's appendix B). A frozen matmul
    (a LoRA run's base) costs 4: its backward computes the input's gradient, not its own."""
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    matmul_flops = sum((6 if w.requires_grad else 4) * w.numel() for w in linears)
    return matmul_flops + 12 * model.cfg.num_layers * model.cfg.d_model * seq_len


def lora_model(config: RunConfig, warn) -> tuple[Llama, AdapterWeights, dict]:
    """A LoRA run's model: the base that train.init_from names (frozen, exactly this run's
    model shape), the stacked adapters and the trained one; with the trained adapter's
    weights as a module, and what run.json records about the base (its fingerprint)."""
    path = resolve_checkpoint(config.train.init_from, warn=warn)
    problem = verify_checkpoint(path)
    if problem:
        raise HeloxError(f"train.init_from: {path} is not a valid checkpoint: {problem}",
                         hint="point it at the base model's run folder or checkpoint")
    base = load_trained_model(path).model
    if base.cfg != config.model:
        ours, theirs = config.model.model_dump(), base.cfg.model_dump()
        diffs = ", ".join(f"{k} {theirs[k]} (recipe: {ours[k]})" for k in ours
                          if ours[k] != theirs[k])
        raise HeloxError(f"the base model {path} has another shape than the recipe's model "
                         f"section: {diffs}",
                         hint="copy the base's model section into the recipe (helox import-hf "
                              "writes a finetune.yaml that has it)")
    fingerprint = model_fingerprint(base)
    adapters = attach_adapters(base.train(), config.lora, fingerprint)
    return base, adapters, {"base_checkpoint": str(path), "base_fingerprint": fingerprint,
                            "adapter": config.lora.name}


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """torch.optim.swa_utils.AveragedModel keeping an EMA whose decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's and timm's rule), so the
    average does not drag the random initial weights along for ~1 / (1 - decay) steps.
    n is read from the model's own counter, which stays on the CPU: no device sync."""
    ema = AveragedModel(model)

    def update(ema_params: list[torch.Tensor], model_params: list[torch.Tensor],
               _num_averaged_on_device: torch.Tensor) -> None:
        n = int(ema.n_averaged)
        step_decay = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, model_params, 1.0 - step_decay)

    ema.multi_avg_fn = update
    return ema


def parallel_training(model: nn.Module, optim: OptimConfig, cfg: ParallelConfig | None,
                      device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and its optimizer as they train on the job's mesh: parallelized from outside
    (helox.distributed), the optimizer built on the parallel model, sharded with ZeRO-1 when
    asked. `cfg` None: one process, the model itself."""
    if cfg is None:
        return model, build_optimizer(model, optim)
    mesh = build_mesh(cfg, device)
    parallel = parallelize(model, mesh, cfg)
    if cfg.zero1:
        return parallel, zero1_optimizer(*optimizer_spec(parallel, optim), mesh)
    return parallel, build_optimizer(parallel, optim)


def check_parallel(config: RunConfig, job: Job) -> None:
    """The parallel section against the job's world size, before anything is built: a mesh
    that does not multiply to it, a global batch that does not divide across the ranks, or a
    feature sharded parameters do not support yet, each an error naming the numbers."""
    if not job.distributed:
        return
    cfg, tc = config.parallel, config.train
    global_batch = tc.micro_batch_size * tc.grad_accum_steps
    try:
        _, shard = cfg.degrees(job.world_size)
        cfg.per_rank_batch(global_batch, job.world_size)
    except ValueError as exc:
        raise HeloxError(str(exc), hint=f"the global batch is train.micro_batch_size × "
                         f"train.grad_accum_steps ({global_batch}); change parallel.* or "
                         f"train.*, or launch another number of processes") from None
    if shard > 1 and config.lora is not None:
        raise HeloxError(f"a LoRA run with parameters sharded over {shard} ranks (FSDP2) is "
                         "not supported yet: its frozen base and adapters share FSDP units",
                         hint=f"train it with DDP (parallel.dp_replicate={job.world_size})")
    if shard > 1 and tc.ema_decay:
        raise HeloxError(f"train.ema_decay with parameters sharded over {shard} ranks "
                         "(FSDP2): the moving average is kept only for replicated parameters",
                         hint=f"train with DDP (parallel.dp_replicate={job.world_size}) or "
                              "without train.ema_decay")


def check_dataset_kind(config: RunConfig, dataset: DatasetVersion) -> None:
    """Preference pairs train with DPO, and DPO trains on nothing else."""
    kind = None if dataset.chat is None else dataset.chat.get("kind", "chat")
    if config.dpo is not None and kind != "preference":
        raise HeloxError(f"dpo is set but dataset {dataset.version} holds "
                         f"{'text' if kind is None else 'conversations'}, not preference pairs",
                         hint="build the dataset from `format: preference` sources")
    if config.dpo is None and kind == "preference":
        raise HeloxError(f"dataset {dataset.version} holds preference pairs, which train "
                         "with DPO", hint="add a dpo section to the recipe")


def loader_options(config: RunConfig) -> LoaderOptions:
    tc = config.train
    return LoaderOptions(block_len=tc.seq_len, micro_batch_size=tc.micro_batch_size,
                         grad_accum_steps=tc.grad_accum_steps, seed=tc.seed,
                         max_steps=tc.max_steps, num_workers=tc.data_workers,
                         document_masking=tc.document_masking, mixture=config.mixture,
                         curriculum=config.curriculum)


def micro_rows(config: RunConfig, batch: StepBatch) -> int:
    """Sequences per micro-batch: micro_batch_size blocks, cut to the step's length."""
    return config.train.micro_batch_size * (config.train.seq_len // batch.seq_len)


def resolve_vocab_size(config: RunConfig, dataset: DatasetVersion) -> RunConfig:
    """Fill model.vocab_size from the tokenizer (rounded up), or check that it is large enough."""
    model = config.model
    if model.vocab_size is None:
        multiple = model.pad_vocab_multiple
        padded = -(-dataset.vocab_size // multiple) * multiple
        return config.model_copy(update={"model": model.model_copy(update={"vocab_size": padded})})
    if model.vocab_size < dataset.vocab_size:
        raise HeloxError(f"model.vocab_size {model.vocab_size} is smaller than the tokenizer's "
                         f"{dataset.vocab_size} tokens",
                         hint="leave model.vocab_size unset to take the tokenizer's size")
    return config


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise HeloxError("train.device is 'cuda' but no CUDA device is available",
                         hint="set train.device=cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resume_key(config: RunConfig, dataset_version: str,
               injected_versions: dict[str, str] | None = None,
               watermark_key_id: str | None = None,
               base_fingerprint: str | None = None) -> str:
    """Hash of everything that determines the training trajectory; resuming requires a match."""
    return sha256_json(trajectory_config(config.model_dump(mode="json"))
                       | _key_versions(dataset_version, injected_versions, watermark_key_id,
                                       base_fingerprint))


def legacy_resume_key(config: RunConfig, saved_raw: dict, dataset_version: str,
                      injected_versions: dict[str, str] | None = None,
                      watermark_key_id: str | None = None,
                      base_fingerprint: str | None = None) -> str | None:
    """The key an older Helox gave this run, saved (`saved_raw`, its config.yaml) before some
    trajectory fields existed: this run's key without those fields, or None when one of them
    holds a value other than the one that reproduces the saved run (LEGACY_VALUES, else the
    field's default). Resuming accepts it beside resume_key()."""
    current = trajectory_config(config.model_dump(mode="json"))
    fields, saved = flatten(current), flatten(trajectory_config(saved_raw))
    added = {name for name in fields if name not in saved}
    if not added or added - _accepted_as_absent(config, fields, saved):
        return None
    for name in added:
        *parents, leaf = name.split(".")
        section = current
        for parent in parents:
            section = section[parent]
        del section[leaf]
    return sha256_json(current | _key_versions(dataset_version, injected_versions,
                                               watermark_key_id, base_fingerprint))


def _accepted_as_absent(config: RunConfig, fields: dict, saved: dict) -> set[str]:
    """This run's fields (dotted) that a saved run lacks and that hold the value reproducing
    it: LEGACY_VALUES, else the field's default."""
    defaults = flatten({name: type(config).model_fields[name].default.model_dump(
        mode="json") for name in TRAJECTORY_SECTIONS})
    return {name for name, value in fields.items() if name not in saved
            and name in defaults and value == LEGACY_VALUES.get(name, defaults[name])}


def _key_versions(dataset_version: str, injected_versions: dict[str, str] | None,
                  watermark_key_id: str | None, base_fingerprint: str | None) -> dict:
    """What a resume key holds beside the trajectory config: the data and weights it uses."""
    versions = {"dataset_version": dataset_version}
    if base_fingerprint:  # a LoRA run: the weights it adapts
        versions["base_fingerprint"] = base_fingerprint
    if injected_versions:  # absent when empty, so keys of runs without injection are unchanged
        versions["injected_versions"] = injected_versions
    if watermark_key_id:  # the secret's name: resuming with another secret is another run
        versions["watermark_key_id"] = watermark_key_id
    return versions


def trajectory_config(raw: dict) -> dict:
    """The sections of a config (its JSON form) that determine the training trajectory."""
    sections = {name: copy.deepcopy(raw[name]) for name in TRAJECTORY_SECTIONS}
    for section, fields in RESUMABLE_CHANGES.items():
        for name in fields:
            sections[section].pop(name, None)
    if raw.get("lora") is not None:  # absent without one: other runs' keys are unchanged
        sections["lora"] = copy.deepcopy(raw["lora"])
    if raw["watermark"] is not None:  # absent without one: other runs' keys are unchanged
        sections["watermark"] = {key: value for key, value in raw["watermark"].items()
                                 if key != "secret_file"}
    return sections


def describe_mismatch(path: Path, config: RunConfig, saved_info: dict, run_info: dict) -> str:
    saved = trajectory_config(read_config_raw(path))
    current = trajectory_config(config.model_dump(mode="json"))
    saved_fields, current_fields = flatten(saved), flatten(current)
    accepted = _accepted_as_absent(config, current_fields, saved_fields)
    diffs = [diff for diff in _dotted_diffs(saved, current) if diff.split()[0] not in accepted]
    diffs += [f"the saved run predates {name} and ran as {name}={value} (resume with --set "
              f"{name}={value})" for name, value in LEGACY_VALUES.items()
              if name not in saved_fields and current_fields.get(name) != value]
    if saved_info["dataset_version"] != run_info["dataset_version"]:
        diffs.append(f"dataset version {saved_info['dataset_version']} → "
                     f"{run_info['dataset_version']}")
    if saved_info.get("watermark_key_id") != run_info.get("watermark_key_id"):
        diffs.append(f"watermark secret (key id) {saved_info.get('watermark_key_id')} → "
                     f"{run_info.get('watermark_key_id')}")
    if saved_info.get("injected_datasets", {}) != run_info["injected_datasets"]:
        diffs.append(f"injected datasets {saved_info.get('injected_datasets', {})} → "
                     f"{run_info['injected_datasets']} (a newer head of an injected name?)")
    return "; ".join(diffs) or "resume key differs"


class _Absent:
    """A field one of two configs lacks, as a diff shows it."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


def _dotted_diffs(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key, ABSENT), new.get(key, ABSENT), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _dotted_diffs(a, b, path + ".")
        elif a != b:
            diffs.append(f"{path} {a!r} → {b!r}")
    return diffs


def write_run_files(run_dir: Path, config: RunConfig, run_info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir / CONFIG_FILE, config.model_dump(mode="json"))
    (run_dir / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=1))
