"""What the training loop writes: the metrics line of a step and the events line of a bad
step (metrics.jsonl and events.jsonl; every sink gets the same records)."""

from __future__ import annotations

from dataclasses import dataclass, field

from helox.data.loader import StepBatch, TrainLoader
from helox.training.config import TrainConfig
from helox.training.stability import SpikeDetector
from helox.training.step import StepOutcome


@dataclass
class StepMetrics:
    """One optimizer step's metrics line. `record()` lays it out as metrics.jsonl has it;
    the optional fields (None) are left out of the line."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    clip_norm: float | None
    beta1_eff: float
    beta2_eff: float
    tokens_per_s: float
    mfu: float
    skipped_steps: int
    objectives: dict[str, float] = field(default_factory=dict)
    """loss.<name> and weight.<name> when the loss is more than the plain LM term."""
    memory_mib: dict[str, float] = field(default_factory=dict)
    data: dict[str, float] = field(default_factory=dict)
    """What the loader fed the step (`data_metrics`)."""
    skipped: str | None = None
    """Why the update was skipped, when it was."""
    lr_cooldown_factor: float | None = None
    """The LR cut of a rollback's cool-down, while it lasts."""
    loss_scale: float | None = None
    """fp16's loss scale."""
    ranks: int = 1
    """Processes of the job (written when more than one: the line's figures are the job's)."""

    def record(self) -> dict:
        clipped = min(self.grad_norm, self.clip_norm) if self.clip_norm else self.grad_norm
        optional = {"skipped": self.skipped, "skipped_steps": self.skipped_steps,
                    "lr_cooldown_factor": self.lr_cooldown_factor,
                    "loss_scale": self.loss_scale, "ranks": self.ranks if self.ranks > 1 else None}
        return {"step": self.step, "loss": self.loss, "lr": self.lr,
                "grad_norm": self.grad_norm, "grad_norm_clipped": clipped, **self.objectives,
                "clip_norm": self.clip_norm, "beta1_eff": self.beta1_eff,
                "beta2_eff": self.beta2_eff, "tokens_per_s": round(self.tokens_per_s, 1),
                "mfu": round(self.mfu, 4), **self.memory_mib,
                **{k: v for k, v in optional.items() if v is not None}, **self.data}


def objective_metrics(config: TrainConfig, outcome: StepOutcome, step: int) -> dict:
    """Each objective per token and its weight, when the loss has more than the LM term."""
    if [o.name for o in config.objectives] == ["lm"] and \
            config.objectives[0].weight_at(step) == 1.0:
        return {}
    record = {f"loss.{name}": value for name, value in outcome.terms.items()}
    record |= {f"weight.{o.name}": o.weight_at(step) for o in config.objectives}
    return record


def dpo_metrics(outcome: StepOutcome) -> dict:
    """A DPO step's figures under TRL's names (rewards/…, logps/…, ref_logps/…), each the
    mean over the step's pairs; its loss is the line's `loss`."""
    return {name: value for name, value in outcome.terms.items() if name not in ("dpo", "total")}


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
