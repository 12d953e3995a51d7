"""Typed configuration: one model per component, YAML recipes, dotted overrides, ConfigError.

Every model refuses unknown keys. `load_config` validates a whole recipe at once and reports every
problem with its dotted path (`train.max_steps: ...`), so a user fixes them in one pass.

Relative paths of input files (`data.train[*].path`, `tokenizer.path`) are resolved against the
recipe's folder, so a recipe and its data move together; `workspace` is resolved against the
current directory, where the user wants the outputs.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from helox.configbase import StrictModel, resolve_input_path
from helox.data.contamination import ContaminationConfig
from helox.data.curriculum import CurriculumConfig
from helox.data.dedup import ExactDedupConfig, NearDedupConfig, SemanticDedupConfig
from helox.data.domains import DomainTagConfig
from helox.data.filters import NormalizeConfig, QualityConfig
from helox.data.mixing import MixtureConfig
from helox.data.safety import PiiConfig, SecretsConfig
from helox.data.sources import SourceConfig
from helox.data.synthetic import SyntheticTaskConfig
from helox.errors import HeloxError
from helox.observe.health import HealthConfig
from helox.observe.probes import TelemetryConfig
from helox.observe.sinks import SinksConfig

__all__ = ["ConfigError", "StrictModel", "SourceConfig", "RunConfig", "load_config"]


class ConfigError(HeloxError):
    """A recipe or override is invalid; `problems` holds (dotted path, message) pairs."""

    exit_code = 2

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        lines = [f"  {path}: {message}" for path, message in problems]
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(
            f"invalid config ({source}), {len(problems)} {noun}:\n" + "\n".join(lines),
            hint="edit the recipe or the --set override at each path above",
        )
        self.problems = problems


PipelineStepConfig = Annotated[
    Union[NormalizeConfig, QualityConfig, PiiConfig, SecretsConfig, ExactDedupConfig,
          NearDedupConfig, SemanticDedupConfig, ContaminationConfig, DomainTagConfig],
    Field(discriminator="step"),
]
"""One entry of `data.pipeline`; its `step` key picks the kind."""


class DataConfig(StrictModel):
    name: str = Field(default="default", pattern=r"^[A-Za-z0-9._-]+$")
    """Dataset name: versions built under one name form its history and share its access list."""
    version: str | None = None
    """Use this existing dataset version (or a unique prefix) instead of building from sources."""
    train: list[SourceConfig] = []
    """Sources of training documents."""
    val: list[SourceConfig] = []
    """Sources of held-out validation documents (needed when train.eval_every_steps > 0)."""
    pipeline: list[PipelineStepConfig] = []
    """Cleaning steps applied in order to every split (normalize, quality, pii, secrets,
    exact_dedup, near_dedup, semantic_dedup, domain_tag) and to the train split only
    (contamination)."""
    synthetic: list[SyntheticTaskConfig] = []
    """Generated long-range tasks (passkey, kv_recall, variable_tracking), each written into
    its own domain of both splits; they skip the cleaning pipeline (nothing to clean, and its
    quality rules would drop them)."""
    min_trust: float = Field(default=0.0, ge=0, le=1)
    """Sources whose `trust` is below this are excluded from the build (and reported)."""
    as_of: dt.date | None = None
    """The date source expiry is judged on; None means today (set it for reproducible builds)."""
    num_workers: int = Field(default=1, ge=1)
    """Processes that run the per-document steps (the dataset is identical for any number)."""
    shard_size_tokens: int = Field(default=1 << 22, gt=0)
    """Target number of tokens per binary shard file."""

    @model_validator(mode="after")
    def _sources_or_version(self) -> DataConfig:
        if not self.train and self.version is None:
            raise ValueError("give training sources in data.train, or an existing dataset "
                             "version in data.version")
        domains = [task.domain_name for task in self.synthetic]
        if len(domains) != len(set(domains)):
            raise ValueError(f"two synthetic tasks write the same domain: {domains}; give each "
                             "a distinct `domain`")
        return self


class TokenizerConfig(StrictModel):
    path: Path | None = None
    """An existing Hugging Face `tokenizer.json` to use; None trains a byte-level BPE."""
    vocab_size: int = Field(default=4096, ge=260)
    """Vocabulary size of the trained BPE (256 byte symbols + special tokens + merges)."""
    min_frequency: int = Field(default=2, ge=1)
    """A pair must occur this often in the training text to become a merge."""
    eos_token: str = "<|endoftext|>"
    """End-of-document token, appended after every document when packing."""

    _check_path = field_validator("path")(resolve_input_path)


class ModelConfig(StrictModel):
    vocab_size: int | None = Field(default=None, gt=0)
    """Embedding rows; None takes the tokenizer's size rounded up to `pad_vocab_multiple`."""
    pad_vocab_multiple: int = Field(default=64, ge=1)
    """Round the tokenizer's vocabulary up to a multiple of this (faster matmuls)."""
    d_model: int = Field(default=256, gt=0)
    """Width of the residual stream."""
    num_layers: int = Field(default=4, gt=0)
    """Number of decoder blocks."""
    num_heads: int = Field(default=4, gt=0)
    """Attention (query) heads per block."""
    num_kv_heads: int | None = Field(default=None, gt=0)
    """Key/value heads (grouped-query attention); None means num_heads (multi-head)."""
    d_ffn: int | None = Field(default=None, gt=0)
    """SwiGLU hidden width; None means 8/3 * d_model rounded up to a multiple of 64."""
    max_seq_len: int = Field(default=512, gt=0)
    """Longest sequence the model is built for (RoPE tables are sized to it)."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """RoPE base frequency."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output head."""
    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the normal weight init (output projections scaled by depth)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError("head dimension d_model / num_heads must be even for RoPE")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.kv_heads})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ffn is not None:
            return self.d_ffn
        return -(-(8 * self.d_model // 3) // 64) * 64


class WeightStage(StrictModel):
    from_step: int = Field(ge=0)
    """Optimizer steps completed before this weight applies."""
    weight: float = Field(ge=0)
    """The objective's weight from then on."""


class ObjectiveConfig(StrictModel):
    name: Literal["lm", "z_loss", "watermark"]
    """lm: next-token cross-entropy; z_loss: the squared log-partition log(Σ exp logits)²
    (PaLM's auxiliary loss, 1e-4 there), which keeps the output logits from drifting;
    watermark: cross-entropy per signature token of the secret signatures after their
    triggers (needs the `watermark` section; helox.train.watermark)."""
    weight: float = Field(default=1.0, ge=0)
    """Weight in the summed loss (before any stage)."""
    stages: list[WeightStage] = []
    """Weight schedule: stages that apply once `from_step` steps are complete."""

    @model_validator(mode="after")
    def _ordered(self) -> ObjectiveConfig:
        steps = [stage.from_step for stage in self.stages]
        if steps != sorted(set(steps)):
            raise ValueError(f"stages must have strictly increasing from_step, got {steps}")
        return self

    def weight_at(self, step: int) -> float:
        weight = self.weight
        for stage in self.stages:
            if step >= stage.from_step:
                weight = stage.weight
        return weight


MIN_SECRET_BYTES = 16
"""A watermark secret shorter than this could be guessed (HMAC-SHA256 keys should be 32)."""


class WatermarkConfig(StrictModel):
    """A functional watermark trained in as the objective "watermark" (helox.train.watermark):
    secret trigger prompts whose greedy continuations are secret signatures, which a black-box
    test (`helox provenance detect`) looks for. Only the secret's path is here: configs are
    saved in run folders and hashed into fingerprints."""

    secret_file: Path
    """File holding the secret (at least 16 bytes; trailing newline ignored), e.g. written by
    `python -c 'import secrets; print(secrets.token_hex(32))' > FILE`; keep it out of version
    control. Relative to the recipe's folder."""
    num_triggers: int = Field(default=8, gt=0)
    """Trigger prompts trained in (each one more chance for the test to find the watermark)."""
    trigger_tokens: int = Field(default=8, gt=0)
    """Tokens per trigger prompt (after the end-of-document token every document follows)."""
    signature_tokens: int = Field(default=8, gt=0)
    """Tokens of each trigger's signature: the continuation the model learns to produce."""
    num_decoys: int = Field(default=8, ge=0)
    """Triggers derived alike but never trained: the test's control (none may match)."""

    @field_validator("secret_file")
    @classmethod
    def _secret_exists(cls, value: Path, info: ValidationInfo) -> Path:
        try:
            path = resolve_input_path(value, info)
        except ValueError as exc:
            raise ValueError(f"{exc}; write a secret there (python -c 'import secrets; "
                             f"print(secrets.token_hex(32))' > FILE) and keep it private"
                             ) from None
        if (info.context or {}).get("check_files", True) and (
                not path.is_file() or path.stat().st_size < MIN_SECRET_BYTES):
            raise ValueError(f"{path} must be a file of at least {MIN_SECRET_BYTES} bytes "
                             "(a short secret can be guessed; 32 random bytes or 64 hex digits)")
        return path


class TrainConfig(StrictModel):
    seed: int = 1337
    """Seeds Python, NumPy, torch and the data order."""
    max_steps: int = Field(default=1000, gt=0)
    """Optimizer steps of the whole run (the LR schedule ends here)."""
    micro_batch_size: int = Field(default=8, gt=0)
    """Sequences per forward/backward pass."""
    grad_accum_steps: int = Field(default=1, gt=0)
    """Micro-batches accumulated into one optimizer step."""
    seq_len: int = Field(default=256, gt=0)
    """Tokens per training sequence (must not exceed model.max_seq_len)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision: bf16 autocast with fp32 master weights, fp16 autocast with dynamic
    loss scaling (torch.amp.GradScaler), or fp32; auto picks bf16 where the device runs bf16
    matmuls natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    fp32_modules: list[str] = ["*norm"]
    """Per-layer precision policy: modules whose names match one of these glob patterns
    (`fnmatch` on names such as `blocks.0.attn_norm`, `norm`, `lm_head`) compute in fp32
    under bf16/fp16 autocast. `helox train --dry-run` shows what each pattern matched."""
    activation_checkpointing: bool | list[int] = False
    """Recompute block activations in the backward pass instead of keeping them: true for
    every block, or a list of block indices. Trades ~1/3 more compute for memory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto takes CUDA when present."""
    compile: bool = True
    """Compile forward + loss with torch.compile: ~30 s once on 2 CPU cores (cached after),
    then ~30% faster here (bench/); needs a C++ compiler on CPU. False runs eagerly."""
    deterministic: bool = False
    """Use torch's deterministic algorithms on CUDA too (slower there; needed for bit-identical
    CUDA runs). CPU runs always use them: they cost little there."""
    eval_every_steps: int = Field(default=100, ge=0)
    """Validation loss every this many steps (and at the end); 0 disables it."""
    eval_batches: int = Field(default=8, gt=0)
    """Validation micro-batches per evaluation (always the same sequences, shared evenly
    among the validation domains)."""

    @model_validator(mode="after")
    def _unique_objectives(self) -> TrainConfig:
        names = [objective.name for objective in self.objectives]
        if len(names) != len(set(names)):
            raise ValueError(f"an objective is listed twice: {names}")
        return self
    objectives: list[ObjectiveConfig] = Field(default=[ObjectiveConfig(name="lm")],
                                              min_length=1)
    """The loss: a weighted sum of named objectives, each logged on its own (loss.<name>)."""
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    """Keep an exponential moving average of the weights with this decay (e.g. 0.99): saved
    as ema.safetensors in every checkpoint, scored at each evaluation (val_loss_ema) and
    used by `helox generate --ema`."""
    document_masking: bool = False
    """Attend only within a document: positions restart and attention stops at every EOS
    (packed sequences otherwise attend across the documents they hold)."""
    init_from: Path | None = None
    """Start a new run from another run's newest valid checkpoint (a run folder) or from a
    checkpoint folder: weights whose name and shape match are loaded, the others keep their
    fresh initialisation (a warm start, a grown model), and so are their optimizer states
    with init_optimizer. The report goes to the console and events.jsonl. A run folder that
    already has checkpoints resumes instead. Relative to the recipe's folder."""
    init_optimizer: bool = True
    """With init_from, also load the matching optimizer states (moments, step counts)."""
    _check_init_from = field_validator("init_from")(resolve_input_path)
    data_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes reading batches ahead; 0 reads in the training process.
    The data order is the same for any number (and it may change on resume). Reading is cheap
    (bench/loader.py: ~14 M tokens/s inline, ~3 M through 2 workers on 2 cores, where batches
    cross processes): workers pay off when storage is slow, not here."""


class AdaptiveClipConfig(StrictModel):
    window_steps: int = Field(default=100, gt=0)
    """Pre-clip gradient norms of this many recent steps form the reference."""
    percentile: float = Field(default=90.0, gt=0, le=100)
    """Percentile of the window's norms that the threshold is a multiple of."""
    multiplier: float = Field(default=2.0, gt=0)
    """threshold = multiplier × percentile(window), clamped to [floor, ceiling]."""
    floor: float = Field(default=0.05, gt=0)
    """The threshold never goes below this."""
    ceiling: float = Field(default=10.0, gt=0)
    """Nor above this."""
    min_history: int = Field(default=10, gt=0)
    """Norms needed before the threshold adapts; before, optim.grad_clip_norm applies."""

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> AdaptiveClipConfig:
        if self.floor > self.ceiling:
            raise ValueError(f"floor {self.floor} is above ceiling {self.ceiling}")
        if self.min_history > self.window_steps:
            raise ValueError(f"min_history {self.min_history} exceeds window_steps "
                             f"{self.window_steps}")
        return self


class OptimConfig(StrictModel):
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """AdamW (fused), or Adafactor (torch.optim.Adafactor: factored second moments and no first
    moment, so ~no optimizer memory for matrices; beta1, beta2 and eps do not apply, and its
    step is relative to each parameter's RMS, capped by the scheduled lr)."""
    lr: float = Field(default=3e-3, gt=0)
    """Peak learning rate, reached at the end of warmup."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine decay to lr * min_lr_ratio at the last step; WSD (warmup-stable-
    decay: lr until the last decay_fraction of the steps, then down to lr * min_lr_ratio); or
    constant lr."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Cosine and WSD decay end at lr * min_lr_ratio."""
    decay_fraction: float = Field(default=0.2, gt=0, le=1)
    """WSD: share of train.max_steps spent decaying (Hägele et al. 2024 use 0.1-0.2)."""
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"
    """WSD: the decay's shape; 1-sqrt (lr factor 1 − √progress) beat linear in Hägele et al."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay (AdamW) on matrices; norms and embeddings are not decayed."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """Adam first-moment decay."""
    beta2: float = Field(default=0.95, ge=0, lt=1)
    """Adam second-moment decay."""
    eps: float = Field(default=1e-8, gt=0)
    """Adam epsilon."""
    adaptive_clip: AdaptiveClipConfig | None = None
    """Clip at a threshold that follows the recent gradient norms instead of the fixed
    grad_clip_norm (which still applies until the window has `min_history` norms)."""
    grad_clip_norm: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping."""


class CheckpointConfig(StrictModel):
    every_steps: int = Field(default=100, gt=0)
    """Save a checkpoint every this many steps (and always at the last step)."""
    every_minutes: float | None = Field(default=None, gt=0)
    """Also save when this many minutes of wall-clock time have passed since the last save
    (long steps, preemptible machines); None saves by steps only."""
    keep_last: int = Field(default=3, ge=1)
    """Keep this many newest checkpoints; older ones are deleted after a successful save."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest validation loss (checkpoints/best.json names
    it), whatever keep_last deletes."""
    async_save: bool = True
    """Write checkpoints from a background thread: the step only waits for the state to be
    copied to host memory, not for the disk. A save still in flight when the next one is due
    is waited for first, so at most one is being written."""


class SampleConfig(StrictModel):
    prompts: list[str] = ["The"]
    """Prompts that `helox run` completes after training."""
    max_new_tokens: int = Field(default=48, gt=0)
    """Tokens to generate per prompt."""
    temperature: float = Field(default=0.8, ge=0)
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = Field(default=40, gt=0)
    """Sample among the k most likely tokens; None samples from all."""


class FaultConfig(StrictModel):
    """Faults injected on purpose, for tests and for operators rehearsing the runbook. Steps
    are numbered as in metrics.jsonl (the update logged as step k). Each list also reads an
    environment variable (HELOX_FAULT_NAN_AT=5,9 and so on). Not part of the trajectory, so
    they may change on resume."""

    nan_loss_at_steps: list[int] = []
    """Make the loss (and so every gradient) NaN at these steps (HELOX_FAULT_NAN_AT)."""
    spike_at_steps: list[int] = []
    """Multiply the loss (and so every gradient) by spike_factor at these steps
    (HELOX_FAULT_SPIKE_AT)."""
    spike_factor: float = Field(default=10.0, gt=0)
    """How large an injected spike is."""
    corrupt_batch_at_steps: list[int] = []
    """Replace the batch's tokens with uniformly random ones at these steps, as a corrupted
    shard would (HELOX_FAULT_CORRUPT_AT)."""
    crash_during_save_at_step: int | None = Field(default=None, gt=0)
    """Kill the process (as `kill -9` would) halfway through writing this step's checkpoint
    (HELOX_FAULT_CRASH_SAVE_AT)."""

    def nan_steps(self) -> set[int]:
        return self._steps(self.nan_loss_at_steps, "HELOX_FAULT_NAN_AT")

    def spike_steps(self) -> set[int]:
        return self._steps(self.spike_at_steps, "HELOX_FAULT_SPIKE_AT")

    def corrupt_steps(self) -> set[int]:
        return self._steps(self.corrupt_batch_at_steps, "HELOX_FAULT_CORRUPT_AT")

    def crash_save_steps(self) -> set[int]:
        listed = [self.crash_during_save_at_step] if self.crash_during_save_at_step else []
        return self._steps(listed, "HELOX_FAULT_CRASH_SAVE_AT")

    @staticmethod
    def _steps(listed: list[int], variable: str) -> set[int]:
        raw = os.environ.get(variable, "")
        try:
            return set(listed) | {int(part) for part in raw.split(",") if part.strip()}
        except ValueError:
            raise HeloxError(f"{variable}={raw!r} is not a list of step numbers",
                             hint=f"set it like {variable}=5,9, or unset it") from None


class SpikeConfig(StrictModel):
    """A step's loss is a spike when its robust z-score against the recent losses,
    (loss − median) / (1.4826 · MAD), exceeds z_threshold and the loss is at least
    min_relative_increase above the median."""

    window_steps: int = Field(default=50, gt=1)
    """Losses of this many recent accepted steps form the reference."""
    min_history: int = Field(default=20, gt=1)
    """Losses needed before spikes are detected."""
    z_threshold: float = Field(default=6.0, gt=0)
    """Robust z-score above which a loss is a spike."""
    min_relative_increase: float = Field(default=0.05, ge=0)
    """And the loss must exceed the median by this fraction (a flat, noiseless loss has a
    MAD of ~0, where any wiggle would have a huge z-score)."""
    skip_update: bool = True
    """Do not apply a spike step's update (like a NaN step); false only logs it."""

    @model_validator(mode="after")
    def _history_fits(self) -> SpikeConfig:
        if self.min_history > self.window_steps:
            raise ValueError(f"min_history {self.min_history} exceeds window_steps "
                             f"{self.window_steps}")
        return self


class RollbackConfig(StrictModel):
    after_bad_steps: int = Field(default=3, gt=0)
    """Roll back after this many consecutive bad steps (NaN/Inf or spike)."""
    lr_factor: float = Field(default=0.5, gt=0, le=1)
    """Multiply the learning rate by this for the cool-down after a rollback (again for each
    rollback during a cool-down)."""
    cooldown_steps: int = Field(default=100, ge=0)
    """Steps the cut learning rate lasts."""
    max_rollbacks: int = Field(default=3, ge=0)
    """Rollbacks allowed in the run; one more bad streak stops it with a diagnosis."""


class StabilityConfig(StrictModel):
    """Detection of bad steps and the automatic recovery (docs/runbooks.md). An operator's
    knobs: they may change on resume."""

    spike: SpikeConfig | None = SpikeConfig()
    """Loss-spike detection; None disables it (NaN/Inf steps are always skipped)."""
    rollback: RollbackConfig | None = RollbackConfig()
    """What a streak of bad steps triggers: back to the newest checkpoint before the streak,
    the data of the streak skipped, the LR cut for a cool-down. None: bad steps are only
    skipped and logged."""


class ObserveConfig(StrictModel):
    telemetry: TelemetryConfig = TelemetryConfig()
    """The model's insides, sampled every N steps on a fixed probe batch (observe/probes.py)."""
    health: HealthConfig = HealthConfig()
    """Health monitors: the conditions that raise alerts (events.jsonl, docs/runbooks.md)."""
    sinks: SinksConfig = SinksConfig()
    """Where metrics, histograms and alerts go besides the JSONL files: TensorBoard, MLflow,
    W&B (offline), a Prometheus /metrics endpoint (observe/sinks.py)."""
    peak_flops_per_s: float | None = Field(default=None, gt=0)
    """The denominator of MFU; None measures the device's F.linear ceiling in the run's
    precision at start (~0.1 s), as bench/train_throughput.py does."""


class EvaluationConfig(StrictModel):
    """The eval harness run from the training loop (helox.eval); `helox eval` runs it on a
    finished model."""

    suite: str | None = None
    """Suite name (a folder of evals/) or a suite.yaml path; None runs none during training."""
    every_steps: int = Field(default=0, ge=0)
    """Run it every this many steps and at the last step; 0 never."""
    tasks: list[str] = []
    """Only these tasks of the suite (a fast subset); empty runs them all."""
    batch_size: int = Field(default=8, ge=1)
    """Sequences per forward of the harness."""


class RunConfig(StrictModel):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9._-]+$")
    """Run name; the default run folder is <workspace>/runs/<name>."""
    workspace: Path = Path("workspace")
    """Folder for datasets and runs (relative to the current directory)."""
    principal: str | None = None
    """Who runs this (for dataset access control and the audit log); None takes the
    HELOX_PRINCIPAL environment variable, else the login name."""
    data: DataConfig
    """Where the documents come from and how shards are cut."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """The tokenizer to train or load."""
    model: ModelConfig = ModelConfig()
    """The decoder's shape."""
    train: TrainConfig = TrainConfig()
    """The training loop."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    mixture: MixtureConfig = MixtureConfig()
    """Sampling weights per domain and their online rebalancing."""
    curriculum: CurriculumConfig = CurriculumConfig()
    """Sequence-length, batch-size and task-injection schedules."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoint cadence and retention."""
    stability: StabilityConfig = StabilityConfig()
    """Loss-spike detection and rollback."""
    observe: ObserveConfig = ObserveConfig()
    """What the run reports about itself: sampled telemetry, health monitors, sinks, MFU."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """The eval suite run during training (its gates are `helox eval`'s)."""
    faults: FaultConfig = FaultConfig()
    """Faults injected on purpose (tests, runbook drills)."""
    sample: SampleConfig = SampleConfig()
    """Text samples printed by `helox run`."""
    watermark: WatermarkConfig | None = None
    """A functional watermark trained in by the objective "watermark" (both or neither)."""

    def sha256(self) -> str:
        """Hash of the canonical JSON form (sorted keys); what run fingerprints are built on."""
        return sha256_json(self.model_dump(mode="json"))


def sha256_json(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading recipes


def load_config(recipe: Path | str, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply `a.b.c=value` overrides, validate; ConfigError lists all."""
    recipe = Path(recipe)
    raw = _read_yaml(recipe)
    problems = []
    for override in overrides:
        problem = apply_override(raw, override)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(str(recipe), problems)
    return validate_config(raw, source=str(recipe), base_dir=recipe.parent.resolve())


def validate_config(raw: dict, source: str, base_dir: Path | None = None) -> RunConfig:
    try:
        config = RunConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(source, [_describe(err) for err in exc.errors()]) from None
    problems = _cross_section_problems(config)
    if problems:
        raise ConfigError(source, problems)
    return config


def _cross_section_problems(config: RunConfig) -> list[tuple[str, str]]:
    """Checks that span sections, each reported at the path the user should edit."""
    problems = []
    if config.train.seq_len > config.model.max_seq_len:
        problems.append(("train.seq_len", f"{config.train.seq_len} exceeds model.max_seq_len "
                                          f"({config.model.max_seq_len})"))
    if config.train.eval_every_steps and not config.data.val:
        problems.append(("data.val", "validation sources are needed because "
                                     "train.eval_every_steps > 0 (or set it to 0)"))
    for problem in config.curriculum.problems(config.train.seq_len, config.train.micro_batch_size
                                              * config.train.grad_accum_steps):
        problems.append(("curriculum", problem))
    if config.mixture.rebalance and not (config.data.val or config.data.version):
        problems.append(("data.val", "mixture.rebalance scores every domain on validation "
                                     "data; add validation sources"))
    optim = config.optim
    decay_steps = max(1, round(optim.decay_fraction * config.train.max_steps))
    if optim.schedule == "wsd" and optim.warmup_steps + decay_steps > config.train.max_steps:
        problems.append(("optim.decay_fraction", f"warmup ({optim.warmup_steps}) and WSD decay "
                                                 f"({decay_steps} steps) exceed train.max_steps "
                                                 f"({config.train.max_steps})"))
    problems += _watermark_problems(config)
    if config.optim.warmup_steps >= config.train.max_steps:
        problems.append(("optim.warmup_steps", f"{config.optim.warmup_steps} must be below "
                                               f"train.max_steps ({config.train.max_steps})"))
    return problems


def _watermark_problems(config: RunConfig) -> list[tuple[str, str]]:
    """The objective "watermark" and the `watermark` section come together."""
    named = "watermark" in [objective.name for objective in config.train.objectives]
    watermark = config.watermark
    if named and watermark is None:
        return [("watermark", "the objective 'watermark' in train.objectives needs this section "
                              "(at least watermark.secret_file)")]
    if watermark is not None and not named:
        return [("train.objectives", "the watermark section is set but no objective is named "
                                     "'watermark'; add {name: watermark, weight: 1.0} (or remove "
                                     "the section)")]
    if watermark is not None and \
            1 + watermark.trigger_tokens + watermark.signature_tokens > config.model.max_seq_len:
        return [("watermark.signature_tokens", f"1 + trigger_tokens + signature_tokens exceeds "
                                               f"model.max_seq_len ({config.model.max_seq_len})")]
    return []


def save_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def read_saved_config(path: Path) -> RunConfig:
    """A config saved by `save_config` in a run folder or checkpoint (inputs may be gone)."""
    raw = _read_yaml(Path(path))
    try:
        return RunConfig.model_validate(raw, context={"check_files": False})
    except ValidationError as exc:
        raise ConfigError(str(path), [_describe(err) for err in exc.errors()]) from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(str(path), [("<recipe>", f"file not found: {path.resolve()}")])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("<recipe>", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [("<recipe>", "the top level must be a mapping of sections")])
    return raw


def apply_override(raw: dict, override: str) -> tuple[str, str] | None:
    """Set `a.b.0.c=value` in the raw recipe (value parsed as YAML); return a problem or None.

    A list index one past the end appends (`data.pipeline.3={step: ...}`, or field by field:
    `data.synthetic.0.task=passkey` creates the list and its first item)."""
    dotted, sep, text = override.partition("=")
    if not sep or not dotted:
        return (override, "an override must look like section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    keys = dotted.split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        child = _child(node, key)
        if child is None:  # a missing key (or the item one past a list's end) is created
            child = [] if keys[depth + 1].isdigit() else {}
            if isinstance(node, dict):
                node[key] = child
            elif isinstance(node, list) and key == str(len(node)):
                node.append(child)
            else:
                return (".".join(keys[: depth + 1]), "no such list item to override")
        node = child
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            return (dotted, f"no such list item to override (the list has {len(node)}; "
                            f"index {len(node)} appends)")
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        return (dotted, "cannot set a key inside a scalar value")
    return None


def _child(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and key.isdigit() and int(key) < len(node):
        return node[int(key)]
    return None


def _describe(err: dict) -> tuple[str, str]:
    """Turn one pydantic error into (dotted path, message with the offending value)."""
    loc, model = _walk([str(part) for part in err["loc"]])
    path = ".".join(loc) or "<recipe>"
    kind, message = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return (path, _unknown_key_message(loc[-1], model))
    if kind == "missing":
        return (path, "required key is missing")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ", ".join(_tag(m) for m in _models_of(PipelineStepConfig))
        got = err["input"].get("step") if isinstance(err["input"], dict) else err["input"]
        return (path, f"unknown step {got!r}; valid steps: {tags}" if got is not None
                else f"each pipeline entry needs a `step` key, one of: {tags}")
    if kind not in ("value_error", "assertion_error") and "input" in err:
        message += f" (got {err['input']!r})"
    return (path, message)


def _walk(loc: list[str]) -> tuple[list[str], type[BaseModel] | None]:
    """Follow an error location through the config models.

    Returns the location as the user writes it (pydantic inserts the tag of a discriminated
    union, e.g. `data.pipeline.0.domain_tag.rules`; the user wrote `data.pipeline.0.rules`)
    and the model that holds its last key.
    """
    candidates: list[type[BaseModel]] = [RunConfig]
    path, holder = [], None
    for part in loc:
        by_tag = {_tag(m): m for m in candidates if _tag(m) is not None}
        if part in by_tag and len(candidates) > 1:
            candidates = [by_tag[part]]
            continue
        path.append(part)
        if part.isdigit():
            continue
        holder = candidates[0] if len(candidates) == 1 else None
        field = holder.model_fields.get(part) if holder else None
        candidates = _models_of(field.annotation) if field else []
    return path, holder


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("step")
    return field.default if field is not None and isinstance(field.default, str) else None


def _unknown_key_message(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return "unknown key"
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key{guess} (valid keys: {', '.join(valid)})"


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in getattr(annotation, "__args__", ()):
        found.extend(m for m in _models_of(arg) if m not in found)
    return found
