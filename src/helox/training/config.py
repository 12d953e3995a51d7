"""The train section of a recipe: the loop's shape, precision, objectives, warm start. The
optimizer's, stability's, faults' and watermark's configs live next to their code."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from helox.configbase import StrictModel, resolve_input_path


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
    triggers (needs the `watermark` section; helox.training.watermark)."""
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
    attention: Literal["auto", "sdpa", "math"] = "auto"
    """Attention kernel: PyTorch's fused SDPA, or `math` (batched matmuls and a softmax that
    torch.compile fuses); auto picks by device, precision and seq_len (`pick_attention`: math
    for 16-bit training on a CPU at up to 256 tokens, SDPA elsewhere). run.json and
    --dry-run say which ran."""
    activation_checkpointing: bool | list[int] = False
    """Recompute block activations in the backward pass instead of keeping them: true for
    every block, or a list of block indices. Trades ~1/3 more compute for memory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto takes CUDA when present."""
    compile: bool | Literal["blocks"] = True
    """Compile forward + loss with torch.compile as one graph: ~30 s once on 2 CPU cores
    (cached after), then ~30% faster here (bench/); needs a C++ compiler on CPU. "blocks"
    compiles each transformer block on its own and the loss apart (`compile_blocks`): half
    the cold compile of a 124 M model, steps 0.95-0.99x as fast; evaluation then runs the
    compiled blocks too. False runs eagerly."""
    reuse_memory: bool = True
    """On a CPU (glibc), keep freed tensors' memory in the process for the next step's
    (`helox.allocator`) rather than returning each large one to the OS and faulting it in
    again: compiled bf16 steps of the reference shape ran 1.35x faster here. Resident memory
    stays at the run's peak until it ends. False leaves malloc as it is. It changes nothing the
    run computes, so it may change on resume."""
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
