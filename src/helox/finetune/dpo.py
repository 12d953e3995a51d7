"""Direct preference optimisation: the loss on a batch of (chosen, rejected) completion pairs
from the policy's and the reference model's log-probabilities, with the metrics TRL logs.

Per pair, with log-ratios r = log π(y|x) − log π_ref(y|x) summed over the completion's tokens:
  sigmoid (DPO)  −log σ(β (r_chosen − r_rejected))
  ipo            ((r_chosen / n_chosen − r_rejected / n_rejected) − 1 / (2β))²
                 (IPO's squared loss on per-token log-ratios, as TRL normalises it)
  + rpo_alpha × the chosen response's mean negative log-likelihood per token, when set
The batch loss is the mean over pairs. Rewards are β · r; accuracy is the share of pairs whose
chosen reward is higher. tests/finetune/test_dpo.py feeds the same log-probabilities to TRL's
`DPOTrainer._compute_loss` and to `dpo_loss` and compares loss and metrics.

Why not TRL: its trainer owns the loop (accelerate, datasets); Helox's loop is its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from helox.configbase import StrictModel, resolve_input_path
from helox.data.loader import IGNORE_INDEX, MicroBatch
from helox.errors import HeloxError

LossType = Literal["sigmoid", "ipo"]


class DpoConfig(StrictModel):
    beta: float = Field(default=0.1, gt=0)
    """How far the policy may move from the reference (the KL penalty's inverse weight)."""
    loss_type: LossType = "sigmoid"
    rpo_alpha: float = Field(default=0.0, ge=0)
    """Weight of the chosen response's negative log-likelihood added to each pair's loss
    (TRL's `rpo_alpha`, Pang et al. 2024): DPO alone may push both responses' likelihoods down
    while their margin grows, and the model's generations with them; this keeps the chosen one
    likely. Per pair, the mean over the response's tokens (TRL averages over the batch's)."""


class DpoRunConfig(DpoConfig):
    """The `dpo` section of a recipe: train on a preference dataset (`format: preference`
    sources) from the policy that train.init_from names."""

    reference: Path | None = None
    """The reference model's checkpoint; None: the policy's start, which for a LoRA run is
    the base with its trained adapter switched off (no second copy in memory), and otherwise
    train.init_from loaded once more."""

    _check_reference = field_validator("reference")(resolve_input_path)


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
                            targets_NT.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask_NT = mask_NT.to(logps_NT.dtype)
    return (logps_NT * mask_NT).sum(-1), mask_NT.sum(-1)


def pair_logps(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, doc_ids_BT: torch.Tensor,
               ) -> tuple[torch.Tensor, ...]:
    """(chosen log-prob, rejected log-prob, chosen tokens, rejected tokens) per row of a
    preference dataset: a row holds one pair, the chosen response in its document 0 and the
    rejected one in its document 1 (data/chat.py); trained targets are its response tokens."""
    trained_BT = targets_BT != IGNORE_INDEX
    chosen_logps, chosen_tokens = completion_logps(logits_BTV, targets_BT,
                                                   trained_BT & (doc_ids_BT == 0))
    rejected_logps, rejected_tokens = completion_logps(logits_BTV, targets_BT,
                                                       trained_BT & (doc_ids_BT == 1))
    return chosen_logps, rejected_logps, chosen_tokens, rejected_tokens


def dpo_terms(chosen_logps_P: torch.Tensor, rejected_logps_P: torch.Tensor,
              ref_chosen_logps_P: torch.Tensor, ref_rejected_logps_P: torch.Tensor,
              config: DpoConfig, chosen_tokens_P: torch.Tensor | None = None,
              rejected_tokens_P: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per pair: the loss ("dpo"; gradients flow through the policy's log-probs only) and
    the metrics under TRL's names. IPO needs each completion's token count."""
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
    extra = {}
    if config.rpo_alpha:
        if chosen_tokens_P is None:
            raise ValueError("rpo_alpha needs the chosen responses' token counts")
        nll_P = -chosen_logps_P / chosen_tokens_P.clamp(min=1)
        loss_P = loss_P + config.rpo_alpha * nll_P
        extra["nll/chosen"] = nll_P.detach()
    return {"dpo": loss_P, **extra,
            "rewards/chosen": chosen_rewards_P,
            "rewards/rejected": rejected_rewards_P,
            "rewards/margins": chosen_rewards_P - rejected_rewards_P,
            "rewards/accuracies": (chosen_rewards_P > rejected_rewards_P).float(),
            "logps/chosen": chosen_logps_P.detach(),
            "logps/rejected": rejected_logps_P.detach(),
            "ref_logps/chosen": ref_chosen_logps_P.detach(),
            "ref_logps/rejected": ref_rejected_logps_P.detach()}


def dpo_loss(chosen_logps_P: torch.Tensor, rejected_logps_P: torch.Tensor,
             ref_chosen_logps_P: torch.Tensor, ref_rejected_logps_P: torch.Tensor,
             config: DpoConfig, chosen_tokens_P: torch.Tensor | None = None,
             rejected_tokens_P: torch.Tensor | None = None) -> DpoOutcome:
    """The loss over P pairs (the mean of `dpo_terms`' per-pair losses) and its metrics."""
    terms = dpo_terms(chosen_logps_P, rejected_logps_P, ref_chosen_logps_P,
                      ref_rejected_logps_P, config, chosen_tokens_P, rejected_tokens_P)
    loss = terms.pop("dpo").mean()
    return DpoOutcome(loss, {name: value.mean().item() for name, value in terms.items()})


Reference = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
"""(tokens, positions, document ids) -> the reference model's logits, without gradients."""


def make_dpo_loss_fn(model: nn.Module, reference: Reference, device: torch.device,
                     autocast_dtype: torch.dtype | None, config: DpoConfig,
                     ) -> Callable[[MicroBatch], dict[str, torch.Tensor]]:
    """A micro-batch of preference rows -> each of `dpo_terms` summed over its pairs (the
    training step divides by the number of pairs). The reference runs under no_grad, in the
    same precision as the policy."""

    def loss_sums(batch: MicroBatch) -> dict[str, torch.Tensor]:
        inputs_BT, targets_BT, positions_BT, doc_ids_BT = (
            None if t is None else t.to(device, non_blocking=True) for t in batch)
        if doc_ids_BT is None:
            raise HeloxError("DPO tells a pair's responses apart by document: it needs "
                             "train.document_masking", hint="set train.document_masking=true")
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            logits_BTV = model(inputs_BT, positions_BT, doc_ids_BT)
            with torch.no_grad():
                ref_logits_BTV = reference(inputs_BT, positions_BT, doc_ids_BT)
        chosen, rejected, n_chosen, n_rejected = pair_logps(logits_BTV, targets_BT, doc_ids_BT)
        ref_chosen, ref_rejected, _, _ = pair_logps(ref_logits_BTV, targets_BT, doc_ids_BT)
        terms = dpo_terms(chosen, rejected, ref_chosen, ref_rejected, config, n_chosen,
                          n_rejected)
        return {name: value.sum() for name, value in terms.items()}

    return loss_sums
