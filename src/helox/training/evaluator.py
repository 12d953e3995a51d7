"""Validation loss during training: fixed sequences of every validation domain, read once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from helox.data.loader import IGNORE_INDEX, MicroBatch, TrainLoader, fixed_sequences, split_rows
from helox.data.shards import DatasetVersion
from helox.errors import HeloxError
from helox.training.step import LossFn

if TYPE_CHECKING:  # the composition of configs sits above the trainer: annotations only
    from helox.config import RunConfig


class Evaluator:
    """Validation loss on fixed sequences of every validation domain: `eval` shares
    train.eval_batches micro-batches evenly among the domains; `rebalance` scores
    mixture.rebalance.eval_sequences per domain. Sequences are read once and kept."""

    def __init__(self, dataset: DatasetVersion, config: RunConfig, loader: TrainLoader):
        self.dataset, self.config = dataset, config
        self._sets: dict[str, dict[str, MicroBatch]] = {}
        if loader.rebalancer is not None:
            missing = loader.val_streams_missing()
            if missing:
                raise HeloxError(f"mixture.rebalance needs validation data of every weighted "
                                 f"domain; dataset {dataset.version} has none for {missing}",
                                 hint="add validation sources for them, or weight them 0")

    def losses(self, loss_fn: LossFn, model: nn.Module, purpose: str,
               ) -> tuple[float, dict[str, float]]:
        """(mean loss per token over all sequences, mean loss per token of each domain)."""
        sets = self._sequences(purpose)
        rows = self.config.train.micro_batch_size
        sums, counts = {}, {}
        model.eval()
        with torch.no_grad():
            for domain, data in sets.items():
                batches = split_rows(data, rows)
                sums[domain] = sum(loss_fn(batch)["lm"].item() for batch in batches)
                counts[domain] = max(1, int((data.targets != IGNORE_INDEX).sum()))
        model.train()
        overall = sum(sums.values()) / sum(counts.values())
        return overall, {d: sums[d] / counts[d] for d in sums}

    def pair_terms(self, loss_fn: LossFn, model: nn.Module) -> dict[str, float]:
        """A DPO run's held-out figures: each of the loss function's per-pair terms (the
        loss under "dpo", TRL's rewards/accuracies, ...) averaged over the validation pairs."""
        sums: dict[str, float] = {}
        pairs = 0
        model.eval()
        with torch.no_grad():
            for data in self._sequences("eval").values():
                for batch in split_rows(data, self.config.train.micro_batch_size):
                    for name, value in loss_fn(batch).items():
                        sums[name] = sums.get(name, 0.0) + value.item()
                    pairs += batch.inputs.shape[0]
        model.train()
        return {name: value / max(1, pairs) for name, value in sums.items()}

    def _sequences(self, purpose: str) -> dict[str, MicroBatch]:
        if purpose not in self._sets:
            tc = self.config.train
            if purpose == "eval":
                domains = max(1, len(self.dataset.domains("val")))
                per_domain = -(-tc.eval_batches * tc.micro_batch_size // domains)
            else:
                per_domain = self.config.mixture.rebalance.eval_sequences
            self._sets[purpose] = fixed_sequences(self.dataset, "val", tc.seq_len, per_domain,
                                                  tc.document_masking)
        return self._sets[purpose]
