"""The cross-entropy whose gradient is computed in the forward (CrossEntropySum): the loss and
gradient of F.cross_entropy, the path a compiled 16-bit step takes and no other does."""

import pytest
import torch
import torch.nn.functional as F

from helox.data.loader import IGNORE_INDEX, MicroBatch
from helox.model.config import ModelConfig
from helox.model.llama import Llama
from helox.training.step import CrossEntropySum, fuses_cross_entropy, make_loss_fn


def logits_and_targets(dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(0)
    logits_NV = (4 * torch.randn(96, 211, generator=generator)).to(dtype)
    targets_N = torch.randint(0, 211, (96,), generator=generator)
    targets_N[::7] = IGNORE_INDEX  # untrained chat tokens
    return logits_NV, targets_N


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_loss_and_gradient_are_f_cross_entropys(dtype):
    logits_NV, targets_N = logits_and_targets(dtype)
    ours = logits_NV.clone().requires_grad_()
    theirs = logits_NV.clone().requires_grad_()
    loss = CrossEntropySum.apply(ours, targets_N)
    reference = F.cross_entropy(theirs.float(), targets_N, reduction="sum")
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    (loss / 3).backward()  # a scale that is no power of two: the gradient is scaled in fp32
    (reference / 3).backward()
    assert ours.grad.dtype == dtype
    assert not ours.grad[::7].any()  # ignored targets train nothing
    # One more 16-bit rounding than F.cross_entropy's (before the scale) at most.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), rtol=2 * eps,
                               atol=2 * eps * theirs.grad.abs().max().item())


def test_only_a_compiled_step_on_16_bit_logits_takes_it():
    logits_NV, _ = logits_and_targets()
    which = torch.compile(lambda x: x * 2 if fuses_cross_entropy(x) else x * 3)
    assert torch.equal(which(logits_NV.clone().requires_grad_()), logits_NV * 2)
    assert torch.equal(which(logits_NV.float().requires_grad_()), logits_NV.float() * 3)
    assert torch.equal(which(logits_NV), logits_NV * 3)  # no gradient: evaluation
    assert not fuses_cross_entropy(logits_NV.clone().requires_grad_())  # eager


def test_a_compiled_bf16_loss_trains_as_the_eager_one():
    """The whole loss function, compiled (CrossEntropySum) against eager (F.cross_entropy),
    with untrained targets: the same loss and gradients to bf16 rounding."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4,
                              max_seq_len=16))
    tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    targets = tokens[:, 1:].clone()
    targets[:, :5] = IGNORE_INDEX
    batch = MicroBatch(tokens[:, :-1], targets)
    grads = {}
    for name, loss_fn in (("eager", make_loss_fn(model, torch.device("cpu"), "bf16")),
                          ("compiled", torch.compile(make_loss_fn(model, torch.device("cpu"),
                                                                  "bf16")))):
        loss = loss_fn(batch)["lm"]
        loss.backward()
        grads[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads["compiled"][0], grads["eager"][0], rtol=1e-2, atol=0)
    for ours, theirs in zip(grads["compiled"][1], grads["eager"][1]):
        torch.testing.assert_close(ours, theirs, rtol=5e-2, atol=5e-2 * theirs.abs().max().item())
