"""Training throughput (tokens/s) of Helox against `transformers` Llama on one fixed shape, and
what Helox's precision, activation-checkpointing and checkpoint-saving options cost there.

What is measured: full optimizer steps (forward, cross-entropy, backward, clip to norm 1.0, AdamW
lr 3e-4 betas (0.9, 0.95) wd 0.1, zero_grad) of the project's reference shape: 6
layers, d_model 384, 6 heads (MHA), SwiGLU width 1024, context 256, vocab 8192, micro-batch 8
(2,048 tokens per step), untied embeddings, on random token batches (fixed seed, no data loading).

Throughput rows (section "throughput"):
- Helox runs its real step, `helox.training.step.train_step`, on a model set up as
  `helox.training.loop` sets it up (precision policy `train.fp32_modules`, the fp16 loss scaler of
  `make_scaler`) with the optimizer from `build_optimizer`: "helox default" as the config
  defaults set it (the precision `pick_precision("auto")` resolves to, bf16 autocast with fp32
  master weights where the CPU has native bf16, and `train.compile`), then eagerly in that
  precision and in fp32 (the bf16/fp32 ratio line is what autocast buys).
- "helox default, <kernel> attention": the default with the attention kernel that
  `train.attention: auto` does not pick (`pick_attention`: math attention for 16-bit training
  on a CPU, SDPA elsewhere); its ratio line is what the choice buys.
- "helox default, malloc as is": the default without `train.reuse_memory` (helox.allocator:
  every Helox row runs inside `large_tensors_on_heap`, as the training loop runs a CPU run).
  The peers run outside it. Once a block has ended, glibc keeps the thresholds it sets on
  leaving (mmap above 32 MiB, where its own adaptation ends up), so the rows without it fault
  fewer pages than a fresh process would: the ratio line understates what the setting buys a
  new process.
- "helox fp16 eager": fp16 autocast with dynamic loss scaling (`make_scaler("fp16")`, passed to
  `train_step`); its MFU is against the fp16 matmul ceiling, and the steps the scaler skipped
  (scaled gradients overflowed) are counted.
- "… + activation ckpt": the default precision with `model.set_activation_checkpointing(True)`
  (every block recomputed in the backward), eager, or compiled as the default is with
  --compile; its ratio line is against the same variant without. The memory it saves is
  measured apart, once, in an eager forward + loss of the same batch: the bytes of the distinct
  storages autograd saves for the backward (a `saved_tensors_hooks` pack hook), parameters and
  buffers excluded (autocast's 16-bit copies of the weights count: they are kept too).
- `transformers.LlamaForCausalLM` is built from the same shape (`helox.model.hf.to_hf_config`,
  SDPA attention), starts from the same weights and trains in a plain loop, as a user writes it
  (default `torch.optim.AdamW`), in fp32 and under bf16 autocast; with --compile also under
  `torch.compile` at the default precision.
- With --nanogpt PATH (a checkout of github.com/karpathy/nanoGPT, or its model.py; its code
  is not part of Helox): nanoGPT's `GPT` of the same width, depth, heads, context and
  vocabulary, with its own optimizer setup, in fp32 eager (its CPU precision) and under bf16
  autocast + torch.compile (the strongest fair setting of it); its matmul parameters equal
  the shape's, so its MFU uses the same FLOPs per token. "helox default / nanoGPT bf16 +
  compile" has the target ≥ 1.5× (issue 20). "…, Helox's memory reuse" is that peer inside
  Helox's allocator setting too: the ratio against it is what the rest of Helox's step is
  worth.
- --shape 125m measures a 124 M-parameter Llama of GPT-2 small's size (12 layers, d_model 768,
  12 heads, context 1,024, vocabulary 50,304, tied embeddings, micro-batch 4) instead, with
  the compiled rows only; nanoGPT's GPT there is GPT-2 small itself.
- A compiled variant's first step, which compiles, is reported apart and never timed.

The machine is shared and noisy (±10–15%), so the variants are interleaved in one process: each
round runs every variant for its warm-up and timed steps, and a variant's result is its median
tokens/s over the rounds; a ratio line gives the ratio of medians and the range of the
same-round ratios. MFU divides achieved model FLOP/s (6 × matmul parameters + attention, per
token) by the matmul ceiling of the same precision (fp32, bf16 or fp16), measured in every round
as F.linear of one micro-batch's tokens through the shape's widest projection (2048×384 by
(1536×384)ᵀ for the reference shape).

Checkpoint stall (section "checkpoint"): the default training step (precision, compile and
memory reuse as the config defaults) with `helox.checkpoint`: `snapshot` of the model, its
AdamW state (moments exist: warm-up steps come first) and the RNG state, handed to a
`CheckpointWriter` (keep_last 2) in sync and in async mode, alternately, with the same number
of training steps after every save, into a temporary folder. The stall of a save is what the
training thread spends on it: `writer.last_stall_s` (snapshot copy, + the whole write in sync
mode) plus, in async mode, any wait for the background write at the end of its steps (what the
next save would wait for). Each step is timed and classed as overlapping a background write (it
started before the write ended) or not, so the cost of the writer thread competing for the 2
cores shows as the tokens/s of those steps and as the net training time a save costs: stall +
the extra seconds of its overlapped steps over the median clean step.

Telemetry overhead (section "telemetry"): the default training step in alternating blocks of
--telemetry-steps steps (default 50, observe.telemetry's cadence), each step writing its
metrics.jsonl line, without and with everything the loop adds when telemetry and sinks are on:
token counting every step, one probe sample of 4 sequences per block (with its histograms),
every value sent to TensorBoard and Prometheus sinks. The ratio of the blocks' tokens/s is
the overhead; the target is ≥ 0.95×.

Run: .venv/bin/python bench/train_throughput.py [--compile] [--rounds 3] [--steps 20]
[--only throughput|checkpoint|telemetry] [--saves 5] [--steps-between-saves 4]
[--telemetry-steps 50]
(about 16 minutes on 2 cores, of which the checkpoint section about 1 and the telemetry
section about 4; --compile adds the compiled transformers variant and compiles the
activation-checkpointing one).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from helox.allocator import large_tensors_on_heap, reuses_memory
from helox.config import RunConfig
from helox.model.config import ModelConfig
from helox.training.config import TrainConfig
from helox.training.optim import OptimConfig
from helox.data.loader import MicroBatch
from helox.model.hf import to_hf_config, to_hf_state_dict
from helox.model.llama import Llama
from helox.observe.metrics import MetricsLog
from helox.observe.probes import Telemetry, TelemetryConfig
from helox.observe.sinks import SinksConfig, open_sinks
from helox.repro import rng_state, seed_everything, set_rng_state
from helox.testing.tiny import tiny_config
from helox.checkpoint import CheckpointWriter, snapshot
from helox.training.optim import build_optimizer
from helox.training.precision import apply_precision_policy
from helox.training.state import ValueState
from helox.training.step import (StepOutcome, compiled, make_loss_fn, make_scaler,
                                 pick_attention, pick_precision, train_step)

DEVICE = torch.device("cpu")
SHAPES = {
    # PERF.md's reference shape: 16.9 M parameters, micro-batch 8.
    "reference": (ModelConfig(vocab_size=8192, d_model=384, num_layers=6, num_heads=6,
                              num_kv_heads=6, d_ffn=1024, max_seq_len=256,
                              tie_embeddings=False), 8),
    # GPT-2 small's size as a Llama (124 M parameters: its vocabulary padded to 50,304, tied
    # embeddings, SwiGLU 2,048 wide: GPT-2's matmul parameters), micro-batch 4.
    "125m": (ModelConfig(vocab_size=50304, d_model=768, num_layers=12, num_heads=12,
                         num_kv_heads=12, d_ffn=2048, max_seq_len=1024,
                         tie_embeddings=True), 4),
}
SHAPE, BATCH_SIZE = SHAPES["reference"]
OPTIM = OptimConfig(lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip_norm=1.0)
TRAIN = TrainConfig()  # the defaults: compile, precision policy
SEQ_LEN = SHAPE.max_seq_len
TOKENS_PER_STEP = BATCH_SIZE * SEQ_LEN
SEED = 1234
DEFAULT_NAME = "helox default"
AC_SUFFIX = " + activation ckpt"
NO_REUSE_SUFFIX = ", malloc as is"
REUSE_SUFFIX = ", Helox's memory reuse"
# The ceiling matmul: one micro-batch of tokens through the widest projection of the shape.
CEILING_M, CEILING_K, CEILING_N = TOKENS_PER_STEP, SHAPE.d_model, 4 * SHAPE.d_model


def use_shape(name: str) -> None:
    """Measure `SHAPES[name]`: the model, micro-batch and ceiling matmul every function reads."""
    global SHAPE, BATCH_SIZE, SEQ_LEN, TOKENS_PER_STEP, CEILING_M, CEILING_K, CEILING_N
    SHAPE, BATCH_SIZE = SHAPES[name]
    SEQ_LEN = SHAPE.max_seq_len
    TOKENS_PER_STEP = BATCH_SIZE * SEQ_LEN
    CEILING_M, CEILING_K, CEILING_N = TOKENS_PER_STEP, SHAPE.d_model, 4 * SHAPE.d_model

CEILING_REPS = 50
CEILING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SECTIONS = ("throughput", "checkpoint", "telemetry")
SAVE_MODES = ("sync", "async")
RUN_INFO = {"fingerprint": "0" * 64, "resume_key": "0" * 64}  # what snapshot() requires

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs_BT, targets_BT), int64


@dataclass
class Variant:
    """One way of training the shape; `step` runs one optimizer step on a batch and returns
    whether the optimizer stepped (fp16 skips a step whose scaled gradients overflowed)."""

    name: str
    precision: str  # "fp32", "bf16" or "fp16": which matmul ceiling applies
    step: Callable[[Batch], bool]
    compiled: bool = False
    reuse_memory: bool = False
    """Runs inside `helox.allocator.large_tensors_on_heap`, as helox.training.loop runs a CPU
    run's steps (train.reuse_memory)."""
    tokens_per_s: list[float] = field(default_factory=list)  # one per round
    first_step_s: float | None = None  # compiled variants: the step that compiles
    steps_run: int = 0
    skipped_steps: int = 0


