"""The training loop. `train` builds a `Trainer`, starts it (resume, logs, loss functions) and
runs the loop, which reads top to bottom: per step train, log, evaluate, sample the telemetry,
rebalance, recover, save. Under torchrun the same loop runs on every rank of the job
(docs/distributed.md): the decisions are taken on reduced figures, so every rank takes them
alike, and rank 0 alone writes.

Legend: B micro-batch size, T sequence length, V vocabulary.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.markup import escape

from helox import checkpoint as ckpt
from helox.allocator import large_tensors_on_heap, reuses_memory
from helox.data.loader import MicroBatch, StepBatch, TrainLoader
from helox.data.prepare import open_named, open_version
from helox.data.shards import DatasetVersion
from helox.data.tokenizer import load_tokenizer
from helox.distributed.job import (Job, barrier, from_main, join_job, max_over_ranks,
                                   replicas_agree)
from helox.errors import HeloxError
from helox.eval.lm import LanguageModel, helox_forward
from helox.eval.runner import check_contamination, prepare_tasks, run_suite
from helox.eval.suite import LoadedSuite, load_suite, subset
from helox.events import TrainingEvents, open_training_events
from helox.hardware import matmul_flops_per_s, memory_mib
from helox.model.llama import Llama
from helox.finetune.dpo import Reference, make_dpo_loss_fn
from helox.finetune.lora import only_active
from helox.observe.health import Alert, HealthMonitor
from helox.observe.metrics import MetricsLog, StepProgress, truncate_after_step
from helox.observe.probes import Telemetry, probe_batches, unigram_counts
from helox.observe.sinks import Sinks, open_sinks
from helox.platform import load_platform
from helox.repro import rng_state, run_fingerprint, seed_everything, set_rng_state
from helox.training.evaluator import Evaluator
from helox.training.faults import FaultInjector
from helox.training.optim import AdaptiveClip, effective_betas, lr_at, set_lr
from helox.training.precision import apply_precision_policy
from helox.training.records import (StepMetrics, bad_step_event, data_metrics, dpo_metrics,
                                    objective_metrics)
from helox.training.setup import (check_dataset_kind, check_parallel, describe_mismatch,
                                  ema_model, legacy_resume_key, loader_options, lora_model,
                                  micro_rows, model_flops_per_token, parallel_training,
                                  pick_device, resolve_vocab_size, resume_key, write_run_files)
from helox.training.stability import Recovery, SpikeDetector
from helox.training.state import Counters, TrainerState, ValueState
from helox.training.step import (AUTOCAST_DTYPES, StepOutcome, compile_blocks, compiled,
                                 compiler_errors, make_loss_fn, make_scaler, pick_attention,
                                 pick_precision, rows, train_step)
from helox.training.watermark import CARD_FILE, watermark_for, with_watermark, write_card

if TYPE_CHECKING:  # the composition of configs sits above the trainer: annotations only
    from helox.config import RunConfig


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    resumed_from_step: int | None
    last_loss: float | None
    last_val_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None
    """The signal (SIGTERM, SIGINT) that ended the run early after a checkpoint, if any."""


COMPILE_WORDS = {True: ", compiled", "blocks": ", compiled per block", False: ""}
"""How the start line names train.compile."""


def train(config: RunConfig, run_dir: Path, dataset: DatasetVersion, until_step: int | None = None,
          console: Console | None = None) -> TrainResult:
    """Train (or resume) the run in `run_dir` up to train.max_steps, or `until_step` if given
    (the schedule still targets max_steps, as when a job is preempted). SIGTERM or SIGINT
    finishes the current step, checkpoints and returns (`stopped_by`). The platform hears of
    the run through WORKSPACE's event outbox (docs/events.md)."""
    trainer = Trainer(config, Path(run_dir), dataset, console or Console(stderr=True))
    try:
        with StopSignals() as signals, large_tensors_on_heap(trainer.reuse_memory):
            trainer.start(until_step)
            result = trainer.run(signals)
    except BaseException as exc:
        trainer.close(error=exc)
        raise
    trainer.close(result)
    return result


