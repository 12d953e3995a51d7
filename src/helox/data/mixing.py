"""Domain mixture: sampling weights per domain, and their online rebalancing (DoReMi-style).

With no weights, the loader draws blocks in their natural proportions (one shuffled pool).
With weights, each domain is its own shuffled stream and a smooth weighted round-robin picks the
domain of every sequence: over any n sequences each domain's count is within a few sequences of
weight × n, so realised proportions track the targets without sampling noise.

Rebalancing (Xie et al. 2023, DoReMi, Algorithm 1, used online for sampling): every
`every_steps` steps the per-domain validation loss L_d is measured on fixed sequences and
  excess_d  = max(L_d − ref_d, 0)                    (ref_d: reference loss, 0 when not given)
  alpha     ∝ alpha · exp(learning_rate · excess)    (exponentiated gradient, normalised)
  weights   = (1 − n · floor) · alpha + floor         (every domain keeps at least `floor`)
Without a reference the update favours the domains with the highest loss, including noisy ones
whose loss cannot go down; a reference (e.g. a small model's losses, DoReMi's proxy) counts
only the loss above what is attainable. The state (alpha) is saved in checkpoints.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from helox.configbase import StrictModel
from helox.errors import HeloxError


class RebalanceConfig(StrictModel):
    every_steps: int = Field(gt=0)
    """Update the weights after every this many optimizer steps."""
    learning_rate: float = Field(default=1.0, gt=0)
    """Step size of the exponentiated-gradient update (DoReMi uses 1)."""
    floor: float = Field(default=0.02, ge=0, lt=1)
    """Minimum weight of every rebalanced domain. It applies from the first step: the n
    rebalanced domains start at (1 − n·floor)·weight + floor (DoReMi's smoothing)."""
    eval_sequences: int = Field(default=16, gt=0)
    """Validation sequences of each domain scored per update (always the same ones)."""
    reference_loss: dict[str, float] = {}
    """Per-domain reference loss in nats per token; missing domains use 0."""


class MixtureConfig(StrictModel):
    weights: dict[str, float] = {}
    """Sampling weight per training domain (normalised to sum 1; 0 leaves a domain out).
    Empty: the natural proportions of the data. Every domain of the dataset must be listed."""
    rebalance: RebalanceConfig | None = None
    """Online rebalancing from per-domain validation loss; None keeps the weights fixed."""

    @model_validator(mode="after")
    def _valid_weights(self) -> MixtureConfig:
        if any(w < 0 or not math.isfinite(w) for w in self.weights.values()):
            raise ValueError(f"weights must be finite and ≥ 0, got {self.weights}")
        if self.weights and sum(self.weights.values()) <= 0:
            raise ValueError("at least one domain needs a positive weight")
        return self

    @property
    def weighted(self) -> bool:
        """Whether domains are drawn as separate streams (any weights or rebalancing)."""
        return bool(self.weights) or self.rebalance is not None


def initial_weights(config: MixtureConfig, domains: list[str], natural_blocks: dict[str, int],
                    injected: set[str]) -> list[float]:
    """Base weights per domain (in `domains` order), injected domains at 0, summing to 1."""
    if config.weights:
        raw = [0.0 if d in injected else float(config.weights.get(d, 0.0)) for d in domains]
    else:
        raw = [0.0 if d in injected else float(natural_blocks[d]) for d in domains]
    total = sum(raw)
    return [w / total for w in raw]


class Rebalancer:
    """DoReMi's online update of the base weights (see the module docstring)."""

    def __init__(self, config: RebalanceConfig, domains: list[str], weights: list[float]):
        self.config, self.domains = config, domains
        self.active = [i for i, w in enumerate(weights) if w > 0]
        if config.floor * len(self.active) >= 1:
            raise HeloxError(f"mixture.rebalance.floor {config.floor} × {len(self.active)} "
                             "domains leaves no weight to rebalance",
                             hint=f"set the floor below {1 / len(self.active):.3g}")
        self.log_alpha = [math.log(w) if w > 0 else -math.inf for w in weights]
        self.updates = 0

    def weights(self) -> list[float]:
        floor, n = self.config.floor, len(self.active)
        return [(1 - n * floor) * math.exp(la) + floor if i in self.active else 0.0
                for i, la in enumerate(self.log_alpha)]

    def update(self, losses: dict[str, float]) -> list[float]:
        """One update from per-domain validation losses (nats/token); returns the new weights.
        Kept in log space so that a long-starved domain never underflows to weight 0."""
        for i in self.active:
            domain = self.domains[i]
            excess = max(losses[domain] - self.config.reference_loss.get(domain, 0.0), 0.0)
            self.log_alpha[i] += self.config.learning_rate * excess
        top = max(self.log_alpha[i] for i in self.active)
        log_total = top + math.log(sum(math.exp(self.log_alpha[i] - top) for i in self.active))
        for i in self.active:
            self.log_alpha[i] -= log_total
        self.updates += 1
        return self.weights()

    def state_dict(self) -> dict:
        return {"domains": self.domains, "log_alpha": self.log_alpha, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        if state["domains"] != self.domains:
            raise HeloxError(f"cannot resume the mixture: the checkpoint rebalances domains "
                             f"{state['domains']}, this run has {self.domains}",
                             hint="resume with the dataset the checkpoint was written with")
        self.log_alpha, self.updates = list(state["log_alpha"]), state["updates"]