@dataclass
class HeloxTrainer:
    """Helox's model and optimizer, and its training step on one micro-batch."""

    model: Llama
    optimizer: torch.optim.Optimizer
    step: Callable[[Batch], StepOutcome]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per variant per round (default 20)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per variant before each round's timed steps (and "
                             "before the first checkpoint)")
    parser.add_argument("--compile", action="store_true",
                        help="add transformers under torch.compile and compile the activation-"
                             "checkpointing variant (Helox's default compiles)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every variant (default: torch's own choice)")
    parser.add_argument("--nanogpt", type=Path, default=None,
                        help="nanoGPT's model.py (or its checkout): adds its GPT as a peer, "
                             "fp32 eager and under bf16 autocast + compile")
    parser.add_argument("--shape", choices=list(SHAPES), default="reference",
                        help="the model measured (default: the reference shape); 125m runs "
                             "the throughput section's compiled rows only")
    parser.add_argument("--only", choices=SECTIONS, default=None,
                        help="run one section (default: both)")
    parser.add_argument("--saves", type=int, default=5,
                        help="checkpoint saves per mode (sync, async), interleaved (default 5)")
    parser.add_argument("--steps-between-saves", type=int, default=4,
                        help="training steps after every save (default 4)")
    parser.add_argument("--telemetry-steps", type=int, default=50,
                        help="steps per block of the telemetry section: one sample per block "
                             "(observe.telemetry's default cadence is 50)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where the checkpoint section writes its temporary folder "
                             "(default: the system's temporary directory)")
    return parser.parse_args()


