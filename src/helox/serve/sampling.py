"""A request's sampling parameters (OpenAI's, plus top_k and stop token ids), checked at submit,
and picking one token from one row's logits with the request's own generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from helox.serve.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    """Tokens to generate at most; None: as many as the context has room for."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (argmax)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities sum to top_p (nucleus)."""
    top_k: int | None = None
    """Sample among the k most likely tokens; None: all."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion; the returned text ends before the first one."""
    stop_token_ids: frozenset[int] | None = None
    """Token ids that end the completion (not returned): the EOS, and for chat the template's
    turn end. None: the engine's EOS alone."""
    seed: int | None = None
    """Seed of the request's own generator: a seeded request samples the same tokens whatever
    else is in the batch. None: a fresh random seed."""

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", frozenset(self.stop_token_ids))
        problem = self._problem()
        if problem is not None:
            raise RequestError(problem[1], param=problem[0])

    def _problem(self) -> tuple[str, str] | None:
        """(param, message) of the first bad field, or None."""
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            return "max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}"
        if not _is_number(self.temperature) or self.temperature < 0:
            return "temperature", f"temperature must be >= 0, got {self.temperature!r}"
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            return "top_p", f"top_p must be in (0, 1], got {self.top_p!r}"
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            return "top_k", f"top_k must be a positive integer or null, got {self.top_k!r}"
        if any(not isinstance(s, str) or not s for s in self.stop):
            return "stop", f"stop strings must be non-empty strings, got {list(self.stop)!r}"
        if self.seed is not None and not _is_int(self.seed):
            return "seed", f"seed must be an integer, got {self.seed!r}"
        if self.stop_token_ids is not None and any(not _is_int(t) or t < 0
                                                   for t in self.stop_token_ids):
            return "stop_token_ids", "stop_token_ids must be non-negative integers"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (None for greedy requests, which draw nothing)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample_token(logits_V: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None) -> int:
    """One token from one row's logits: argmax at temperature 0, else temperature, then
    top-k, then top-p, then a draw from the request's generator (the order vLLM and
    transformers apply them; top-k alone draws what `helox.model.generate` draws)."""
    if params.greedy:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / params.temperature
    if params.top_k is not None and params.top_k < logits_V.numel():
        kth_value = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth_value, float("-inf"))
    if params.top_p < 1:
        logits_V = _nucleus(logits_V, params.top_p)
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def _nucleus(logits_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities reach top_p."""
    sorted_V, order_V = logits_V.sort(descending=True)
    probs_V = sorted_V.softmax(dim=-1)
    mass_before_V = probs_V.cumsum(dim=-1) - probs_V
    drop_sorted_V = mass_before_V >= top_p
    drop_sorted_V[0] = False  # the most likely token always stays
    drop_V = torch.zeros_like(drop_sorted_V).scatter(0, order_V, drop_sorted_V)
    return logits_V.masked_fill(drop_V, float("-inf"))
