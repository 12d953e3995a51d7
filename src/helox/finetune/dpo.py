"""Direct preference optimisation: the loss on a batch of (chosen, rejected) completion pairs
from the policy's and the reference model's log-probabilities, with the metrics TRL logs.

Per pair, with log-ratios r = log π(y|x) − log π_ref(y|x) summed over the completion's tokens:
  sigmoid (DPO)  −log σ(β (r_chosen − r_rejected))
  ipo            ((r_chosen / n_chosen − r_rejected / n_rejected) − 1 / (2β))²
                 (IPO's squared loss on per-token log-ratios, as TRL normalises it)
The batch loss is the mean over pairs. Rewards are β · r; accuracy is the share of pairs whose
chosen reward is higher. tests/finetune/test_dpo.py feeds the same log-probabilities to TRL's
`DPOTrainer._compute_loss` and to `dpo_loss` and compares loss and metrics.

Why not TRL: its trainer owns the loop (accelerate, datasets); Helox's loop is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from helox.configbase import StrictModel

LossType = Literal["sigmoid", "ipo"]


class DpoConfig(StrictModel):
    beta: float = Field(default=0.1, gt=0)
    """How far the policy may move from the reference (the KL penalty's inverse weight)."""
    loss_type: LossType = "sigmoid"


@dataclass
class DpoOutcome:
    loss: torch.Tensor
    metrics: dict[str, float]
    """TRL's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
    logps/chosen, logps/rejected; and ref_logps/chosen, ref_logps/rejected."""


def completion_logps(logits_NTV: torch.Tensor, targets_NT: torch.Tensor,
                     mask_NT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p(target) over the masked positions, their count) per sequence, in fp32."""
    logps_NT = torch.gather(F.log_softmax(logits_NTV.float(), dim=-1), -1,
                            targets_NT.unsqueeze(-1)).squeeze(-1)
    mask_NT = mask_NT.to(logps_NT.dtype)
    return (logps_NT * mask_NT).sum(-1), mask_NT.sum(-1)


def dpo_loss(chosen_logps_P: torch.Tensor, rejected_logps_P: torch.Tensor,
             ref_chosen_logps_P: torch.Tensor, ref_rejected_logps_P: torch.Tensor,
             config: DpoConfig, chosen_tokens_P: torch.Tensor | None = None,
             rejected_tokens_P: torch.Tensor | None = None) -> DpoOutcome:
    """The loss over P pairs (gradients flow through the policy's log-probs only) and its
    metrics. IPO needs each completion's token count."""
    beta = config.beta
    chosen_ratio_P = chosen_logps_P - ref_chosen_logps_P.detach()
    rejected_ratio_P = rejected_logps_P - ref_rejected_logps_P.detach()
    if config.loss_type == "sigmoid":
        loss_P = -F.logsigmoid(beta * (chosen_ratio_P - rejected_ratio_P))
    else:
        if chosen_tokens_P is None or rejected_tokens_P is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        delta_P = chosen_ratio_P / chosen_tokens_P.clamp(min=1) \
            - rejected_ratio_P / rejected_tokens_P.clamp(min=1)
        loss_P = (delta_P - 1 / (2 * beta)) ** 2
    chosen_rewards_P = beta * chosen_ratio_P.detach()
    rejected_rewards_P = beta * rejected_ratio_P.detach()
    metrics = {
        "rewards/chosen": chosen_rewards_P.mean().item(),
        "rewards/rejected": rejected_rewards_P.mean().item(),
        "rewards/margins": (chosen_rewards_P - rejected_rewards_P).mean().item(),
        "rewards/accuracies": (chosen_rewards_P > rejected_rewards_P).float().mean().item(),
        "logps/chosen": chosen_logps_P.detach().mean().item(),
        "logps/rejected": rejected_logps_P.detach().mean().item(),
        "ref_logps/chosen": ref_chosen_logps_P.mean().item(),
        "ref_logps/rejected": ref_rejected_logps_P.mean().item(),
    }
    return DpoOutcome(loss_P.mean(), metrics)