def random_batches(num_batches: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(num_batches):
        tokens_BT = torch.randint(0, SHAPE.vocab_size, (BATCH_SIZE, SEQ_LEN + 1),
                                  generator=generator)
        batches.append((tokens_BT[:, :-1].contiguous(), tokens_BT[:, 1:].contiguous()))
    return batches


# ---------------------------------------------------------------------------------------------
# The variants


def helox_model(init_state: dict, activation_checkpointing: bool, attention: str) -> Llama:
    """The model as helox.training.loop sets it up: checkpointing, the attention kernel, then
    the precision policy."""
    model = Llama(SHAPE)
    model.load_state_dict(init_state)
    model.set_activation_checkpointing(activation_checkpointing)
    model.set_attention(attention)
    apply_precision_policy(model, TRAIN.fp32_modules, DEVICE.type)
    return model


def helox_trainer(precision: str, init_state: dict, compile_model: bool,
                  activation_checkpointing: bool = False,
                  attention: str | None = None) -> HeloxTrainer:
    """`attention` None: what train.attention resolves to for `precision` (the loop's)."""
    attention = attention or pick_attention(TRAIN.attention, DEVICE, precision, SEQ_LEN)
    model = helox_model(init_state, activation_checkpointing, attention)
    scaler = make_scaler(precision, DEVICE)  # fp16: dynamic loss scaling; None otherwise
    optimizer = build_optimizer(model, OPTIM)
    loss_fn = make_loss_fn(model, DEVICE, precision)
    loss_fn = compiled(loss_fn) if compile_model else loss_fn

    def step(batch: Batch) -> StepOutcome:
        return train_step(loss_fn, model, optimizer, [MicroBatch(*batch)],
                          OPTIM.grad_clip_norm, scaler=scaler)

    return HeloxTrainer(model, optimizer, step)


def helox_variant(name: str, precision: str, init_state: dict, compile_model: bool,
                  activation_checkpointing: bool = False, attention: str | None = None,
                  reuse_memory: bool = TRAIN.reuse_memory) -> Variant:
    trainer = helox_trainer(precision, init_state, compile_model, activation_checkpointing,
                            attention)
    return Variant(name, precision, lambda batch: not trainer.step(batch).skipped,
                   compile_model, reuses_memory(reuse_memory, DEVICE))


def build_hf_model(init_state: dict) -> nn.Module:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(to_hf_config(SHAPE, attn_implementation="sdpa"))
    state = to_hf_state_dict(init_state, SHAPE)
    if SHAPE.tie_embeddings:  # one tensor under both names in transformers' state_dict
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.float().train()


def hf_variant(name: str, precision: str, init_state: dict, compile_model: bool) -> Variant:
    """A plain PyTorch loop around LlamaForCausalLM, with the default AdamW."""
    model = build_hf_model(init_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr,
                                  betas=(OPTIM.beta1, OPTIM.beta2),
                                  weight_decay=OPTIM.weight_decay)
    forward = torch.compile(model) if compile_model else model

    def loss_of(inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        logits_BTV = forward(input_ids=inputs_BT, use_cache=False).logits
        return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())

    return plain_loop_variant(name, precision, model, optimizer, loss_of, compile_model)


def plain_loop_variant(name: str, precision: str, model: nn.Module,
                       optimizer: torch.optim.Optimizer,
                       loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       compile_model: bool) -> Variant:
    """A peer's step as a user writes the loop: forward and loss (under bf16 autocast for a
    bf16 variant), backward, clip to OPTIM.grad_clip_norm, step, zero_grad, the loss read."""
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step(batch: Batch) -> bool:
        with autocast:
            loss = loss_of(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the host sync a training loop has (Helox's step has one too)
        return True

    return Variant(name, precision, step, compile_model)


def load_nanogpt(path: Path):
    """nanoGPT's `model.py` (a file, or the checkout holding it), imported from where it is:
    nanoGPT is not a package and its code is not part of Helox."""
    file = path / "model.py" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"--nanogpt {path}: no model.py there (git clone "
                         f"https://github.com/karpathy/nanoGPT and pass the folder)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt_variant(name: str, module, precision: str, compile_model: bool,
                    reuse_memory: bool = False) -> Variant:
    """nanoGPT's GPT of the same width, depth, heads, context and vocabulary (LayerNorm, GELU
    MLP 4× wide: the same matmul parameters as the SwiGLU 1024, learned positions, tied head,
    bias off and dropout 0 as its train.py defaults), its own `configure_optimizers` (fused
    AdamW where available) and its loop's step: forward with targets, backward, clip, step."""
    torch.manual_seed(SEED)
    config = module.GPTConfig(block_size=SEQ_LEN, vocab_size=SHAPE.vocab_size,
                              n_layer=SHAPE.num_layers, n_head=SHAPE.num_heads,
                              n_embd=SHAPE.d_model, dropout=0.0, bias=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        model = module.GPT(config).train()
        optimizer = model.configure_optimizers(OPTIM.weight_decay, OPTIM.lr,
                                               (OPTIM.beta1, OPTIM.beta2), DEVICE.type)
    forward = torch.compile(model) if compile_model else model
    variant = plain_loop_variant(name, precision, model, optimizer,
                                 lambda inputs_BT, targets_BT: forward(inputs_BT, targets_BT)[1],
                                 compile_model)
    variant.reuse_memory = reuses_memory(reuse_memory, DEVICE)
    return variant


def build_variants(default_precision: str, compile_peers: bool, nanogpt: Path | None = None,
                   shape: str = "reference") -> list[Variant]:
    """Helox's default (config defaults: auto precision, train.compile, train.reuse_memory),
    the default with the other attention kernel and with malloc left as it is, its eager
    variants, fp16 with loss scaling and activation checkpointing against transformers; with
    --compile also transformers compiled at the same precision. The 125m shape keeps the
    compiled rows only (an eager or fp32 step of it takes tens of seconds here)."""
    torch.manual_seed(SEED)
    init_state = Llama(SHAPE).state_dict()  # every variant starts from these weights
    default_eager = f"helox {default_precision} eager"
    # Activation checkpointing is compared with the variant it adds to: eager unless --compile.
    ac_compiled = compile_peers and TRAIN.compile
    ac_base = DEFAULT_NAME if ac_compiled else default_eager
    default_attention = pick_attention(TRAIN.attention, DEVICE, default_precision, SEQ_LEN)
    other_attention = "sdpa" if default_attention == "math" else "math"
    full = shape == "reference"
    variants = [
        helox_variant(DEFAULT_NAME, default_precision, init_state, TRAIN.compile),
        helox_variant(f"{DEFAULT_NAME}, {other_attention} attention", default_precision,
                      init_state, TRAIN.compile, attention=other_attention),
    ]
    if reuses_memory(TRAIN.reuse_memory, DEVICE):
        variants.append(helox_variant(DEFAULT_NAME + NO_REUSE_SUFFIX, default_precision,
                                      init_state, TRAIN.compile, reuse_memory=False))
    if full:
        variants += [
            helox_variant(default_eager, default_precision, init_state, False),
            helox_variant("helox fp32 eager", "fp32", init_state, False),
            helox_variant("helox fp16 eager", "fp16", init_state, False),
            helox_variant(ac_base + AC_SUFFIX, default_precision, init_state, ac_compiled,
                          activation_checkpointing=True),
            hf_variant("transformers fp32", "fp32", init_state, False),
            hf_variant(f"transformers {default_precision}", default_precision, init_state,
                       False),
        ]
    if compile_peers:
        variants.append(hf_variant(f"transformers {default_precision} + compile",
                                   default_precision, init_state, True))
    if nanogpt is not None:
        module = load_nanogpt(nanogpt)
        if full:
            variants.append(nanogpt_variant("nanoGPT fp32", module, "fp32", False))
        variants.append(nanogpt_variant(f"nanoGPT {default_precision} + compile", module,
                                        default_precision, True))
        if reuses_memory(True, DEVICE):
            variants.append(nanogpt_variant(
                f"nanoGPT {default_precision} + compile{REUSE_SUFFIX}", module,
                default_precision, True, reuse_memory=True))
    return variants


# ---------------------------------------------------------------------------------------------
# Measuring throughput


def run_step(variant: Variant, batch: Batch) -> None:
    stepped = variant.step(batch)
    variant.steps_run += 1
    variant.skipped_steps += not stepped


def time_variant(variant: Variant, batches: list[Batch], warmup: int, steps: int) -> float:
    """Warm-up steps, then `steps` timed steps; returns tokens/s of the timed steps."""
    gc.collect()
    with large_tensors_on_heap(variant.reuse_memory):
        return timed_steps(variant, batches, warmup, steps)


def timed_steps(variant: Variant, batches: list[Batch], warmup: int, steps: int) -> float:
    for i in range(warmup):
        started = time.perf_counter()
        run_step(variant, batches[i % len(batches)])
        if variant.compiled and variant.first_step_s is None:
            variant.first_step_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(steps):
        run_step(variant, batches[(warmup + i) % len(batches)])
    return steps * TOKENS_PER_STEP / (time.perf_counter() - started)


def matmul_gflops(dtype: torch.dtype) -> float:
    """GFLOP/s of F.linear at the ceiling shape in `dtype` (bf16: oneDNN, fp32: MKL)."""
    generator = torch.Generator().manual_seed(SEED)
    x_MK = torch.randn(CEILING_M, CEILING_K, generator=generator).to(dtype)
    w_NK = torch.randn(CEILING_N, CEILING_K, generator=generator).to(dtype)
    for _ in range(5):
        F.linear(x_MK, w_NK)
    started = time.perf_counter()
    for _ in range(CEILING_REPS):
        F.linear(x_MK, w_NK)
    elapsed = time.perf_counter() - started
    return 2 * CEILING_M * CEILING_K * CEILING_N * CEILING_REPS / elapsed / 1e9


def run_rounds(variants: list[Variant], args: argparse.Namespace) -> dict[str, list[float]]:
    """Round-robin over the variants; returns the ceilings (GFLOP/s) measured in every round."""
    batches = random_batches(args.warmup + args.steps)
    ceilings: dict[str, list[float]] = {name: [] for name in CEILING_DTYPES}
    for round_index in range(args.rounds):
        for name, dtype in CEILING_DTYPES.items():
            ceilings[name].append(matmul_gflops(dtype))
        for variant in variants:
            variant.tokens_per_s.append(time_variant(variant, batches, args.warmup, args.steps))
            print(f"  round {round_index + 1}/{args.rounds}  {variant.name:<48} "
                  f"{variant.tokens_per_s[-1]:8,.0f} tokens/s", flush=True)
    return ceilings


def saved_for_backward_bytes(precision: str, activation_checkpointing: bool,
                             batch: Batch) -> int:
    """Bytes of the distinct storages autograd saves for the backward in one eager forward +
    loss, parameters and buffers excluded: the activation memory of a step."""
    torch.manual_seed(SEED)
    model = helox_model(Llama(SHAPE).state_dict(), activation_checkpointing,
                        pick_attention(TRAIN.attention, DEVICE, precision, SEQ_LEN)).train()
    state = {t.untyped_storage().data_ptr()
             for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}  # storage address -> bytes; a storage saved twice counts once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    loss_fn = make_loss_fn(model, DEVICE, precision)
    # Every saved tensor stays alive with `sums`, so no counted address is reused meanwhile.
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sums = loss_fn(MicroBatch(*batch))
    del sums
    return sum(saved.values())


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: every nn.Linear weight (lm_head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module) -> int:
    """6 FLOPs per matmul parameter (forward + backward) plus attention scores and values."""
    return 6 * matmul_params(model) + 12 * SHAPE.num_layers * SHAPE.d_model * SEQ_LEN


# ---------------------------------------------------------------------------------------------
# Measuring the checkpoint stall


@dataclass
class SaveCosts:
    """Per save mode: each save's stall and write time, and the seconds of the training steps
    after it, split by whether a background write overlapped them."""

    stall_s: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in SAVE_MODES})
    copy_s: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in SAVE_MODES})
    write_s: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in SAVE_MODES})
    overlapped_steps_s: list[list[float]] = field(default_factory=list)  # per async save
    clean_steps_s: list[float] = field(default_factory=list)  # no write in flight
    checkpoint_bytes: int = 0
    first_step_s: float = 0.0