class StopSignals:
    """SIGTERM (preemption, `kill`) and SIGINT (Ctrl-C) only raise a flag: the loop finishes
    its step, checkpoints and returns. A second SIGINT interrupts at once. Handlers can only
    be installed from the main thread; elsewhere signals keep their default behaviour."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """Everything a run holds: model, optimizer, data, monitors, logs, and `state`, the
    registry of what a checkpoint saves and a resume or rollback restores. `start` resumes
    and opens the logs; `run` is the loop."""

    def __init__(self, config: RunConfig, run_dir: Path, dataset: DatasetVersion,
                 console: Console):
        self.run_dir, self.dataset = run_dir, dataset
        self.config = config = resolve_vocab_size(config, dataset)
        device = pick_device(config.train.device)
        self.job = join_job(config.parallel, device)
        """This process's rank in a multi-process job (torchrun), or the only one."""
        self.device = self.job.device(device)
        # Only rank 0 speaks: the other ranks' decisions are the same (they are reduced).
        self.console = console if self.job.main else Console(quiet=True)
        check_parallel(config, self.job)
        check_dataset_kind(config, dataset)
        self.precision = pick_precision(config.train.precision, self.device)
        self.attention = pick_attention(config.train.attention, self.device, self.precision,
                                        config.train.seq_len)
        self.reuse_memory = reuses_memory(config.train.reuse_memory, self.device)
        # On CPU deterministic kernels cost next to nothing, so runs are always bit-reproducible.
        seed_everything(config.train.seed,
                        config.train.deterministic or self.device.type == "cpu")
        self.build_model()
        self.detector = SpikeDetector(config.stability.spike)
        self.recovery = Recovery(config.stability.rollback)
        self.health = HealthMonitor(config.observe.health)
        self.telemetry, self.probe = self.build_telemetry()
        self.suite = self.build_suite()
        self.suite_contamination: dict | None = None
        self.rollback_request: tuple[int, str] | None = None
        """(first bad step, why) when a streak of bad steps or a divergence calls for one."""
        self.flops_per_token = model_flops_per_token(self.model, config.train.seq_len)
        self.peak_flops_per_s = config.observe.peak_flops_per_s or matmul_flops_per_s(
            self.device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision,
                                                                             torch.float32))
        injected = self.open_injected()
        self.loader = TrainLoader(dataset, loader_options(config), self.job.rank,
                                  self.job.world_size, injected=injected)
        self.evaluator = Evaluator(dataset, config, self.loader)
        self.faults = FaultInjector(config.faults, dataset.vocab_size, config.train.seed,
                                    self.job.rank, run_dir)
        self.next_batch = (self.faults.batches(self.loader.next_step) if self.faults.active
                           else self.loader.next_step)
        self.watermark = None if config.watermark is None else watermark_for(
            config.watermark, load_tokenizer(dataset.tokenizer_path), dataset.eos_id)
        self.run_info = self.build_run_info({name: d.version for name, d in injected.items()})
        cc = config.checkpoint
        self.writer = ckpt.JobCheckpointWriter(
            run_dir, cc.keep_last, cc.keep_best, cc.async_save, self.job.rank,
            self.job.world_size) if self.job.distributed else \
            ckpt.CheckpointWriter.from_config(run_dir, cc)
        self.counters = Counters()
        self.state = self.register_state()
        self.resumed_from: int | None = None
        self.init_record: dict | None = None
        self.metrics = self.events = self.telemetry_log = None
        self.sinks: Sinks | None = None
        self.platform_events: TrainingEvents | None = None
        """Rank 0's events for the platform (training-started, …), when there is work to do."""

    # -- setup ----------------------------------------------------------------------------

    def build_model(self) -> None:
        """Model (its precision policy and activation checkpointing), its parallel form and
        optimizer on the job's mesh, loss scaler, clipping window and EMA. `model` is the
        model itself (what evaluation, telemetry and the EMA read); `parallel` what trains
        (DDP's wrapper; FSDP2 shards `model` in place, so there they are one)."""
        tc = self.config.train
        self.adapters, self.lora_info = None, None
        if self.config.lora is not None:  # the base from train.init_from, frozen, + adapters
            self.model, self.adapters, self.lora_info = lora_model(self.config, self.warn)
            self.model.to(self.device)
        else:
            self.model = Llama(self.config.model).to(self.device)
        self.model.set_activation_checkpointing(tc.activation_checkpointing)
        self.model.set_attention(self.attention)
        apply_precision_policy(self.model, tc.fp32_modules, self.device.type)
        self.scaler = make_scaler(self.precision, self.device)
        self.parallel, self.optimizer = parallel_training(
            self.model, self.config.optim,
            self.config.parallel if self.job.distributed else None, self.device)
        self.clip = AdaptiveClip(self.config.optim.adaptive_clip, self.config.optim.grad_clip_norm)
        self.ema = ema_model(self.model, tc.ema_decay) if tc.ema_decay else None

    def register_state(self) -> TrainerState:
        """Every stateful part, once: a checkpoint saves them all, a resume loads them all,
        a rollback restores those marked `rollback` (the model's trajectory) and keeps the
        rest (the data moves on past the bad window; the counters keep counting)."""
        state = TrainerState()
        # A LoRA run checkpoints its adapter alone; the frozen base is read from its checkpoint.
        state.register("model", self.adapters if self.adapters is not None else self.parallel,
                       rollback=True)
        state.register("optimizer", self.optimizer, rollback=True)
        state.register("counters", self.counters)
        state.register("loader", self.loader, per_rank=True)
        state.register("clip", self.clip, rollback=True)
        state.register("detector", self.detector, rollback=self.detector.restore_reference)
        state.register("recovery", self.recovery)
        state.register("health", self.health)
        if self.scaler is not None:
            state.register("scaler", self.scaler, rollback=True)
        if self.ema is not None:
            state.register("ema", self.ema.module, rollback=True)
            state.register("ema_updates", ValueState(
                lambda: {"updates": int(self.ema.n_averaged)},
                lambda saved: self.ema.n_averaged.fill_(saved["updates"])), rollback=True)
        if self.telemetry is not None:  # observe.telemetry may be switched on at a resume
            state.register("telemetry", self.telemetry, required=False, per_rank=True)
        # Last, so that nothing restored after it draws from the global RNGs.
        state.register("rng", ValueState(rng_state, set_rng_state), per_rank=True)
        return state

    def open_injected(self) -> dict[str, DatasetVersion]:
        """The datasets curriculum.inject names: rank 0 opens them (the audit log records
        the read) and the other ranks the versions it found."""
        config = self.config
        names = [stage.dataset for stage in config.curriculum.inject if stage.dataset]
        opened = {name: open_named(config, name) for name in names} if self.job.main else {}
        chosen = from_main({name: d.version for name, d in opened.items()}, self.job)
        return opened if self.job.main else {name: open_version(config, version)
                                             for name, version in chosen.items()}

    def build_telemetry(self) -> tuple[Telemetry | None, dict[str, MicroBatch] | None]:
        """The sampled probes and their fixed batch (None when observe.telemetry is off)."""
        cfg, tc = self.config.observe.telemetry, self.config.train
        if not cfg.sample_every_steps:
            return None, None
        telemetry = Telemetry(cfg, self.config.model, unigram_counts(self.dataset))
        return telemetry, probe_batches(self.dataset, cfg, tc.seq_len, tc.document_masking)

    def build_suite(self) -> LoadedSuite | None:
        """The eval suite run every evaluation.every_steps (loaded now: a bad file fails
        before training starts), or None."""
        cfg = self.config.evaluation
        if cfg.suite is None or not cfg.every_steps:
            return None
        return subset(load_suite(cfg.suite), cfg.tasks)

    def build_run_info(self, injected_versions: dict[str, str]) -> dict:
        """run.json: the run fingerprint and the resume key, and what the run trains on."""
        watermark_key = self.watermark.card.key_id if self.watermark else None
        return {**run_fingerprint(self.config.sha256(), self.dataset.version),
                "resume_key": resume_key(self.config, *self.key_versions(injected_versions)),
                **({"lora": self.lora_info} if self.lora_info else {}),
                **({"watermark_key_id": watermark_key} if watermark_key else {}),
                "injected_datasets": injected_versions,
                "dataset_path": str(self.dataset.path),
                "precision": self.precision, "attention": self.attention,
                "reuse_memory": self.reuse_memory, "device": str(self.device)}

    def key_versions(self, injected_versions: dict[str, str]) -> tuple:
        """What the resume key holds beside the config: the dataset's and injected datasets'
        versions, the watermark secret's key id and a LoRA base's fingerprint."""
        return (self.dataset.version, injected_versions,
                self.watermark.card.key_id if self.watermark else None,
                self.lora_info and self.lora_info["base_fingerprint"])

    def resumes(self, saved_key: str, folder: Path) -> bool:
        """Whether a checkpoint saved under `saved_key` belongs to this run: this run's key,
        or the key an older Helox gave it before some of its fields existed."""
        if saved_key == self.run_info["resume_key"]:
            return True
        versions = self.key_versions(self.run_info["injected_datasets"])
        return saved_key == legacy_resume_key(self.config, ckpt.read_config_raw(folder), *versions)

    def start(self, until_step: int | None) -> None:
        """Resume (or warm-start), write the run files, build the loss functions, open the
        logs and sinks, and say what will be trained."""
        config, tc = self.config, self.config.train
        self.resume()
        self.build_loss_fns()
        self.last_step = min(tc.max_steps, until_step or tc.max_steps)
        self.last_save_time = time.monotonic()
        if self.job.main:
            self.open_logs()
            if self.step < self.last_step:
                self.open_platform_events()
            announce(self.console, self.model, self.device,
                     f"{self.precision}, {self.attention} attention", config, self.step,
                     self.last_step, self.loader, self.run_dir, self.job)
        barrier(self.job)  # the run's files exist before any rank goes on

    def open_logs(self) -> None:
        """Rank 0's: the run files, metrics, events and telemetry logs and the sinks."""
        config = self.config
        write_run_files(self.run_dir, config, self.run_info)
        if self.watermark is not None:
            write_card(self.watermark.card, self.run_dir / CARD_FILE)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.events = MetricsLog(self.run_dir / "events.jsonl")
        self.telemetry_log = MetricsLog(self.run_dir / "telemetry.jsonl")
        self.sinks = open_sinks(config.observe.sinks, self.run_dir, self.run_info,
                                config.model_dump(mode="json"), start_step=self.step,
                                warn=self.warn)
        for name, where in self.sinks.info.items():
            details = ", ".join(f"{k} {v}" for k, v in where.items())
            self.console.print(f"{name}: {details}", soft_wrap=True, markup=False)
        if self.init_record is not None:
            self.event(self.init_record)

    def open_platform_events(self) -> None:
        """Rank 0's: the run's events for the platform, to the workspace's outbox and, with
        events.redis_url in WORKSPACE/platform.yaml (or HELOX_EVENTS_REDIS_URL), to Redis."""
        config = self.config
        self.platform_events = open_training_events(
            load_platform(config.workspace).events, config.workspace, config.name,
            self.run_dir, self.run_info["fingerprint"], self.warn)
        self.platform_events.started(self.step, config.train.max_steps, self.resumed_from,
                                     self.dataset.version, self.run_info["config_sha256"])

    def build_loss_fns(self) -> None:
        """Evaluation stays eager (a second, no-grad graph would cost a compile) and scores
        "lm"; training compiles forward + loss, adds the watermark beside the graph, and takes
        the injected faults from outside it."""
        tc = self.config.train
        self.eval_loss_fn = make_loss_fn(self.model, self.device, self.precision)
        self.ema_loss_fn = make_loss_fn(self.ema.module, self.device, self.precision) \
            if self.ema else None
        per_block = tc.compile == "blocks"
        if per_block:  # the model's blocks compile in place, for evaluation too
            compile_blocks(self.model)
        loss_fn = make_loss_fn(self.parallel, self.device, self.precision,
                               [o.name for o in tc.objectives], compile_objectives=per_block)
        self.dpo_eval_fn = None
        if self.config.dpo is not None:  # config checks: eager, no other objective
            reference, dtype = self.dpo_reference(), AUTOCAST_DTYPES.get(self.precision)
            loss_fn = make_dpo_loss_fn(self.parallel, reference, self.device, dtype,
                                       self.config.dpo)
            self.dpo_eval_fn = make_dpo_loss_fn(self.model, reference, self.device, dtype,
                                                self.config.dpo)
        self.train_loss_fn = compiler_errors(loss_fn) if per_block else \
            compiled(loss_fn) if tc.compile else loss_fn
        if self.watermark is not None:
            self.train_loss_fn = with_watermark(self.train_loss_fn, self.model, self.device,
                                                self.precision, self.watermark)
        if self.faults.active:
            self.train_loss_fn = self.faults.loss_fn(self.train_loss_fn)

    def dpo_reference(self) -> Reference:
        """DPO's reference: a LoRA run's base with the trained adapter off (the stacked ones
        stay on), else the model of dpo.reference or train.init_from, loaded frozen."""
        config = self.config
        if config.lora is not None and config.dpo.reference is None:
            keep = config.lora.adapter_names()[:-1]

            def base(tokens_BT, positions_BT, doc_ids_BT):
                with only_active(self.model, keep):
                    return self.model(tokens_BT, positions_BT, doc_ids_BT)
            return base
        path = ckpt.resolve_checkpoint(config.dpo.reference or config.train.init_from,
                                       warn=self.warn)
        model = ckpt.load_trained_model(path).model.to(self.device).requires_grad_(False)
        self.console.print(f"DPO reference: {path}", soft_wrap=True)
        return model

    def objective_weights(self, step: int) -> dict[str, float]:
        if self.config.dpo is not None:
            return {"dpo": 1.0}
        return {o.name: o.weight_at(step) for o in self.config.train.objectives}

    @property
    def step(self) -> int:
        return self.counters.step

    # -- the loop -------------------------------------------------------------------------

    def run(self, signals: StopSignals) -> TrainResult:
        loss, val_loss, saved, stopped_by = None, None, None, None
        with StepProgress(self.console, self.config.train.max_steps, self.step) as progress:
            while self.step < self.last_step:
                outcome, tokens_per_s, stop_signal = self.train_one_step(signals)
                self.faults.kill_if_due(self.step)
                loss = outcome.loss
                self.publish_progress(loss, tokens_per_s)
                step_val_loss = self.evaluate_if_due()
                self.sample_telemetry_if_due()
                self.run_suite_if_due()
                val_loss = step_val_loss if step_val_loss is not None else val_loss
                self.rebalance_if_due()
                if self.rollback_request is not None:
                    self.roll_back(*self.rollback_request)
                    saved = self.save(step_val_loss)
                elif self.save_due():
                    saved = self.save(step_val_loss)
                progress.update(self.step, loss, tokens_per_s, step_val_loss)
                if not self.job.distributed:  # no one to agree with: as late as possible
                    stop_signal = signals.received
                if stop_signal and self.step < self.last_step:
                    stopped_by = stop_signal
                    saved = self.stop_for_signal(stopped_by, saved, step_val_loss)
                    break
        return TrainResult(self.run_dir, self.step, self.resumed_from, loss, val_loss, saved,
                           stopped_by)

    def train_one_step(self, signals: StopSignals) -> tuple[StepOutcome, float, str | None]:
        """One optimizer step with its metrics line (and events line when it was bad); also
        the stop signal received, by any rank of a job (torchrun forwards SIGTERM to each
        worker, which may see it a step apart: all of them stop after the same step)."""
        config, tc = self.config, self.config.train
        step, number = self.step, self.step + 1  # `number`: how metrics.jsonl counts it
        lr_factor = self.recovery.lr_factor(number)
        lr = lr_at(step, config.optim, tc.max_steps) * \
            self.loader.curriculum.lr_factor(step) * lr_factor
        set_lr(self.optimizer, lr)
        started = time.perf_counter()
        batch = self.next_batch()
        if self.telemetry is not None:
            self.telemetry.count_tokens(batch.data.inputs)
        clip_norm = self.clip.threshold()
        outcome = train_step(self.train_loss_fn, self.parallel, self.optimizer,
                             batch.micro_batches(micro_rows(config, batch)), clip_norm,
                             self.objective_weights(step), gate=self.detector.gate,
                             scaler=self.scaler, group=self.job.group, masked=self.loader.masked,
                             divisor=rows if self.config.dpo else None,
                             primary="dpo" if self.config.dpo else "lm")
        if outcome.overflowed and outcome.loss_scale > 1.0:
            # fp16's scaler probing its range (it backed off): expected, not a bad step.
            outcome = outcome._replace(skip_reason="overflow")
        z_score = self.detector.z_score(outcome.loss)
        bad = self.detector.record(number, outcome.loss,
                                   None if outcome.skip_reason == "overflow"
                                   else outcome.skip_reason)
        alerts = self.health.on_step(number, outcome.loss, outcome.skip_reason)
        if self.recovery.due(self.detector):
            self.rollback_request = (self.detector.streak_start,
                                     f"{self.detector.streak} bad steps in a row")
        if outcome.skipped:
            self.counters.skipped_steps += 1
        else:
            self.clip.record(outcome.grad_norm)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        received = signal.Signals[signals.received].value if signals.received else 0
        # One all-reduce a step for the figures that differ by rank and the stop decision.
        elapsed_s, memory, received = max_over_ranks(
            [time.perf_counter() - started, memory_mib(self.device)["memory_peak_mib"],
             float(received)], self.job)
        # The global figure: every rank's tokens over the slowest rank's time.
        tokens_per_s = batch.data.inputs.numel() * self.job.world_size / elapsed_s
        self.counters.step = number
        self.log(self.step_metrics(outcome, batch, lr, lr_factor, clip_norm, tokens_per_s,
                                   memory).record())
        if bad:
            self.event(bad_step_event(number, bad, outcome, z_score, self.detector,
                                      self.counters.skipped_steps))
        self.raise_alerts(alerts)
        return outcome, tokens_per_s, signal.Signals(int(received)).name if received else None

    def step_metrics(self, outcome: StepOutcome, batch: StepBatch, lr: float, lr_factor: float,
                     clip_norm: float | None, tokens_per_s: float,
                     memory_peak_mib: float) -> StepMetrics:
        """The metrics line of the step just done (`self.step` counts it already). In a
        multi-process job the loss and gradient norm are the global batch's, tokens/s the
        job's, memory the largest rank's (`ranks` says how many)."""
        step = self.step - 1  # the 0-based step the schedules were evaluated at
        beta1, beta2 = effective_betas(self.config.optim, step)
        return StepMetrics(
            step=self.step, loss=outcome.loss, lr=lr, grad_norm=outcome.grad_norm,
            clip_norm=clip_norm, beta1_eff=beta1, beta2_eff=beta2, tokens_per_s=tokens_per_s,
            mfu=tokens_per_s * self.flops_per_token / (self.peak_flops_per_s
                                                       * self.job.world_size),
            skipped_steps=self.counters.skipped_steps,
            objectives=dpo_metrics(outcome) if self.config.dpo else
            objective_metrics(self.config.train, outcome, step),
            memory_mib={"memory_peak_mib": memory_peak_mib},
            data=data_metrics(self.loader, batch), ranks=self.job.world_size,
            skipped=outcome.skip_reason if outcome.skipped else None,
            lr_cooldown_factor=lr_factor if lr_factor != 1.0 else None,
            loss_scale=outcome.loss_scale)

    def raise_alerts(self, alerts: list[Alert]) -> None:
        """Each alert to events.jsonl; a divergence asks for a rollback to before its window
        (when stability.rollback is on)."""
        for alert in alerts:
            record = alert.event(self.step)
            if alert.action == "rollback":
                if self.recovery.config is None:
                    record["action"] = "none (stability.rollback is off)"
                elif self.rollback_request is None:
                    window = self.config.observe.health.divergence.window_steps
                    self.rollback_request = (max(1, self.step - window + 1), alert.message)
            self.event(record)

    def evaluate_if_due(self) -> float | None:
        tc = self.config.train
        if not tc.eval_every_steps or (self.step % tc.eval_every_steps
                                       and self.step != tc.max_steps):
            return None
        if self.dpo_eval_fn is not None:  # held-out pairs: the DPO loss and TRL's metrics
            terms = self.evaluator.pair_terms(self.dpo_eval_fn, self.model)
            val_loss = terms.pop("dpo")
            self.log({"step": self.step, "val_loss": val_loss,
                      **{f"val_{name}": value for name, value in terms.items()}})
            self.raise_alerts(self.health.on_eval(self.step, val_loss))
            return val_loss
        val_loss, by_domain = self.evaluator.losses(self.eval_loss_fn, self.model, "eval")
        record = {"step": self.step, "val_loss": val_loss,
                  **{f"val_loss.{d}": v for d, v in by_domain.items()},
                  **{f"val_ppl.{d}": math.exp(min(v, 50.0)) for d, v in by_domain.items()}}
        if self.ema is not None:
            record["val_loss_ema"] = self.evaluator.losses(self.ema_loss_fn, self.ema.module,
                                                           "eval")[0]
        self.log(record)
        self.raise_alerts(self.health.on_eval(self.step, val_loss))
        return val_loss

    def sample_telemetry_if_due(self) -> None:
        """Probe the model's insides (observe.telemetry): one line of scalars in metrics.jsonl,
        the histograms and the attention-entropy map in telemetry.jsonl, alerts to events."""
        if self.telemetry is None or not self.config.observe.telemetry.due(self.step):
            return
        dtype = AUTOCAST_DTYPES.get(self.precision)
        # Eager even where train.compile: blocks compiled the blocks: compiled code does not
        # run hooks added after it was compiled, and the probes are hooks.
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16,
                            enabled=dtype is not None), torch.compiler.set_stance("force_eager"):
            sample = self.telemetry.sample(self.step, self.model, self.probe)
        self.raise_alerts(self.health.on_sample(self.step, sample.scalars))
        if not self.job.main:  # every rank samples (FSDP2's forward needs them all)
            return
        self.log({"step": self.step, "event": "telemetry", **sample.scalars})
        for name, histogram in sample.histograms.items():
            self.sinks.histogram(self.step, name, histogram.bin_edges, histogram.counts)
        self.telemetry_log.write({
            "step": self.step, "attn_entropy_LH": sample.attention_entropy_LH.tolist(),
            "histograms": {name: {"bin_edges": h.bin_edges.tolist(), "counts": h.counts.tolist()}
                           for name, h in sample.histograms.items()}})

    def run_suite_if_due(self) -> None:
        """The eval suite on the current weights (evaluation.*): every metric to metrics.jsonl
        and the sinks ("event": "eval"), a failed threshold to events.jsonl. Items found in
        the training data are looked up once per run."""
        cfg = self.config.evaluation
        if self.suite is None or (self.step % cfg.every_steps
                                  and self.step != self.config.train.max_steps):
            return
        lm = self.language_model(cfg.batch_size)
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            if self.suite_contamination is None:
                self.suite_contamination = check_contamination(
                    lm, self.suite, self.dataset, prepare_tasks(lm, self.suite, self.dataset))
            result = run_suite(lm, self.suite, self.dataset,
                               contamination=self.suite_contamination)
        finally:
            for module, mode in modes.items():
                module.training = mode
        self.log({"step": self.step, "event": "eval", "eval_failures": len(result.failures()),
                  **{f"eval.{task.name}.{metric}": estimate.value
                     for task in result.tasks for metric, estimate in task.metrics.items()}})
        if result.failures():
            self.event({"step": self.step, "event": "eval_gate_failed", "severity": "warning",
                        "runbook": "eval-gate", "suite": result.suite,
                        "message": "; ".join(result.failures()),
                        "action": "none (the run goes on; `helox eval` gates promotion)"})

    def language_model(self, batch_size: int) -> LanguageModel:
        """The live model (no copy) behind the eval harness's interface."""
        return LanguageModel(helox_forward(self.model), load_tokenizer(
            self.dataset.tokenizer_path), self.dataset.eos_id, self.config.model.max_seq_len,
            self.config.model.vocab_size, ckpt.step_name(self.step), str(self.run_dir),
            self.device, batch_size,
            None if self.job.distributed else self.model)  # FSDP2 shards: no cached decoding

    def rebalance_if_due(self) -> None:
        if not self.loader.rebalance_due(self.step):
            return
        _, by_domain = self.evaluator.losses(self.eval_loss_fn, self.model, "rebalance")
        weights = self.loader.rebalance(self.step, by_domain)
        self.log({"step": self.step, "event": "rebalance",
                  **{f"rebalance_loss.{d}": v for d, v in by_domain.items()},
                  **{f"rebalance_weight.{d}": w for d, w in zip(self.loader.domains, weights)}})

    # -- recovery -------------------------------------------------------------------------

    def roll_back(self, streak_start: int, why: str) -> None:
        """Back to the newest checkpoint before step `streak_start`, the first bad one; the
        data moves on (the window is skipped) and the LR is cut for a cool-down. Stops the
        run past the budget."""
        step, self.rollback_request = self.step, None
        if self.recovery.budget_left <= 0:
            self.stop_run(f"{why} (steps {streak_start}–{step}) and the rollback budget is "
                          f"spent ({self.recovery.rollbacks} of "
                          f"stability.rollback.max_rollbacks="
                          f"{self.recovery.config.max_rollbacks})", "rollback-budget")
        self.writer.wait()  # the save in flight may be the target, and it prunes
        target = self.newest_checkpoint(before_step=streak_start)
        if target is None:
            self.stop_run(f"{why} (steps {streak_start}–{step}) and no valid checkpoint "
                          f"before step {streak_start} to roll back to", "rollback-budget")
        self.state.restore(target, rollback=True)
        self.health.cleared("divergence")
        self.recovery.start_cooldown(step)
        cfg = self.recovery.config
        replicas = {"replicas_identical": replicas_agree(self.model, self.job)} \
            if self.job.distributed else {}
        self.event({**replicas,
            "step": step, "event": "rollback", "severity": "critical", "runbook": "rollback",
            "cause": why, "bad_steps": [streak_start, step], "checkpoint": target.path.name,
            "restored_step": target.step, "skipped_data_steps": [target.step + 1, step],
            "lr_factor": self.recovery.cooldown_factor,
            "cooldown_until_step": self.recovery.cooldown_until,
            "rollbacks": self.recovery.rollbacks, "max_rollbacks": cfg.max_rollbacks,
            "action": f"weights, optimizer, loss scale, EMA and clipping window of step "
                      f"{target.step} restored; batches of steps {target.step + 1}–{step} "
                      f"skipped; LR × {self.recovery.cooldown_factor:g} until step "
                      f"{self.recovery.cooldown_until}"})
        self.console.print(f"[yellow]rollback:[/] {escape(why)}, steps {streak_start}–{step}; "
                           f"restored {target.path.name}, LR × "
                           f"{self.recovery.cooldown_factor:g} for {cfg.cooldown_steps} steps "
                           f"(rollback {self.recovery.rollbacks} of {cfg.max_rollbacks})")

    def stop_run(self, diagnosis: str, runbook: str) -> None:
        self.event({"step": self.step, "event": "run_stopped", "severity": "critical",
                    "runbook": runbook, "diagnosis": diagnosis, **self.detector.reference()})
        raise HeloxError(f"training stopped at step {self.step}: {diagnosis}",
                         hint=f"see docs/runbooks.md#{runbook} and {self.run_dir}/events.jsonl; "
                              "raise stability.rollback.max_rollbacks and run the same command "
                              "to resume before the streak, or start a new run with a lower "
                              f"optim.lr and train.init_from={self.run_dir}")

    # -- checkpoints ----------------------------------------------------------------------

    def save_due(self) -> bool:
        """By steps or by minutes, or the last step; postponed during a bad streak (a rollback
        must find a checkpoint from before the streak)."""
        if self.step == self.last_step:
            return True
        if self.detector.streak:
            return False
        cc = self.config.checkpoint
        elapsed_s = time.monotonic() - self.last_save_time
        return self.step % cc.every_steps == 0 or (
            cc.every_minutes is not None and elapsed_s >= 60 * cc.every_minutes)

    def save(self, val_loss: float | None) -> Path:
        """Checkpoint every registered part: a host copy now, written by the writer (in the
        background with checkpoint.async_save). `val_loss` ranks it for keep-best."""
        extra_files = {ckpt.TOKENIZER_FILE: self.dataset.tokenizer_path}
        if self.watermark is not None:
            extra_files[CARD_FILE] = self.run_dir / CARD_FILE
        config = self.config.model_dump(mode="json")
        if self.job.distributed:
            path = self.writer.save(self.step, self.state.parts(), self.state.per_rank(),
                                    config, self.run_info, extra_files, val_loss)
        else:
            snapshot = ckpt.snapshot(self.step, self.state.parts(), config, self.run_info,
                                     extra_files=extra_files, val_loss=val_loss)
            path = self.writer.save(snapshot,
                                    crash_halfway=self.faults.crash_during_save(self.step))
        self.last_save_time = time.monotonic()
        if self.platform_events is not None:  # announced once on disk
            self.platform_events.checkpoint_saving(self.step, path, val_loss)
        self.log({"step": self.step, "checkpoint": path.name,
                  "checkpoint_stall_s": round(self.writer.last_stall_s, 4)})
        return path

    def stop_for_signal(self, name: str, saved: Path | None, val_loss: float | None) -> Path:
        if saved is None or ckpt.step_of(saved) != self.step:
            saved = self.save(val_loss)
        self.event({"step": self.step, "event": "stopped_by_signal", "severity": "info",
                    "runbook": "preemption", "signal": name, "checkpoint": saved.name})
        self.console.print(f"{name}: stopped after step {self.step}, checkpoint {saved}; the "
                           "same command resumes")
        return saved

    # -- resume ---------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the newest valid checkpoint of the run folder, if any."""
        if self.job.main:
            ckpt.remove_stale_temporaries(self.run_dir)
        restored = self.newest_checkpoint()
        if restored is None:
            if self.config.train.init_from is not None and self.config.lora is None:
                self.warm_start(self.config.train.init_from)
            return
        saved_info = ckpt.read_run_info(restored.path)
        saved_base = (saved_info.get("lora") or {}).get("base_fingerprint")
        if self.lora_info and saved_base not in (None, self.lora_info["base_fingerprint"]):
            raise HeloxError(f"{restored.path} holds an adapter trained on the base model with "
                             f"fingerprint {saved_base}; train.init_from "
                             f"({self.lora_info['base_checkpoint']}) now holds fingerprint "
                             f"{self.lora_info['base_fingerprint']}",
                             hint="restore the original base model, or train in a new --run-dir")
        if not self.resumes(saved_info["resume_key"], restored.path):
            raise HeloxError(f"{self.run_dir} holds checkpoints of a different run: "
                             + describe_mismatch(restored.path, self.config, saved_info,
                                                 self.run_info),
                             hint="train in a new --run-dir, or resume with the original recipe")
        self.state.restore(restored)
        if self.job.main:
            for log in ("metrics.jsonl", "events.jsonl", "telemetry.jsonl"):
                truncate_after_step(self.run_dir / log, restored.step)
        self.console.print(f"resuming from {restored.path.name}")
        self.resumed_from = restored.step

    def newest_checkpoint(self, before_step: int | None = None) -> ckpt.Restored | None:
        """The newest valid checkpoint (before `before_step`), read for this rank: rank 0
        verifies (and quarantines) and every rank reads the folder it chose."""
        path = ckpt.newest_valid(self.run_dir, self.warn, quarantine=True,
                                 before_step=before_step) if self.job.main else None
        path = from_main(path, self.job)
        return ckpt.read_checkpoint(path, self.job.rank) if path is not None else None

    def warm_start(self, source: Path) -> None:
        """Matching weights (and optimizer states) of another run's checkpoint; the report
        says what was loaded, what stayed fresh and why, and what the checkpoint had extra."""
        path = ckpt.resolve_checkpoint(source, warn=self.warn)
        problem = ckpt.verify_checkpoint(path)
        if problem:
            raise HeloxError(f"train.init_from: {path} is not a valid checkpoint: {problem}",
                             hint="point it at a run folder or another checkpoint folder")
        weights = ckpt.load_weights_partial(path, self.model)
        record = {"step": 0, "event": "initialized_from", "severity": "info",
                  "checkpoint": str(path), "weights": asdict(weights)}
        summary = f"initialized from {path}: {len(weights.loaded)} tensors loaded, " \
                  f"{len(weights.fresh)} fresh, {len(weights.dropped)} not used"
        if self.config.train.init_optimizer:
            states = ckpt.load_optimizer_partial(path, self.optimizer, self.model)
            record["optimizer"] = asdict(states)
            summary += f"; optimizer states: {len(states.loaded)} loaded, " \
                       f"{len(states.fresh)} fresh"
        self.console.print(summary, soft_wrap=True)
        for name, reason in weights.fresh.items():
            self.console.print(f"  fresh: {name} ({reason})", soft_wrap=True, markup=False)
        self.init_record = record

    def log(self, record: dict) -> None:
        """A metrics line: metrics.jsonl and every sink (rank 0's)."""
        if not self.job.main:
            return
        self.metrics.write(record)
        self.sinks.scalars(record["step"], record)

    def event(self, record: dict) -> None:
        """An events line (an action or an alert): events.jsonl and every sink (rank 0's)."""
        if not self.job.main:
            return
        self.events.write(record)
        self.sinks.event(record)

    def publish_progress(self, loss: float, tokens_per_s: float) -> None:
        """Rank 0's: training-progress when due, and the checkpoints now on disk."""
        if self.platform_events is not None:
            self.platform_events.checkpoints_on_disk()
            self.platform_events.progress(self.step, loss, tokens_per_s)

    def publish_end(self, result: TrainResult | None, error: BaseException | None,
                    saves_finished: bool) -> None:
        """Rank 0's: the checkpoints the writer finished, then how the run ended (complete,
        failed, or stopped early and resumable: helox/events/training.py), then a bounded
        last delivery (what Redis did not take yet waits in the outbox)."""
        events, self.platform_events = self.platform_events, None
        if events is None:
            return
        if saves_finished:
            events.checkpoints_written()
        else:
            events.checkpoints_on_disk()
        if error is not None:
            events.failed(self.step, error)
        elif result.stopped_by or result.step < self.config.train.max_steps:
            events.stopped(result.step, result.stopped_by or "until_step", result.last_loss,
                           result.checkpoint)
        else:
            events.complete(result.step, result.last_loss, result.last_val_loss,
                            result.checkpoint)
        events.close()

    def warn(self, message: str) -> None:
        self.console.print("[yellow]warning:[/]", escape(message))

    def close(self, result: TrainResult | None = None,
              error: BaseException | None = None) -> None:
        """Finish the save in flight (its folder exists once this returns), tell the platform
        how the run ended, then close the rest; `error`: the run ends with that exception (the
        sinks mark their runs failed, the platform hears training-failed)."""
        failed = error is not None
        try:
            if self.job.distributed:
                self.writer.close(failed=failed)
            else:
                self.writer.close()
        except BaseException as exc:  # the last save failed, and with it the run
            self.publish_end(None, error or exc, saves_finished=False)
            raise
        self.publish_end(result, error, saves_finished=True)
        if self.sinks is not None:
            self.sinks.close(failed=failed)
        for log in (self.metrics, self.events, self.telemetry_log):
            if log is not None:
                log.close()
        self.loader.close()


