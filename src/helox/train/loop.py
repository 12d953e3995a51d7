"""The training loop. `train` reads top to bottom: build, resume, then per step: train, log,
evaluate, sample the telemetry, rebalance, recover, save.

Legend: B micro-batch size, T sequence length, V vocabulary.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
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
from helox.data.tokenizer import load_tokenizer
from helox.errors import HeloxError
from helox.hardware import matmul_flops_per_s, memory_mib
from helox.model.llama import Llama
from helox.observe.health import Alert, HealthMonitor
from helox.observe.probes import Telemetry, probe_batches, unigram_counts
from helox.observe.sinks import Sinks, open_sinks
from helox.observe.metrics import MetricsLog, StepProgress, truncate_after_step
from helox.repro import rng_state, run_fingerprint, seed_everything, set_rng_state
from helox.train import checkpoint as ckpt
from helox.train.optim import AdaptiveClip, build_optimizer, effective_betas, lr_at, set_lr
from helox.train.precision import apply_precision_policy
from helox.train.stability import Recovery, SpikeDetector
from helox.train.step import (AUTOCAST_DTYPES, LossFn, StepOutcome, compiled, make_loss_fn,
                              make_scaler, pick_precision, train_step)
from helox.train.watermark import CARD_FILE, watermark_for, with_watermark, write_card

# Config fields that may change when resuming: they do not change the trajectory (compile
# changes only rounding, and turning it off must stay possible when a compiler breaks; the data
# order does not depend on the number of data workers; activation checkpointing recomputes the
# same values, tested bitwise equal, and may be switched on after running out of memory). The
# `stability`, `checkpoint` and
# `faults` sections are not part of the trajectory either: they are the operator's knobs.
RESUMABLE_CHANGES = {"train": {"eval_every_steps", "eval_batches", "compile", "data_workers",
                               "activation_checkpointing"}}


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


def train(config: RunConfig, run_dir: Path, dataset: DatasetVersion, until_step: int | None = None,
          console: Console | None = None) -> TrainResult:
    """Train (or resume) the run in `run_dir` up to train.max_steps, or `until_step` if given
    (the schedule still targets max_steps, as when a job is preempted). SIGTERM or SIGINT
    finishes the current step, checkpoints and returns (`stopped_by`)."""
    trainer = Trainer(config, Path(run_dir), dataset, console or Console(stderr=True))
    try:
        with StopSignals() as signals:
            result = trainer.run(until_step, signals)
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
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
    """Everything a run holds: model, optimizer, data, monitors, logs. `run` is the loop."""

    def __init__(self, config: RunConfig, run_dir: Path, dataset: DatasetVersion,
                 console: Console):
        self.console, self.run_dir, self.dataset = console, run_dir, dataset
        self.config = config = resolve_vocab_size(config, dataset)
        self.device = pick_device(config.train.device)
        self.precision = pick_precision(config.train.precision, self.device)
        # On CPU deterministic kernels cost next to nothing, so runs are always bit-reproducible.
        seed_everything(config.train.seed,
                        config.train.deterministic or self.device.type == "cpu")
        self.model = Llama(config.model).to(self.device)
        self.model.set_activation_checkpointing(config.train.activation_checkpointing)
        apply_precision_policy(self.model, config.train.fp32_modules, self.device.type)
        self.scaler = make_scaler(self.precision, self.device)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.clip = AdaptiveClip(config.optim.adaptive_clip, config.optim.grad_clip_norm)
        self.ema = ema_model(self.model, config.train.ema_decay) if config.train.ema_decay \
            else None
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
        injected = {stage.dataset: open_named(config, stage.dataset)
                    for stage in config.curriculum.inject if stage.dataset}
        self.loader = TrainLoader(dataset, loader_options(config), injected=injected)
        self.evaluator = Evaluator(dataset, config, self.loader)
        self.watermark = None if config.watermark is None else watermark_for(
            config.watermark, load_tokenizer(dataset.tokenizer_path), dataset.eos_id)
        watermark_key = self.watermark.card.key_id if self.watermark else None
        injected_versions = {name: d.version for name, d in injected.items()}
        self.run_info = {**run_fingerprint(config.sha256(), dataset.version),
                         "resume_key": resume_key(config, dataset.version, injected_versions,
                                                  watermark_key),
                         **({"watermark_key_id": watermark_key} if watermark_key else {}),
                         "injected_datasets": injected_versions,
                         "dataset_path": str(dataset.path),
                         "precision": self.precision, "device": str(self.device)}
        self.writer = ckpt.CheckpointWriter.from_config(run_dir, config.checkpoint)
        self.step, self.skipped_steps = 0, 0
        self.resumed_from: int | None = None
        self.init_record: dict | None = None
        self.metrics = self.events = self.telemetry_log = None
        self.sinks: Sinks | None = None
        self.faults = (config.faults.nan_steps(), config.faults.spike_steps(),
                       config.faults.corrupt_steps())
        self.crash_save_steps = config.faults.crash_save_steps()

    def build_telemetry(self) -> tuple[Telemetry | None, dict[str, MicroBatch] | None]:
        """The sampled probes and their fixed batch (None when observe.telemetry is off)."""
        cfg, tc = self.config.observe.telemetry, self.config.train
        if not cfg.sample_every_steps:
            return None, None
        telemetry = Telemetry(cfg, self.config.model, unigram_counts(self.dataset))
        return telemetry, probe_batches(self.dataset, cfg, tc.seq_len, tc.document_masking)

    def build_suite(self):
        """The eval suite run every evaluation.every_steps (loaded now: a bad file fails
        before training starts), or None."""
        cfg = self.config.evaluation
        if cfg.suite is None or not cfg.every_steps:
            return None
        from helox.eval.suite import load_suite, subset

        return subset(load_suite(cfg.suite), cfg.tasks)

    # -- the loop -------------------------------------------------------------------------

    def run(self, until_step: int | None, signals: StopSignals) -> TrainResult:
        config, tc = self.config, self.config.train
        self.resume()
        write_run_files(self.run_dir, config, self.run_info)
        if self.watermark is not None:
            write_card(self.watermark.card, self.run_dir / CARD_FILE)
        # Evaluation stays eager (a second, no-grad graph would cost a compile) and scores "lm".
        self.eval_loss_fn = make_loss_fn(self.model, self.device, self.precision)
        self.ema_loss_fn = make_loss_fn(self.ema.module, self.device, self.precision) \
            if self.ema else None
        loss_fn = make_loss_fn(self.model, self.device, self.precision,
                               [o.name for o in tc.objectives])
        self.train_loss_fn = compiled(loss_fn) if tc.compile else loss_fn
        if self.watermark is not None:  # eager, beside the compiled graph
            self.train_loss_fn = with_watermark(self.train_loss_fn, self.model, self.device,
                                                self.precision, self.watermark)
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
        last_step = min(tc.max_steps, until_step or tc.max_steps)
        loss, val_loss, saved, stopped_by = None, None, None, None
        self.last_save_time = time.monotonic()
        announce(self.console, self.model, self.device, self.precision, config, self.step,
                 last_step, self.loader, self.run_dir)
        with StepProgress(self.console, tc.max_steps, self.step) as progress:
            while self.step < last_step:
                outcome, tokens_per_s = self.train_one_step()
                loss = outcome.loss
                step_val_loss = self.evaluate_if_due()
                self.sample_telemetry_if_due()
                self.run_suite_if_due()
                val_loss = step_val_loss if step_val_loss is not None else val_loss
                self.rebalance_if_due()
                if self.rollback_request is not None:
                    self.roll_back(*self.rollback_request)
                    saved = self.save(step_val_loss)
                elif self.save_due(last_step):
                    saved = self.save(step_val_loss)
                progress.update(self.step, loss, tokens_per_s, step_val_loss)
                if signals.received and self.step < last_step:
                    stopped_by = signals.received
                    saved = self.stop_for_signal(stopped_by, saved, step_val_loss)
                    break
        return TrainResult(self.run_dir, self.step, self.resumed_from, loss, val_loss, saved,
                           stopped_by)

    def train_one_step(self) -> tuple[StepOutcome, float]:
        """One optimizer step with its metrics line (and events line when it was bad)."""
        config, tc = self.config, self.config.train
        step, number = self.step, self.step + 1  # `number`: how metrics.jsonl counts it
        lr_factor = self.recovery.lr_factor(number)
        lr = lr_at(step, config.optim, tc.max_steps) * \
            self.loader.curriculum.lr_factor(step) * lr_factor
        set_lr(self.optimizer, lr)
        started = time.perf_counter()
        batch = self.loader.next_step()
        nan_steps, spike_steps, corrupt_steps = self.faults
        if number in corrupt_steps:
            batch = corrupted(batch, self.dataset.vocab_size, tc.seed)
        if self.telemetry is not None:
            self.telemetry.count_tokens(batch.data.inputs)
        clip_norm = self.clip.threshold()
        outcome = train_step(self.train_loss_fn, self.model, self.optimizer,
                             batch.micro_batches(micro_rows(config, batch)), clip_norm,
                             {o.name: o.weight_at(step) for o in tc.objectives},
                             poison=number in nan_steps,
                             loss_factor=config.faults.spike_factor if number in spike_steps
                             else 1.0, gate=self.detector.gate, scaler=self.scaler)
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
            self.skipped_steps += 1
        else:
            self.clip.record(outcome.grad_norm)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        tokens_per_s = batch.data.inputs.numel() / (time.perf_counter() - started)
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops_per_s
        beta1, beta2 = effective_betas(config.optim, step)
        self.step = number
        self.log({
            "step": number, "loss": outcome.loss, "lr": lr, "grad_norm": outcome.grad_norm,
            "grad_norm_clipped": min(outcome.grad_norm, clip_norm) if clip_norm
            else outcome.grad_norm,
            **objective_metrics(config, outcome, step), "clip_norm": clip_norm,
            "beta1_eff": beta1, "beta2_eff": beta2, "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(mfu, 4), **memory_mib(self.device),
            **({"skipped": outcome.skip_reason} if outcome.skipped else {}),
            "skipped_steps": self.skipped_steps,
            **({"lr_cooldown_factor": lr_factor} if lr_factor != 1.0 else {}),
            **({"loss_scale": outcome.loss_scale} if outcome.loss_scale is not None else {}),
            **data_metrics(self.loader, batch)})
        if bad:
            self.event(bad_step_event(number, bad, outcome, z_score, self.detector,
                                             self.skipped_steps))
        self.raise_alerts(alerts)
        return outcome, tokens_per_s

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
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16,
                            enabled=dtype is not None):
            sample = self.telemetry.sample(self.step, self.model, self.probe)
        self.log({"step": self.step, "event": "telemetry", **sample.scalars})
        for name, histogram in sample.histograms.items():
            self.sinks.histogram(self.step, name, histogram.bin_edges, histogram.counts)
        self.telemetry_log.write({
            "step": self.step, "attn_entropy_LH": sample.attention_entropy_LH.tolist(),
            "histograms": {name: {"bin_edges": h.bin_edges.tolist(), "counts": h.counts.tolist()}
                           for name, h in sample.histograms.items()}})
        self.raise_alerts(self.health.on_sample(self.step, sample.scalars))

    def run_suite_if_due(self) -> None:
        """The eval suite on the current weights (evaluation.*): every metric to metrics.jsonl
        and the sinks ("event": "eval"), a failed threshold to events.jsonl. Items found in
        the training data are looked up once per run."""
        cfg = self.config.evaluation
        if self.suite is None or (self.step % cfg.every_steps
                                  and self.step != self.config.train.max_steps):
            return
        from helox.eval.runner import check_contamination, prepare_tasks, run_suite

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

    def language_model(self, batch_size: int):
        """The live model (no copy) behind the eval harness's interface."""
        from helox.data.tokenizer import load_tokenizer
        from helox.eval.lm import LanguageModel, helox_forward

        return LanguageModel(helox_forward(self.model), load_tokenizer(
            self.dataset.tokenizer_path), self.dataset.eos_id, self.config.model.max_seq_len,
            self.config.model.vocab_size, f"step-{self.step:08d}", str(self.run_dir),
            self.device, batch_size)

    def rebalance_if_due(self) -> None:
        if not self.loader.rebalance_due(self.step):
            return
        _, by_domain = self.evaluator.losses(self.eval_loss_fn, self.model, "rebalance")
        weights = self.loader.rebalance(self.step, by_domain)
        self.log({"step": self.step, "event": "rebalance",
                            **{f"rebalance_loss.{d}": v for d, v in by_domain.items()},
                            **{f"rebalance_weight.{d}": w
                               for d, w in zip(self.loader.domains, weights)}})

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
        target = ckpt.load_newest_valid(self.run_dir, self.warn, quarantine=True,
                                        before_step=streak_start)
        if target is None:
            self.stop_run(f"{why} (steps {streak_start}–{step}) and no valid checkpoint "
                          f"before step {streak_start} to roll back to", "rollback-budget")
        self.load_model_state(target)
        self.detector.restore_reference(
            target.state.get("stability", {}).get("detector", {"history": []}))
        self.health.cleared("divergence")
        self.recovery.start_cooldown(step)
        cfg = self.recovery.config
        self.event({
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
                           "runbook": runbook, "diagnosis": diagnosis,
                           **self.detector.reference()})
        raise HeloxError(f"training stopped at step {self.step}: {diagnosis}",
                         hint=f"see docs/runbooks.md#{runbook} and {self.run_dir}/events.jsonl; "
                              "raise stability.rollback.max_rollbacks and run the same command "
                              "to resume before the streak, or start a new run with a lower "
                              f"optim.lr and train.init_from={self.run_dir}")

    # -- checkpoints ----------------------------------------------------------------------

    def save_due(self, last_step: int) -> bool:
        """By steps or by minutes, or the last step; postponed during a bad streak (a rollback
        must find a checkpoint from before the streak)."""
        if self.step == last_step:
            return True
        if self.detector.streak:
            return False
        cc = self.config.checkpoint
        elapsed_s = time.monotonic() - self.last_save_time
        return self.step % cc.every_steps == 0 or (
            cc.every_minutes is not None and elapsed_s >= 60 * cc.every_minutes)

    def save(self, val_loss: float | None) -> Path:
        """Checkpoint the current step: a host copy now, written by the writer (in the
        background with checkpoint.async_save). `val_loss` ranks it for keep-best."""
        state = {"rng": rng_state(), "loader": self.loader.state_dict(),
                 "clip": self.clip.state_dict(), "skipped_steps": self.skipped_steps,
                 "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
                 "stability": {"detector": self.detector.state_dict(),
                               "recovery": self.recovery.state_dict()},
                 "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                 "health": self.health.state_dict(),
                 "telemetry": self.telemetry.state_dict() if self.telemetry else None}
        snapshot = ckpt.snapshot(self.step, self.model, self.optimizer, state, self.config,
                                 self.run_info,
                                 extra_files={"tokenizer.json": self.dataset.tokenizer_path,
                                              **({CARD_FILE: self.run_dir / CARD_FILE}
                                                 if self.watermark else {})},
                                 ema=self.ema.module if self.ema is not None else None,
                                 val_loss=val_loss)
        path = self.writer.save(snapshot, crash_halfway=self.step in self.crash_save_steps)
        self.last_save_time = time.monotonic()
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
        ckpt.remove_stale_temporaries(self.run_dir)
        restored = ckpt.load_newest_valid(self.run_dir, warn=self.warn, quarantine=True)
        if restored is None:
            if self.config.train.init_from is not None:
                self.warm_start(self.config.train.init_from)
            return
        saved_info = json.loads((restored.path / "run.json").read_text())
        if saved_info["resume_key"] != self.run_info["resume_key"]:
            raise HeloxError(f"{self.run_dir} holds checkpoints of a different run: "
                             + _describe_mismatch(restored.path, self.config, saved_info,
                                                  self.run_info),
                             hint="train in a new --run-dir, or resume with the original recipe")
        self.load_model_state(restored)
        self.loader.load_state_dict(restored.state["loader"])
        self.skipped_steps = restored.state.get("skipped_steps", 0)
        stability = restored.state.get("stability")  # absent before the stability work
        if stability is not None:
            self.detector.load_state_dict(stability["detector"])
            self.recovery.load_state_dict(stability["recovery"])
        if "health" in restored.state:
            self.health.load_state_dict(restored.state["health"])
        if self.telemetry is not None and restored.state.get("telemetry") is not None:
            self.telemetry.load_state_dict(restored.state["telemetry"])
        set_rng_state(restored.state["rng"])
        truncate_after_step(self.run_dir / "metrics.jsonl", restored.step)
        truncate_after_step(self.run_dir / "events.jsonl", restored.step)
        truncate_after_step(self.run_dir / "telemetry.jsonl", restored.step)
        self.console.print(f"resuming from {restored.path.name}")
        self.step = self.resumed_from = restored.step

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

    def load_model_state(self, restored: ckpt.Restored) -> None:
        """Weights, optimizer, loss scaler, EMA and clipping window: what a rollback restores."""
        ckpt.load_weights(restored.path, self.model)
        ckpt.load_optimizer(restored.path, self.optimizer)
        self.clip.load_state_dict(restored.state["clip"])
        if self.scaler is not None:
            self.scaler.load_state_dict(restored.state["scaler"])
        if self.ema is not None:
            ckpt.load_weights(restored.path, self.ema.module, ema=True)
            self.ema.n_averaged.fill_(restored.state["ema_updates"])

    def log(self, record: dict) -> None:
        """A metrics line: metrics.jsonl and every sink."""
        self.metrics.write(record)
        self.sinks.scalars(record["step"], record)

    def event(self, record: dict) -> None:
        """An events line (an action or an alert): events.jsonl and every sink."""
        self.events.write(record)
        self.sinks.event(record)

    def warn(self, message: str) -> None:
        self.console.print("[yellow]warning:[/]", escape(message))

    def close(self, failed: bool = False) -> None:
        """Finish the save in flight (its folder exists once this returns), then the rest;
        `failed`: the run ends with an exception (the sinks mark their runs failed)."""
        self.writer.close()
        if self.sinks is not None:
            self.sinks.close(failed=failed)
        for log in (self.metrics, self.events, self.telemetry_log):
            if log is not None:
                log.close()
        self.loader.close()


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