def save_then_train(trainer: HeloxTrainer, writer: CheckpointWriter, mode: str, step: int,
                    batches: list[Batch], config: RunConfig, costs: SaveCosts) -> None:
    """Save checkpoint `step`, run the steps on `batches`, then wait for the write; record
    what the training thread spent on the save and how long each step took."""
    parts = {"model": trainer.model, "optimizer": trainer.optimizer,
             "rng": ValueState(rng_state, set_rng_state)}  # what the loop registers, in short
    snap = snapshot(step, parts, config.model_dump(mode="json"), RUN_INFO)
    writer.save(snap)
    write_started = time.perf_counter()  # async: the write thread has just been handed it
    stall_s = writer.last_stall_s
    spans = []
    for batch in batches:
        started = time.perf_counter()
        trainer.step(batch)
        spans.append((started, time.perf_counter()))
    waited = time.perf_counter()
    writer.wait()
    stall_s += time.perf_counter() - waited
    write_ended = write_started + writer.last_write_s if mode == "async" else 0.0
    overlapped = [end - start for start, end in spans if start < write_ended]
    costs.clean_steps_s += [end - start for start, end in spans if start >= write_ended]
    if mode == "async":
        costs.overlapped_steps_s.append(overlapped)
    costs.stall_s[mode].append(stall_s)
    costs.copy_s[mode].append(snap.copy_s)
    costs.write_s[mode].append(writer.last_write_s)
    costs.checkpoint_bytes = sum(f.stat().st_size for f in writer.last_written.iterdir())


