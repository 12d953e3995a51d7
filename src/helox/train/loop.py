"""The training loop. `train` reads top to bottom: build, resume, then step / log / eval / save.

Legend: B micro-batch size, T sequence length, V vocabulary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from torch import nn
from torch.optim.swa_utils import AveragedModel

from helox.config import RunConfig, read_saved_config, save_config, sha256_json
from helox.data.loader import (LoaderOptions, MicroBatch, StepBatch, TrainLoader,
                               fixed_sequences, split_rows)
from helox.data.prepare import open_named
from helox.data.shards import DatasetVersion
from helox.errors import HeloxError
from helox.model.llama import Llama
from helox.observe.metrics import MetricsLog, StepProgress, truncate_after_step
from helox.repro import rng_state, run_fingerprint, seed_everything, set_rng_state
from helox.train import checkpoint as ckpt
from helox.train.optim import AdaptiveClip, build_optimizer, effective_betas, lr_at, set_lr
from helox.train.step import (LossFn, StepOutcome, compiled, make_loss_fn, pick_precision,
                              train_step)

# Config fields that may change when resuming: they do not change the trajectory (compile
# changes only rounding, and turning it off must stay possible when a compiler breaks; the data
# order does not depend on the number of data workers).
RESUMABLE_CHANGES = {"train": {"eval_every_steps", "eval_batches", "compile", "data_workers"}}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    resumed_from_step: int | None
    last_loss: float | None
    last_val_loss: float | None
    checkpoint: Path | None


def train(config: RunConfig, run_dir: Path, dataset: DatasetVersion, until_step: int | None = None,
          console: Console | None = None) -> TrainResult:
    """Train (or resume) the run in `run_dir` up to train.max_steps, or `until_step` if given
    (the schedule still targets max_steps, as when a job is preempted)."""
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    config = resolve_vocab_size(config, dataset)
    device = pick_device(config.train.device)
    precision = pick_precision(config.train.precision, device)
    # On CPU deterministic kernels cost next to nothing, so runs are always bit-reproducible.
    seed_everything(config.train.seed, config.train.deterministic or device.type == "cpu")
    model = Llama(config.model).to(device)
    optimizer = build_optimizer(model, config.optim)
    clip = AdaptiveClip(config.optim.adaptive_clip, config.optim.grad_clip_norm)
    ema = ema_model(model, config.train.ema_decay) if config.train.ema_decay else None
    injected = {stage.dataset: open_named(config, stage.dataset)
                for stage in config.curriculum.inject if stage.dataset}
    loader = TrainLoader(dataset, loader_options(config), injected=injected)
    evaluator = Evaluator(dataset, config, loader)
    injected_versions = {name: d.version for name, d in injected.items()}
    run_info = {**run_fingerprint(config.sha256(), dataset.version),
                "resume_key": resume_key(config, dataset.version, injected_versions),
                "injected_datasets": injected_versions,
                "dataset_path": str(dataset.path),
                "precision": precision, "device": str(device)}
    start_step, resumed = resume(run_dir, run_info, config, model, optimizer, loader, clip, ema,
                                 console)
    write_run_files(run_dir, config, run_info)

    # Evaluation stays eager (a second, no-grad graph would cost a compile) and scores "lm".
    loss_fn = make_loss_fn(model, device, precision)
    ema_loss_fn = make_loss_fn(ema.module, device, precision) if ema else None
    train_loss_fn = make_loss_fn(model, device, precision,
                                 [o.name for o in config.train.objectives])
    train_loss_fn = compiled(train_loss_fn) if config.train.compile else train_loss_fn
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    events = MetricsLog(run_dir / "events.jsonl")
    nan_steps = config.faults.nan_steps()
    skipped_steps = resumed.get("skipped_steps", 0)
    tc = config.train
    last_step = min(tc.max_steps, until_step or tc.max_steps)
    step, loss, val_loss, saved = start_step, None, None, None
    announce(console, model, device, precision, config, start_step, last_step, loader, run_dir)
    with StepProgress(console, tc.max_steps, start_step) as progress:
        while step < last_step:
            lr = lr_at(step, config.optim, tc.max_steps) * loader.curriculum.lr_factor(step)
            set_lr(optimizer, lr)
            started = time.perf_counter()
            batch = loader.next_step()
            clip_norm = clip.threshold()
            outcome = train_step(train_loss_fn, model, optimizer,
                                 batch.micro_batches(micro_rows(config, batch)), clip_norm,
                                 {o.name: o.weight_at(step) for o in tc.objectives},
                                 poison=step + 1 in nan_steps)
            loss, grad_norm = outcome.loss, outcome.grad_norm
            clip.record(grad_norm)
            if outcome.skipped:
                skipped_steps += 1
                events.write(nonfinite_event(step + 1, outcome, skipped_steps))
            elif ema is not None:
                ema.update_parameters(model)
            tokens_per_s = batch.data.inputs.numel() / (time.perf_counter() - started)
            beta1, beta2 = effective_betas(config.optim, step)
            step += 1
            metrics.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           **objective_metrics(config, outcome, step - 1),
                           "clip_norm": clip_norm, "beta1_eff": beta1, "beta2_eff": beta2,
                           "tokens_per_s": round(tokens_per_s, 1),
                           **({"skipped": True} if outcome.skipped else {}),
                           **({"skipped_steps": skipped_steps} if skipped_steps else {}),
                           **data_metrics(loader, batch)})
            step_val_loss = None
            if tc.eval_every_steps and (step % tc.eval_every_steps == 0 or step == tc.max_steps):
                val_loss, by_domain = evaluator.losses(loss_fn, model, "eval")
                step_val_loss = val_loss
                record = {"step": step, "val_loss": val_loss,
                          **{f"val_loss.{d}": v for d, v in by_domain.items()}}
                if ema is not None:
                    record["val_loss_ema"] = evaluator.losses(ema_loss_fn, ema.module, "eval")[0]
                metrics.write(record)
            if loader.rebalance_due(step):
                _, by_domain = evaluator.losses(loss_fn, model, "rebalance")
                weights = loader.rebalance(step, by_domain)
                metrics.write({"step": step, "event": "rebalance",
                               **{f"rebalance_loss.{d}": v for d, v in by_domain.items()},
                               **{f"rebalance_weight.{d}": w
                                  for d, w in zip(loader.domains, weights)}})
            if step % config.checkpoint.every_steps == 0 or step == last_step:
                state = {"rng": rng_state(), "loader": loader.state_dict(),
                         "clip": clip.state_dict(), "skipped_steps": skipped_steps,
                         "ema_updates": int(ema.n_averaged) if ema is not None else 0}
                saved = ckpt.save_checkpoint(run_dir, step, model, optimizer, state, config,
                                             run_info, config.checkpoint.keep_last,
                                             extra_files={"tokenizer.json": dataset.tokenizer_path},
                                             ema=ema.module if ema is not None else None)
            progress.update(step, loss, tokens_per_s, step_val_loss)
    metrics.close()
    events.close()
    loader.close()
    return TrainResult(run_dir, step, start_step or None, loss, val_loss, saved)


def announce(console: Console, model: Llama, device: torch.device, precision: str,
             config: RunConfig, start_step: int, last_step: int, loader: TrainLoader,
             run_dir: Path) -> None:
    tc = config.train
    if start_step >= last_step:
        console.print(f"nothing to train: {run_dir} is at step {start_step} (stopping at "
                      f"{last_step}; train.max_steps={tc.max_steps})", soft_wrap=True)
        return
    tokens_per_step = loader.curriculum.batch_blocks(start_step) * tc.seq_len
    console.print(f"training {model.num_params():,} parameters on {device} ({precision}"
                  f"{', compiled' if tc.compile else ''}), steps {start_step}→{last_step} of "
                  f"{tc.max_steps}, {tokens_per_step:,} tokens per step, run folder {run_dir}",
                  soft_wrap=True)
    if loader.spec.weighted:
        weights = loader.weights_for(start_step)
        mix = ", ".join(f"{d} {w:.2f}" for d, w in zip(loader.domains, weights))
        console.print(f"domain mixture: {mix}"
                      f"{' (rebalanced online)' if loader.rebalancer else ''}", soft_wrap=True)
    if tc.compile:
        console.print("compiling the first step (~30 s on 2 CPU cores the first time, seconds "
                      "once cached; --set train.compile=false skips it)", soft_wrap=True)


def objective_metrics(config: RunConfig, outcome: StepOutcome, step: int) -> dict:
    """Each objective per token and its weight, when the loss has more than the LM term."""
    if [o.name for o in config.train.objectives] == ["lm"] and \
            config.train.objectives[0].weight_at(step) == 1.0:
        return {}
    record = {f"loss.{name}": value for name, value in outcome.terms.items()}
    record |= {f"weight.{o.name}": o.weight_at(step) for o in config.train.objectives}
    return record


def nonfinite_event(step: int, outcome: StepOutcome, skipped_steps: int) -> dict:
    """The events.jsonl line of a skipped step; `runbook` names its entry in docs/runbooks.md."""
    return {"step": step, "event": "nonfinite_step_skipped", "severity": "warning",
            "runbook": "nonfinite-step", "loss": outcome.loss, "grad_norm": outcome.grad_norm,
            "skipped_steps": skipped_steps,
            "action": "skipped the update: weights and optimizer state unchanged"}


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


def data_metrics(loader: TrainLoader, batch: StepBatch) -> dict:
    """What the loader fed this step: shape, tokens so far, and the mixture."""
    record = {"seq_len": batch.seq_len, "batch_sequences": batch.num_rows,
              "tokens_seen": loader.curriculum.tokens_before(batch.step + 1)}
    if not loader.spec.weighted:
        return record | {"epoch": batch.state["epochs"][0]}
    for domain, weight, share in zip(loader.domains, loader.weights_for(batch.step),
                                     loader.realised_shares()):
        record[f"mix_weight.{domain}"] = round(weight, 6)
        record[f"mix_share.{domain}"] = round(share, 6)
    return record


class Evaluator:
    """Validation loss on fixed sequences of every validation domain: `eval` shares
    train.eval_batches micro-batches evenly among the domains; `rebalance` scores
    mixture.rebalance.eval_sequences per domain. Sequences are read once and kept."""

    def __init__(self, dataset: DatasetVersion, config: RunConfig, loader: TrainLoader):
        self.dataset, self.config = dataset, config
        self._sets: dict[str, dict[str, MicroBatch]] = {}
        if loader.rebalancer is not None:
            missing = loader.val_streams_missing()
            if missing:
                raise HeloxError(f"mixture.rebalance needs validation data of every weighted "
                                 f"domain; dataset {dataset.version} has none for {missing}",
                                 hint="add validation sources for them, or weight them 0")

    def losses(self, loss_fn: LossFn, model: nn.Module, purpose: str,
               ) -> tuple[float, dict[str, float]]:
        """(mean loss per token over all sequences, mean loss per token of each domain)."""
        sets = self._sequences(purpose)
        rows = self.config.train.micro_batch_size
        sums, counts = {}, {}
        model.eval()
        with torch.no_grad():
            for domain, data in sets.items():
                batches = split_rows(data, rows)
                sums[domain] = sum(loss_fn(batch)["lm"].item() for batch in batches)
                counts[domain] = data.targets.numel()
        model.train()
        overall = sum(sums.values()) / sum(counts.values())
        return overall, {d: sums[d] / counts[d] for d in sums}

    def _sequences(self, purpose: str) -> dict[str, MicroBatch]:
        if purpose not in self._sets:
            tc = self.config.train
            if purpose == "eval":
                domains = max(1, len(self.dataset.domains("val")))
                per_domain = -(-tc.eval_batches * tc.micro_batch_size // domains)
            else:
                per_domain = self.config.mixture.rebalance.eval_sequences
            self._sets[purpose] = fixed_sequences(self.dataset, "val", tc.seq_len, per_domain,
                                                  tc.document_masking)
        return self._sets[purpose]


# ---------------------------------------------------------------------------------------------
# Setup helpers


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
               injected_versions: dict[str, str] | None = None) -> str:
    """Hash of everything that determines the training trajectory; resuming requires a match."""
    versions = {"dataset_version": dataset_version}
    if injected_versions:  # absent when empty, so keys of runs without injection are unchanged
        versions["injected_versions"] = injected_versions
    return sha256_json(_trajectory_config(config) | versions)


def _trajectory_config(config: RunConfig) -> dict:
    sections = config.model_dump(mode="json", include={"model", "train", "optim", "mixture",
                                                        "curriculum"})
    for section, fields in RESUMABLE_CHANGES.items():
        for name in fields:
            sections[section].pop(name, None)
    return sections


def resume(run_dir: Path, run_info: dict, config: RunConfig, model: nn.Module,
           optimizer: torch.optim.Optimizer, loader: TrainLoader, clip: AdaptiveClip,
           ema: AveragedModel | None, console: Console) -> tuple[int, dict]:
    """Load the newest valid checkpoint of `run_dir` into the objects; return its step and
    state (0 and {} when there is none)."""
    ckpt.remove_stale_temporaries(run_dir)
    restored = ckpt.load_newest_valid(
        run_dir, warn=lambda m: console.print("[yellow]warning:[/]", escape(m)), quarantine=True)
    if restored is None:
        return 0, {}
    saved_info = json.loads((restored.path / "run.json").read_text())
    if saved_info["resume_key"] != run_info["resume_key"]:
        raise HeloxError(f"{run_dir} holds checkpoints of a different run: "
                         + _describe_mismatch(restored.path, config, saved_info, run_info),
                         hint="train in a new --run-dir, or resume with the original recipe")
    ckpt.load_weights(restored.path, model)
    ckpt.load_optimizer(restored.path, optimizer)
    loader.load_state_dict(restored.state["loader"])
    clip.load_state_dict(restored.state["clip"])
    if ema is not None:
        ckpt.load_weights(restored.path, ema.module, ema=True)
        ema.n_averaged.fill_(restored.state["ema_updates"])
    set_rng_state(restored.state["rng"])
    truncate_after_step(run_dir / "metrics.jsonl", restored.step)
    truncate_after_step(run_dir / "events.jsonl", restored.step)
    console.print(f"resuming from {restored.path.name}")
    return restored.step, restored.state


def _describe_mismatch(path: Path, config: RunConfig, saved_info: dict, run_info: dict) -> str:
    saved = read_saved_config(path / "config.yaml")
    diffs = _dotted_diffs(_trajectory_config(saved), _trajectory_config(config))
    if saved_info["dataset_version"] != run_info["dataset_version"]:
        diffs.append(f"dataset version {saved_info['dataset_version']} → "
                     f"{run_info['dataset_version']}")
    if saved_info.get("injected_datasets", {}) != run_info["injected_datasets"]:
        diffs.append(f"injected datasets {saved_info.get('injected_datasets', {})} → "
                     f"{run_info['injected_datasets']} (a newer head of an injected name?)")
    return "; ".join(diffs) or "resume key differs"


def _dotted_diffs(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _dotted_diffs(a, b, path + ".")
        elif a != b:
            diffs.append(f"{path} {a!r} → {b!r}")
    return diffs


def write_run_files(run_dir: Path, config: RunConfig, run_info: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=1))
