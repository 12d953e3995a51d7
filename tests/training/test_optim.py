import copy
import math

import pytest
import torch

from helox.data.loader import MicroBatch
from helox.model.config import ModelConfig
from helox.training.optim import AdaptiveClipConfig, OptimConfig
from helox.model.llama import Llama
from helox.training.optim import AdaptiveClip, build_optimizer, effective_betas, lr_at
from helox.training.step import clips_in_update, make_loss_fn, train_step


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


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_is_flat_then_decays_to_min_lr_over_the_last_fraction(shape):
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd",
                      decay_fraction=0.2, decay_shape=shape)
    lrs = [lr_at(step, cfg, max_steps=100) for step in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10:80] == [1.0] * 70  # stable until the last 20 steps
    progress = [(s - 80 + 1) / 20 for s in range(80, 100)]
    factor = [1 - p if shape == "linear" else 1 - math.sqrt(p) for p in progress]
    assert lrs[80:] == pytest.approx([0.1 + 0.9 * f for f in factor])
    assert lrs[-1] == pytest.approx(0.1)


def test_constant_schedule_holds_the_peak_after_warmup():
    cfg = OptimConfig(lr=0.5, warmup_steps=4, schedule="constant")
    assert [lr_at(s, cfg, 20) for s in (0, 3, 4, 19)] == pytest.approx([0.125, 0.5, 0.5, 0.5])


def test_adafactor_is_torchs_with_the_same_decay_groups():
    import torch

    model = Llama(ModelConfig(vocab_size=50, d_model=16, num_layers=1, num_heads=2,
                              max_seq_len=8))
    optimizer = build_optimizer(model, OptimConfig(optimizer="adafactor", weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.Adafactor)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("beta", [0.9, 0.95])
def test_effective_beta_is_the_decay_that_bias_correction_applies(beta):
    """m̂_t = β_eff · m̂_(t-1) + (1 − β_eff) · g_t, checked on an EMA of random gradients."""
    import random

    rng = random.Random(0)
    cfg = OptimConfig(beta1=beta, beta2=beta)
    m, corrected_prev = 0.0, 0.0
    for step in range(50):
        g = rng.gauss(0, 1)
        m = beta * m + (1 - beta) * g
        corrected = m / (1 - beta ** (step + 1))
        beta_eff = effective_betas(cfg, step)[0]
        assert corrected == pytest.approx(beta_eff * corrected_prev + (1 - beta_eff) * g)
        corrected_prev = corrected
    assert effective_betas(cfg, 0) == (0.0, 0.0)
    assert effective_betas(cfg, 10_000)[0] == pytest.approx(beta)


def test_adaptive_clip_waits_for_history_then_clamps_a_multiple_of_the_percentile():
    clip = AdaptiveClip(AdaptiveClipConfig(window_steps=4, percentile=50, multiplier=2.0,
                                           floor=0.5, ceiling=3.0, min_history=2), 1.0)
    assert clip.threshold() == 1.0
    clip.record(0.4)
    assert clip.threshold() == 1.0  # one norm is not a reference yet
    clip.record(0.6)
    assert clip.threshold() == pytest.approx(2.0 * 0.5)
    clip.record(float("nan"))  # a non-finite norm is not history
    for norm in (5.0, 5.0, 5.0):
        clip.record(norm)
    assert clip.history == [0.6, 5.0, 5.0, 5.0] and clip.threshold() == 3.0  # the ceiling
    clip.history = [0.01] * 4
    assert clip.threshold() == 0.5  # the floor


def test_ema_decay_warms_up_then_holds():
    import torch

    from helox.training.setup import ema_model

    model = torch.nn.Linear(1, 1, bias=False)
    ema = ema_model(model, 0.9)
    assert ema.n_averaged.device.type == "cpu"  # read each update without a device sync
    expected = None
    for previous_updates, value in enumerate([1.0, 2.0, 3.0, 4.0] + [5.0] * 96):
        model.weight.data.fill_(value)
        ema.update_parameters(model)
        decay = min(0.9, (1 + previous_updates) / (10 + previous_updates))
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert (1 + 79) / (10 + 79) < 0.9 <= (1 + 80) / (10 + 80)  # the cap holds from update 80


@pytest.mark.parametrize("clip_norm", [1e-3, 1e3], ids=["clipping", "nothing-clipped"])
def test_fused_adamw_clips_in_its_update_as_clipping_first_does(clip_norm):
    """train_step hands the clipping to fused AdamW (its grad_scale divides every gradient in
    the update): the moments and weights after three steps are clip_grad_norm_-then-step()'s,
    to fp32 rounding where it clips and bitwise where it does not; the reported norm is the one
    before clipping. Without the scale, the first moment would be the unclipped gradient's."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4,
                              max_seq_len=16))
    reference = copy.deepcopy(model)
    fused = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    first = build_optimizer(reference, OptimConfig(lr=1e-2, warmup_steps=0))
    assert clips_in_update(fused, list(model.parameters()), scaler=None)
    cpu = torch.device("cpu")
    loss_fn, reference_fn = make_loss_fn(model, cpu, "fp32"), make_loss_fn(reference, cpu, "fp32")
    for step in range(3):
        tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(step))
        batch = MicroBatch(tokens[:, :-1], tokens[:, 1:])
        outcome = train_step(loss_fn, model, fused, [batch], clip_norm)
        (reference_fn(batch)["lm"] / batch.targets.numel()).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip_norm, foreach=True)
        first.step()
        first.zero_grad(set_to_none=True)
        assert outcome.grad_norm == pytest.approx(norm.item(), rel=1e-5)
        assert outcome.skip_reason is None
    assert (norm > clip_norm) == (clip_norm < 1)

    def assert_agree(ours, theirs):  # fp32 rounding, relative to the tensor's scale
        tolerance = 0 if clip_norm > 1 else 1e-5
        torch.testing.assert_close(ours, theirs, rtol=tolerance,
                                   atol=tolerance * theirs.abs().max().item())

    for a, b in zip(model.parameters(), reference.parameters()):
        assert_agree(a, b)
        for moment in ("exp_avg", "exp_avg_sq"):
            assert_agree(fused.state[a][moment], first.state[b][moment])


def test_other_optimizers_and_loss_scaling_clip_first():
    model = Llama(ModelConfig(vocab_size=97, d_model=32, num_layers=1, num_heads=4,
                              max_seq_len=16))
    params = list(model.parameters())
    adafactor = build_optimizer(model, OptimConfig(optimizer="adafactor"))
    fused = build_optimizer(model, OptimConfig())
    assert not clips_in_update(adafactor, params, scaler=None)
    assert not clips_in_update(fused, params, torch.amp.GradScaler("cpu"))
    assert clips_in_update(fused, params, scaler=None)