def measure_save_costs(default_precision: str, args: argparse.Namespace) -> SaveCosts:
    """Sync and async saves of the default training setup, alternately, with
    --steps-between-saves training steps after each."""
    torch.manual_seed(SEED)
    trainer = helox_trainer(default_precision, Llama(SHAPE).state_dict(), TRAIN.compile)
    batches = random_batches(args.warmup + args.steps_between_saves)
    costs = SaveCosts()
    started = time.perf_counter()
    trainer.step(batches[0])  # compiles with train.compile; the AdamW moments exist after it
    costs.first_step_s = time.perf_counter() - started
    for batch in batches[1:args.warmup]:
        trainer.step(batch)
    step = args.warmup
    with tempfile.TemporaryDirectory(prefix="helox-bench-checkpoint-",
                                     dir=args.checkpoint_dir) as tmp:
        config = tiny_config(Path(tmp) / "workspace").model_copy(update={"model": SHAPE})
        writers = {mode: CheckpointWriter(Path(tmp) / mode, keep_last=2, keep_best=False,
                                          async_save=mode == "async") for mode in SAVE_MODES}
        try:
            for save_index in range(args.saves):
                for mode, writer in writers.items():
                    gc.collect()
                    save_then_train(trainer, writer, mode, step, batches[args.warmup:], config,
                                    costs)
                    step += args.steps_between_saves
                print(f"  save {save_index + 1}/{args.saves}  stall sync "
                      f"{costs.stall_s['sync'][-1]:.3f} s, "
                      f"async {costs.stall_s['async'][-1]:.3f} s", flush=True)
        finally:
            for writer in writers.values():
                writer.close()
    return costs