def announce(console: Console, model: Llama, device: torch.device, precision: str,
             config: RunConfig, start_step: int, last_step: int, loader: TrainLoader,
             run_dir: Path, job: Job) -> None:
    tc = config.train
    if start_step >= last_step:
        console.print(f"nothing to train: {run_dir} is at step {start_step} (stopping at "
                      f"{last_step}; train.max_steps={tc.max_steps})", soft_wrap=True)
        return
    tokens_per_step = loader.curriculum.batch_blocks(start_step) * tc.seq_len
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    what = f"{trainable:,} parameters" + (f" ({frozen:,} frozen)" if frozen else "")
    console.print(f"training {what} on {device} ({precision}"
                  f"{COMPILE_WORDS[tc.compile]}), steps {start_step}→{last_step} of "
                  f"{tc.max_steps}, {tokens_per_step:,} tokens per step, run folder {run_dir}",
                  soft_wrap=True)
    if job.distributed:
        replicate, shard = config.parallel.degrees(job.world_size)
        layout = ("FSDP2" if replicate == 1 else "HSDP") if shard > 1 else \
            ("DDP + ZeRO-1" if config.parallel.zero1 else "DDP")
        console.print(f"{job.world_size} ranks, {layout} (dp_replicate {replicate} × dp_shard "
                      f"{shard}), {tokens_per_step // job.world_size:,} tokens per rank",
                      soft_wrap=True)
    if loader.spec.weighted:
        weights = loader.weights_for(start_step)
        mix = ", ".join(f"{d} {w:.2f}" for d, w in zip(loader.domains, weights))
        console.print(f"domain mixture: {mix}"
                      f"{' (rebalanced online)' if loader.rebalancer else ''}", soft_wrap=True)
    if tc.compile:
        console.print("compiling the first step (~30 s on 2 CPU cores the first time, seconds "
                      "once cached; --set train.compile=false skips it)", soft_wrap=True)
