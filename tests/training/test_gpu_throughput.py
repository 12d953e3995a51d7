"""The default training step on CUDA (skipped without it): bf16, FlashAttention through SDPA,
fused AdamW, torch.compile, and a throughput floor on a GPT-2-small-sized Llama."""

import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from helox.data.loader import MicroBatch
from helox.hardware import matmul_flops_per_s
from helox.model.config import ModelConfig
from helox.model.llama import Llama
from helox.training.config import TrainConfig
from helox.training.optim import OptimConfig, build_optimizer
from helox.training.precision import apply_precision_policy
from helox.training.setup import model_flops_per_token
from helox.training.step import compiled, make_loss_fn, pick_attention, pick_precision, train_step

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
SHAPE = ModelConfig(vocab_size=50304, d_model=768, num_layers=12, num_heads=12, d_ffn=2048,
                    max_seq_len=1024, tie_embeddings=True)
BATCH, STEPS = 8, 10


def default_step(model: Llama):
    """What helox.training.loop builds for a CUDA run with the config defaults."""
    train = TrainConfig()
    precision = pick_precision(train.precision, CUDA)
    model.set_attention(pick_attention(train.attention, CUDA, precision, SHAPE.max_seq_len))
    apply_precision_policy(model, train.fp32_modules, CUDA.type)
    optimizer = build_optimizer(model, OptimConfig(lr=3e-4))
    return precision, optimizer, compiled(make_loss_fn(model, CUDA, precision))


def test_the_default_cuda_step_uses_the_fast_kernels_and_keeps_the_gpu_busy():
    torch.manual_seed(0)
    model = Llama(SHAPE).to(CUDA)
    precision, optimizer, loss_fn = default_step(model)
    assert precision == "bf16" and model.blocks[0].attn.kernel == "sdpa"
    assert optimizer.defaults["fused"]
    tokens = torch.randint(0, SHAPE.vocab_size, (BATCH, SHAPE.max_seq_len + 1), device=CUDA)
    batch = [MicroBatch(tokens[:, :-1], tokens[:, 1:])]
    # Only FlashAttention allowed: SDPA raises if Helox's call could not use it.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        first = train_step(loss_fn, model, optimizer, batch, 1.0)  # compiles
        train_step(loss_fn, model, optimizer, batch, 1.0)
        torch.cuda.synchronize()
        started = time.perf_counter()
        outcomes = [train_step(loss_fn, model, optimizer, batch, 1.0) for _ in range(STEPS)]
        torch.cuda.synchronize()
        elapsed_s = time.perf_counter() - started
    assert not any(o.skipped for o in outcomes)
    assert outcomes[-1].loss < first.loss  # the same batch, learnt
    tokens_per_s = STEPS * BATCH * SHAPE.max_seq_len / elapsed_s
    # The ceiling: one step's tokens through the widest projection (8192×768 by 3072×768).
    ceiling = matmul_flops_per_s(CUDA, torch.bfloat16, reps=50, shape=(
        BATCH * SHAPE.max_seq_len, SHAPE.d_model, 4 * SHAPE.d_model))
    mfu = tokens_per_s * model_flops_per_token(model, SHAPE.max_seq_len) / ceiling
    print(f"CUDA default step: {tokens_per_s:,.0f} tokens/s, {mfu:.1%} of the bf16 matmul "
          f"ceiling measured here")
    assert mfu > 0.10, f"{tokens_per_s:,.0f} tokens/s is {mfu:.1%} of the bf16 ceiling"