# ---------------------------------------------------------------------------------------------
# Measuring the cost of full telemetry


def telemetry_block(trainer: HeloxTrainer, batches: list[Batch], telemetry: Telemetry | None,
                    sinks, probe: MicroBatch, precision: str, log: MetricsLog) -> float:
    """Train on `batches` as the loop does, a metrics.jsonl line per step; with `telemetry`,
    also count every batch's tokens,
    send every step's scalars to the sinks, and take one sample (with its histograms) at the
    end, as sampling every len(batches) steps does. Returns the block's tokens/s."""
    started = time.perf_counter()
    for index, batch in enumerate(batches, start=1):
        outcome = trainer.step(batch)
        log.write({"step": index, "loss": outcome.loss, "grad_norm": outcome.grad_norm})
        if telemetry is None:
            continue
        telemetry.count_tokens(batch[0])
        sinks.scalars(index, {"loss": outcome.loss, "grad_norm": outcome.grad_norm})
    if telemetry is not None:
        dtype = CEILING_DTYPES[precision]
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=precision != "fp32"):
            sample = telemetry.sample(len(batches), trainer.model, probe)
        sinks.scalars(len(batches), sample.scalars)
        for name, histogram in sample.histograms.items():
            sinks.histogram(len(batches), name, histogram.bin_edges, histogram.counts)
    return len(batches) * TOKENS_PER_STEP / (time.perf_counter() - started)


def measure_telemetry_cost(default_precision: str, args: argparse.Namespace,
                           ) -> dict[str, list[float]]:
    """The default training step without telemetry (metrics.jsonl only) and with all of it
    (token counting every step, a probe sample every --telemetry-steps steps, TensorBoard and
    Prometheus sinks), in alternating blocks; tokens/s per block."""
    torch.manual_seed(SEED)
    trainer = helox_trainer(default_precision, Llama(SHAPE).state_dict(), TRAIN.compile)
    batches = random_batches(args.telemetry_steps)
    counts_V = torch.bincount(torch.cat([b[0].flatten() for b in batches]),
                              minlength=SHAPE.vocab_size).numpy()
    telemetry = Telemetry(TelemetryConfig(), SHAPE, counts_V)
    probe = MicroBatch(*random_batches(1)[0])
    probe = MicroBatch(probe.inputs[:4], probe.targets[:4])
    for batch in batches[:args.warmup]:
        trainer.step(batch)  # compiles with train.compile
    results: dict[str, list[float]] = {"metrics.jsonl only": [], "full telemetry": []}
    with tempfile.TemporaryDirectory(prefix="helox-bench-telemetry-") as tmp:
        sinks = open_sinks(SinksConfig(tensorboard=True, prometheus={"port": 0}), Path(tmp),
                           RUN_INFO)
        log = MetricsLog(Path(tmp) / "metrics.jsonl")
        try:
            for round_index in range(args.rounds):
                for name in results:
                    full = name == "full telemetry"
                    results[name].append(telemetry_block(
                        trainer, batches, telemetry if full else None, sinks, probe,
                        default_precision, log))
                print(f"  round {round_index + 1}/{args.rounds}  "
                      + ", ".join(f"{n} {v[-1]:,.0f} tokens/s" for n, v in results.items()),
                      flush=True)
        finally:
            sinks.close()
            log.close()
    return results


def print_telemetry_cost(results: dict[str, list[float]], args: argparse.Namespace) -> None:
    plain, full = results["metrics.jsonl only"], results["full telemetry"]
    ratios = [f / p for f, p in zip(full, plain)]
    print(f"\ntelemetry overhead (default step; blocks of {args.telemetry_steps} steps, one "
          f"probe sample of 4×{SEQ_LEN} tokens per block, token counting every step, "
          f"TensorBoard + Prometheus sinks; {args.rounds} rounds alternating)")
    print(f"  metrics.jsonl only  {statistics.median(plain):,.0f} tokens/s ({spread(plain)})")
    print(f"  full telemetry      {statistics.median(full):,.0f} tokens/s ({spread(full)})")
    print(f"  full / plain: {statistics.median(ratios):.3f}× (per round "
          f"{min(ratios):.3f}–{max(ratios):.3f}; target ≥ 0.95×: "
          f"{'ok' if statistics.median(ratios) >= 0.95 else 'BELOW TARGET'})")


