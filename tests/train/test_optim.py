import math

import pytest

from helox.config import ModelConfig, OptimConfig
from helox.model.llama import Llama
from helox.train.optim import build_optimizer, lr_at


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(step, cfg, max_steps=110) for step in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 50 / 99)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_no_warmup_starts_at_peak():
    cfg = OptimConfig(lr=2.0, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, cfg, 5) == pytest.approx(2.0) and lr_at(4, cfg, 5) == pytest.approx(0.0)


def test_weight_decay_only_on_matrices_that_are_not_embeddings():
    model = Llama(ModelConfig(vocab_size=50, d_model=16, num_layers=1, num_heads=2,
                              max_seq_len=8, tie_embeddings=True))
    decayed, plain = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in plain["params"]} == {
        "embed.weight", "blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight", "norm.weight"}
    assert len(decayed["params"]) == 7  # q, k, v, o, gate, up, down