BAD_STEP_EVENTS = {"nonfinite": ("nonfinite_step_skipped", "nonfinite-step"),
                   "loss_spike": ("loss_spike", "loss-spike")}


def bad_step_event(step: int, reason: str, outcome: StepOutcome, z_score: float | None,
                   detector: SpikeDetector, skipped_steps: int) -> dict:
    """The events.jsonl line of a bad step; `runbook` names its entry in docs/runbooks.md."""
    event, runbook = BAD_STEP_EVENTS[reason]
    action = ("skipped the update: weights and optimizer state unchanged" if outcome.skipped
              else "logged only (stability.spike.skip_update is false)")
    return {"step": step, "event": event, "severity": "warning", "runbook": runbook,
            "loss": outcome.loss, "grad_norm": outcome.grad_norm,
            **({"z_score": z_score} if reason == "loss_spike" else {}),
            **detector.reference(), "bad_streak": detector.streak,
            "skipped_steps": skipped_steps, "action": action}


def corrupted(batch: StepBatch, vocab_size: int, seed: int) -> StepBatch:
    """The batch with uniformly random tokens (fault injection: a corrupted shard)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch.step)
    tokens_KNT = batch.tokens_KNT.clone()
    rows, length = tokens_KNT.shape[1:]
    random_NT1 = torch.randint(0, vocab_size, (rows, length + 1), generator=generator)
    tokens_KNT[0], tokens_KNT[1] = random_NT1[:, :-1], random_NT1[:, 1:]
    return StepBatch(batch.step, batch.seq_len, tokens_KNT, batch.domains, batch.state)


def model_flops_per_token(model: Llama, seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul parameter (forward and backward) plus attention
    scores and values, 12 × layers × d_model × context (PaLM's appendix B)."""
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * matmul_params + 12 * model.cfg.num_layers * model.cfg.d_model * seq_len


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
               injected_versions: dict[str, str] | None = None,
               watermark_key_id: str | None = None) -> str:
    """Hash of everything that determines the training trajectory; resuming requires a match."""
    versions = {"dataset_version": dataset_version}
    if injected_versions:  # absent when empty, so keys of runs without injection are unchanged
        versions["injected_versions"] = injected_versions
    if watermark_key_id:  # the secret's name: resuming with another secret is another run
        versions["watermark_key_id"] = watermark_key_id
    return sha256_json(_trajectory_config(config) | versions)


def _trajectory_config(config: RunConfig) -> dict:
    sections = config.model_dump(mode="json", include={"model", "train", "optim", "mixture",
                                                        "curriculum"})
    for section, fields in RESUMABLE_CHANGES.items():
        for name in fields:
            sections[section].pop(name, None)
    if config.watermark is not None:  # absent without one: other runs' keys are unchanged
        sections["watermark"] = config.watermark.model_dump(mode="json",
                                                            exclude={"secret_file"})
    return sections


def _describe_mismatch(path: Path, config: RunConfig, saved_info: dict, run_info: dict) -> str:
    saved = read_saved_config(path / "config.yaml")
    diffs = _dotted_diffs(_trajectory_config(saved), _trajectory_config(config))
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