# ---------------------------------------------------------------------------------------------
# Reporting


def describe_models(default_precision: str) -> int:
    """Print both models' parameter counts (they must match); return FLOPs per token."""
    helox, hf = Llama(SHAPE), build_hf_model(Llama(SHAPE).state_dict())
    counts = {name: (sum(p.numel() for p in m.parameters()), matmul_params(m))
              for name, m in (("helox", helox), ("transformers", hf))}
    for name, (total, matmul) in counts.items():
        print(f"{name:<13} parameters {total:,} (matmul parameters {matmul:,})")
    if counts["helox"] != counts["transformers"]:
        raise SystemExit("the two models differ in shape; fix to_hf_config or SHAPE")
    flops = flops_per_token(hf)
    print(f"FLOPs per token {flops / 1e6:.1f} M (6 × matmul params + 12 × layers × d_model × "
          f"context); {TOKENS_PER_STEP:,} tokens per step; "
          f"helox default precision on this CPU: {default_precision}")
    return flops


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{min(values):{fmt}}–{max(values):{fmt}}"


def print_table(variants: list[Variant], ceilings: dict[str, float], flops: int) -> None:
    print(f"\n{'variant':<48} {'precision':<9} {'tokens/s':>9} {'min–max over rounds':>20} "
          f"{'MFU':>6}  ceiling")
    for v in variants:
        median = statistics.median(v.tokens_per_s)
        mfu = median * flops / (ceilings[v.precision] * 1e9)
        print(f"{v.name:<48} {v.precision:<9} {median:9,.0f} {spread(v.tokens_per_s):>20} "
              f"{mfu:6.1%}  {v.precision} {ceilings[v.precision]:,.0f} GFLOP/s")


def print_ceilings(samples: dict[str, list[float]]) -> None:
    measured = ", ".join(f"{name} {statistics.median(values):,.0f} GFLOP/s ({spread(values)})"
                         for name, values in samples.items())
    print(f"matmul ceilings (F.linear {CEILING_M}×{CEILING_K} by {CEILING_N}×{CEILING_K}, median "
          f"of rounds): {measured}")


def print_ratios(variants: list[Variant], default_precision: str) -> None:
    """Ratios of medians, with the range of the per-round (paired, same-round) ratios; a
    target, where there is one, is what the row must reach."""
    by_name = {v.name: v for v in variants}
    default_eager = f"helox {default_precision} eager"
    comparisons: list[tuple[str, str, float | None]] = [
        (DEFAULT_NAME, "transformers fp32", 2.0),
        ("helox fp32 eager", "transformers fp32", 1.0),
        (default_eager, f"transformers {default_precision}", 1.0),
        (DEFAULT_NAME, f"transformers {default_precision} + compile", 1.0),
        (DEFAULT_NAME, "nanoGPT fp32", None),
        (DEFAULT_NAME, f"nanoGPT {default_precision} + compile", 1.5),
        # the peer given Helox's allocator setting too: what the rest of the step is worth
        (DEFAULT_NAME, f"nanoGPT {default_precision} + compile{REUSE_SUFFIX}", None),
        (f"nanoGPT {default_precision} + compile{REUSE_SUFFIX}",
         f"nanoGPT {default_precision} + compile", None),
        (DEFAULT_NAME, DEFAULT_NAME + NO_REUSE_SUFFIX, None),
        # the attention kernel train.attention picks, against the other one
        *[(DEFAULT_NAME, v.name, None) for v in variants
          if v.name.startswith(f"{DEFAULT_NAME}, ") and v.name.endswith(" attention")],
        # auto picks this precision because it is faster than fp32 here
        (default_eager, "helox fp32 eager", 1.0),
        ("helox fp16 eager", "helox fp32 eager", None),
        ("helox fp16 eager", default_eager, None),
        *[(v.name, v.name.removesuffix(AC_SUFFIX), None)
          for v in variants if v.name.endswith(AC_SUFFIX)],
    ]
    print()
    for numerator, denominator, target in comparisons:
        if numerator not in by_name or denominator not in by_name or numerator == denominator:
            continue
        a, b = by_name[numerator].tokens_per_s, by_name[denominator].tokens_per_s
        ratio = statistics.median(a) / statistics.median(b)
        paired = [x / y for x, y in zip(a, b)]
        verdict = ("" if target is None else
                   f"; target ≥ {target:g}×: {'ok' if ratio >= target else 'BELOW TARGET'}")
        print(f"{numerator} / {denominator}: {ratio:.2f}× (per round "
              f"{spread(paired, '.2f')}{verdict})")
    for v in variants:
        if v.precision == "fp16" or v.skipped_steps:
            print(f"{v.name}: {v.skipped_steps} of {v.steps_run} steps skipped by the loss "
                  f"scaler (scaled gradients overflowed; warm-up steps included)")
        if v.first_step_s is not None:
            print(f"{v.name}: cold compile time was {v.first_step_s:.1f} s "
                  f"(its first step, not timed; the inductor cache was empty at the start of the "
                  f"run unless TORCHINDUCTOR_CACHE_DIR was set)")


