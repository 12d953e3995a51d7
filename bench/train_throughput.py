"""Training throughput (tokens/s) of Helox against `transformers` Llama on one fixed shape.

What is measured: full optimizer steps (forward, cross-entropy, backward, clip to norm 1.0, AdamW
lr 3e-4 betas (0.9, 0.95) wd 0.1, zero_grad) of the reference shape of ../shared/PERF.md: 6
layers, d_model 384, 6 heads (MHA), SwiGLU width 1024, context 256, vocab 8192, micro-batch 8
(2,048 tokens per step), untied embeddings, on random token batches (fixed seed, no data loading).

- Helox runs its real step, `helox.train.step.train_step`, with the optimizer from
  `build_optimizer`: "helox default" as the config defaults set it (the precision
  `pick_precision("auto")` resolves to, bf16 autocast with fp32 master weights where the CPU has
  native bf16, and `train.compile`), then eagerly in that precision and in fp32.
- `transformers.LlamaForCausalLM` is built from the same shape (`helox.model.hf.to_hf_config`,
  SDPA attention), starts from the same weights and trains in a plain loop, as a user writes it
  (default `torch.optim.AdamW`), in fp32 and under bf16 autocast; with --compile also under
  `torch.compile` at the default precision.
- A compiled variant's first step, which compiles, is reported apart and never timed.

The machine is shared and noisy (±10–15%), so the variants are interleaved in one process: each
round runs every variant for its warm-up and timed steps, and a variant's result is its median
tokens/s over the rounds. MFU divides achieved model FLOP/s (6 × matmul parameters + attention,
per token) by the matmul ceiling of the same precision, measured in every round as F.linear of
(2048×384) by (1536×384)ᵀ.

Run: .venv/bin/python bench/train_throughput.py [--compile] [--rounds 3] [--steps 30]
(about 10 minutes on 2 cores; --compile adds the compiled transformers variant, about 12 in all).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from helox.config import ModelConfig, OptimConfig, TrainConfig
from helox.model.hf import to_hf_config, to_hf_state_dict
from helox.model.llama import Llama
from helox.repro import seed_everything
from helox.data.loader import MicroBatch
from helox.train.step import compiled, make_loss_fn, pick_precision, train_step
from helox.train.optim import build_optimizer

DEVICE = torch.device("cpu")
SHAPE = ModelConfig(vocab_size=8192, d_model=384, num_layers=6, num_heads=6, num_kv_heads=6,
                    d_ffn=1024, max_seq_len=256, tie_embeddings=False)
OPTIM = OptimConfig(lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip_norm=1.0)
BATCH_SIZE = 8
SEQ_LEN = SHAPE.max_seq_len
TOKENS_PER_STEP = BATCH_SIZE * SEQ_LEN
SEED = 1234
DEFAULT_NAME = "helox default"
# The ceiling matmul: one micro-batch of tokens through the widest projection of the shape.
CEILING_M, CEILING_K, CEILING_N = TOKENS_PER_STEP, SHAPE.d_model, 4 * SHAPE.d_model
CEILING_REPS = 50

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs_BT, targets_BT), int64


@dataclass
class Variant:
    """One way of training the shape; `step` runs one optimizer step on a batch."""

    name: str
    precision: str  # "fp32" or "bf16": which matmul ceiling applies
    step: Callable[[Batch], float]
    compiled: bool = False
    tokens_per_s: list[float] = field(default_factory=list)  # one per round
    first_step_s: float | None = None  # compiled variants: the step that compiles


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per variant before each round's timed steps")
    parser.add_argument("--compile", action="store_true",
                        help="add transformers under torch.compile (Helox's default compiles)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every variant (default: torch's own choice)")
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


def helox_variant(name: str, precision: str, init_state: dict, compile_model: bool) -> Variant:
    model = Llama(SHAPE)
    model.load_state_dict(init_state)
    optimizer = build_optimizer(model, OPTIM)
    loss_fn = make_loss_fn(model, DEVICE, precision)
    loss_fn = compiled(loss_fn) if compile_model else loss_fn

    def step(batch: Batch) -> float:
        loss = train_step(loss_fn, model, optimizer, [MicroBatch(*batch)],
                          OPTIM.grad_clip_norm).loss
        return loss

    return Variant(name, precision, step, compile_model)


def build_hf_model(init_state: dict) -> nn.Module:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(to_hf_config(SHAPE, attn_implementation="sdpa"))
    model.load_state_dict(to_hf_state_dict(init_state, SHAPE))
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.float().train()


def hf_variant(name: str, precision: str, init_state: dict, compile_model: bool) -> Variant:
    """A plain PyTorch loop around LlamaForCausalLM, with the default AdamW."""
    model = build_hf_model(init_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr,
                                  betas=(OPTIM.beta1, OPTIM.beta2),
                                  weight_decay=OPTIM.weight_decay)
    forward = torch.compile(model) if compile_model else model
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step(batch: Batch) -> float:
        inputs_BT, targets_BT = batch
        with autocast:
            logits_BTV = forward(input_ids=inputs_BT, use_cache=False).logits
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return Variant(name, precision, step, compile_model)


def build_variants(default_precision: str, compile_peers: bool) -> list[Variant]:
    """Helox's default (config defaults: auto precision, train.compile) and its eager variants
    against transformers; with --compile also transformers compiled at the same precision."""
    torch.manual_seed(SEED)
    init_state = Llama(SHAPE).state_dict()  # every variant starts from these weights
    default_compile = TrainConfig().compile
    variants = [
        helox_variant(DEFAULT_NAME, default_precision, init_state, default_compile),
        helox_variant(f"helox {default_precision} eager", default_precision, init_state, False),
        helox_variant("helox fp32 eager", "fp32", init_state, False),
        hf_variant("transformers fp32", "fp32", init_state, False),
        hf_variant(f"transformers {default_precision}", default_precision, init_state, False),
    ]
    if compile_peers:
        variants.append(hf_variant(f"transformers {default_precision} + compile",
                                   default_precision, init_state, True))
    return variants


# ---------------------------------------------------------------------------------------------
# Measuring


def time_variant(variant: Variant, batches: list[Batch], warmup: int, steps: int) -> float:
    """Warm-up steps, then `steps` timed steps; returns tokens/s of the timed steps."""
    gc.collect()
    for i in range(warmup):
        started = time.perf_counter()
        variant.step(batches[i % len(batches)])
        if variant.compiled and variant.first_step_s is None:
            variant.first_step_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(steps):
        variant.step(batches[(warmup + i) % len(batches)])
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
    ceilings: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for round_index in range(args.rounds):
        ceilings["fp32"].append(matmul_gflops(torch.float32))
        ceilings["bf16"].append(matmul_gflops(torch.bfloat16))
        for variant in variants:
            variant.tokens_per_s.append(time_variant(variant, batches, args.warmup, args.steps))
            print(f"  round {round_index + 1}/{args.rounds}  {variant.name:<32} "
                  f"{variant.tokens_per_s[-1]:8,.0f} tokens/s", flush=True)
    return ceilings


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matmuls: every nn.Linear weight (lm_head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module) -> int:
    """6 FLOPs per matmul parameter (forward + backward) plus attention scores and values."""
    return 6 * matmul_params(model) + 12 * SHAPE.num_layers * SHAPE.d_model * SEQ_LEN


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


def print_table(variants: list[Variant], ceilings: dict[str, float], flops: int) -> None:
    print(f"\n{'variant':<32} {'precision':<9} {'tokens/s':>9} {'min–max over rounds':>20} "
          f"{'MFU':>6}  ceiling")
    for v in variants:
        median = statistics.median(v.tokens_per_s)
        mfu = median * flops / (ceilings[v.precision] * 1e9)
        spread = f"{min(v.tokens_per_s):,.0f}–{max(v.tokens_per_s):,.0f}"
        print(f"{v.name:<32} {v.precision:<9} {median:9,.0f} {spread:>20} {mfu:6.1%}  "
              f"{v.precision} {ceilings[v.precision]:,.0f} GFLOP/s")


def print_ratios(variants: list[Variant], default_precision: str) -> None:
    """Ratios of medians, with the range of the per-round (paired, same-round) ratios."""
    by_name = {v.name: v for v in variants}
    comparisons = [
        (DEFAULT_NAME, "transformers fp32", 2.0),
        ("helox fp32 eager", "transformers fp32", 1.0),
        (f"helox {default_precision} eager", f"transformers {default_precision}", 1.0),
        (DEFAULT_NAME, f"transformers {default_precision} + compile", 1.0),
    ]
    print()
    for numerator, denominator, target in comparisons:
        if numerator not in by_name or denominator not in by_name:
            continue
        a, b = by_name[numerator].tokens_per_s, by_name[denominator].tokens_per_s
        ratio = statistics.median(a) / statistics.median(b)
        paired = [x / y for x, y in zip(a, b)]
        verdict = "ok" if ratio >= target else "BELOW TARGET"
        print(f"{numerator} / {denominator}: {ratio:.2f}× (per round {min(paired):.2f}–"
              f"{max(paired):.2f}; target ≥ {target:g}×: {verdict})")
    for v in variants:
        if v.first_step_s is not None:
            print(f"{v.name}: cold compile time was {v.first_step_s:.1f} s "
                  f"(its first step, not timed; the inductor cache was empty at the start of the "
                  f"run unless TORCHINDUCTOR_CACHE_DIR was set)")


def main() -> None:
    args = parse_args()
    if args.steps < 1 or args.rounds < 1 or args.warmup < 1:
        raise SystemExit("--steps, --rounds and --warmup must be at least 1")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    # Deterministic kernels, as helox.train.loop uses on CPU (it changes compiled code only).
    seed_everything(SEED, deterministic=DEVICE.type == "cpu")
    default_precision = pick_precision("auto", DEVICE)
    # Other processes make every number lower and noisier: show how busy the machine was.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f} "
          f"before the run; {args.rounds} rounds × "
          f"({args.warmup} warm-up + {args.steps} timed steps) per variant")
    flops = describe_models(default_precision)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            # A fresh cache, so the reported compile time is the cold one a new user sees.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="helox-bench-inductor-"))
        variants = build_variants(default_precision, args.compile)
        ceiling_samples = run_rounds(variants, args)
    ceilings = {name: statistics.median(samples) for name, samples in ceiling_samples.items()}
    print_table(variants, ceilings, flops)
    print(f"matmul ceilings (F.linear {CEILING_M}×{CEILING_K} by {CEILING_N}×{CEILING_K}, median "
          f"of rounds): fp32 {ceilings['fp32']:,.0f} GFLOP/s "
          f"({min(ceiling_samples['fp32']):,.0f}–{max(ceiling_samples['fp32']):,.0f}), "
          f"bf16 {ceilings['bf16']:,.0f} GFLOP/s "
          f"({min(ceiling_samples['bf16']):,.0f}–{max(ceiling_samples['bf16']):,.0f})")
    print_ratios(variants, default_precision)
    print(f"\nbenchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
