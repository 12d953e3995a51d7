"""Helox's DPO loss and metrics against TRL's: the same per-token log-probabilities go through
`trl.DPOTrainer._compute_loss` (its own code, with a stand-in model that returns them) and
through `helox.finetune.dpo`; loss, gradient and every shared metric agree."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl import DPOTrainer

from helox.finetune.dpo import DpoConfig, completion_logps, dpo_loss

PAIRS, LENGTH = 6, 9


def per_token_logps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(2P × (T − 1) log-probs, chosen rows first; the completion mask of the 2P rows)."""
    generator = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2 * PAIRS, LENGTH - 1, generator=generator, dtype=torch.float64) * 3
    mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row in range(2 * PAIRS):  # a prompt of 2–4 tokens, then a completion to the end
        mask[row, 2 + row % 3:] = 1
    return logps * mask[:, 1:], mask


def trl_loss(policy: torch.Tensor, reference_P2: tuple, mask: torch.Tensor, beta: float,
             loss_type: str) -> tuple[torch.Tensor, dict]:
    """TRL's `_compute_loss` on `policy` (per-token log-probs) and precomputed reference
    sequence log-probs; the stand-ins give it what its fused LM head would."""
    outputs = SimpleNamespace(log_probs=policy, entropy=torch.zeros_like(policy),
                              mean_logits=torch.zeros_like(policy),
                              is_top1=torch.zeros_like(policy, dtype=torch.bool))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                  gather_for_metrics=lambda t: t, unwrap_model=lambda m: m)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": reference_P2[0],
              "ref_rejected_logps": reference_P2[1]}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1)])
def test_loss_gradient_and_metrics_equal_trls(loss_type, beta):
    policy, mask = per_token_logps(0)
    reference, _ = per_token_logps(1)
    reference_P2 = reference.sum(1).chunk(2)
    theirs = policy.clone().requires_grad_(True)
    trl, trl_metrics = trl_loss(theirs, reference_P2, mask, beta, loss_type)
    trl.backward()

    ours = policy.clone().requires_grad_(True)
    chosen, rejected = ours.sum(1).chunk(2)
    tokens = mask[:, 1:].sum(1).chunk(2)
    outcome = dpo_loss(chosen, rejected, *reference_P2, DpoConfig(beta=beta, loss_type=loss_type),
                       *tokens)
    outcome.loss.backward()

    torch.testing.assert_close(outcome.loss, trl, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-15)
    shared = {k: v for k, v in outcome.metrics.items() if k in trl_metrics}
    assert set(shared) == {"rewards/chosen", "rewards/rejected", "rewards/margins",
                           "rewards/accuracies", "logps/chosen", "logps/rejected"}
    assert shared == pytest.approx({k: trl_metrics[k] for k in shared}, rel=1e-12)
    assert 0 < outcome.metrics["rewards/accuracies"] < 1  # the pairs are not all alike


def test_completion_logps_sum_the_completion_tokens_only():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=generator)
    targets = torch.randint(0, 7, (2, 5), generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])
    logps, tokens = completion_logps(logits, targets, mask)
    by_hand = F.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(logps, (by_hand * mask).sum(1))
    assert tokens.tolist() == [3.0, 3.0]