def print_activation_memory(default_precision: str) -> None:
    batch = random_batches(1)[0]
    without, with_ac = (saved_for_backward_bytes(default_precision, ac, batch)
                        for ac in (False, True))
    mib = 2**20
    print(f"\nactivation memory (bytes saved for the backward in one eager {default_precision} "
          f"forward + loss, {BATCH_SIZE}×{SEQ_LEN} tokens, distinct storages, parameters and "
          f"buffers excluded): {without / mib:,.1f} MiB without activation checkpointing, "
          f"{with_ac / mib:,.1f} MiB with it on every block: {(without - with_ac) / mib:,.1f} "
          f"MiB saved ({1 - with_ac / without:.0%})")


def print_save_costs(costs: SaveCosts, args: argparse.Namespace) -> None:
    print(f"\ncheckpoint stall per save (reference model + AdamW state, "
          f"{costs.checkpoint_bytes / 1e6:,.0f} MB on disk; {args.saves} saves per mode, sync "
          f"and async alternating, {args.steps_between_saves} training steps after each; into "
          f"{args.checkpoint_dir or tempfile.gettempdir()}; first training step "
          f"{costs.first_step_s:.1f} s, not counted)")
    for mode in SAVE_MODES:
        where = "in the training thread" if mode == "sync" else "in the background"
        print(f"  {mode:<5}  stall {statistics.median(costs.stall_s[mode]):6.3f} s median "
              f"({spread(costs.stall_s[mode], '.3f')}); of it snapshot copy "
              f"{statistics.median(costs.copy_s[mode]):.3f} s; write {where} "
              f"{statistics.median(costs.write_s[mode]):.3f} s median "
              f"({spread(costs.write_s[mode], '.3f')})")
    paired = [a / s for a, s in zip(costs.stall_s["async"], costs.stall_s["sync"])]
    ratio = statistics.median(costs.stall_s["async"]) / statistics.median(costs.stall_s["sync"])
    print(f"  async / sync stall: {ratio:.2f}× (per save {spread(paired, '.2f')})")
    overlapped = [s for steps in costs.overlapped_steps_s for s in steps]
    clean_s = statistics.median(costs.clean_steps_s)
    if overlapped:
        print(f"  training steps overlapping a background write: {len(overlapped)}, "
              f"{TOKENS_PER_STEP / statistics.median(overlapped):,.0f} tokens/s median "
              f"({spread([TOKENS_PER_STEP / s for s in overlapped])}); steps with none: "
              f"{len(costs.clean_steps_s)}, {TOKENS_PER_STEP / clean_s:,.0f} tokens/s median "
              f"({spread([TOKENS_PER_STEP / s for s in costs.clean_steps_s])})")
    net_async = [stall + sum(s - clean_s for s in steps)
                 for stall, steps in zip(costs.stall_s["async"], costs.overlapped_steps_s)]
    print(f"  training time lost per save (stall + the overlapped steps' excess over the median "
          f"clean step {clean_s:.3f} s): sync {statistics.median(costs.stall_s['sync']):.3f} s, "
          f"async {statistics.median(net_async):.3f} s median ({spread(net_async, '.3f')})")


def run_throughput(default_precision: str, args: argparse.Namespace) -> None:
    flops = describe_models(default_precision)
    variants = build_variants(default_precision, args.compile, args.nanogpt, args.shape)
    ceiling_samples = run_rounds(variants, args)
    ceilings = {name: statistics.median(samples) for name, samples in ceiling_samples.items()}
    print_table(variants, ceilings, flops)
    print_ceilings(ceiling_samples)
    print_ratios(variants, default_precision)
    print_activation_memory(default_precision)


def main() -> None:
    args = parse_args()
    if min(args.steps, args.rounds, args.warmup, args.saves, args.steps_between_saves) < 1:
        raise SystemExit("--steps, --rounds, --warmup, --saves and --steps-between-saves must "
                         "be at least 1")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    # Deterministic kernels, as helox.training.loop uses on CPU (it changes compiled code only).
    seed_everything(SEED, deterministic=DEVICE.type == "cpu")
    default_precision = pick_precision("auto", DEVICE)
    sections = [args.only] if args.only else list(SECTIONS)
    if args.shape != "reference":
        use_shape(args.shape)
        sections = ["throughput"]
    # Other processes make every number lower and noisier: show how busy the machine was.
    print(f"shape {args.shape}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average "
          f"{os.getloadavg()[0]:.2f} before the run; sections: {', '.join(sections)}; "
          f"{args.rounds} rounds × ({args.warmup} warm-up + {args.steps} timed steps) per variant")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            # A fresh cache, so the reported compile time is the cold one a new user sees.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="helox-bench-inductor-"))
        if "throughput" in sections:
            run_throughput(default_precision, args)
        # The default step as the loop runs it: with train.reuse_memory where it applies.
        with large_tensors_on_heap(reuses_memory(TRAIN.reuse_memory, DEVICE)):
            if "checkpoint" in sections:
                print_save_costs(measure_save_costs(default_precision, args), args)
            if "telemetry" in sections:
                print_telemetry_cost(measure_telemetry_cost(default_precision, args), args)
    print(f"\nbenchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
