"""Sampling text from a trained model (temperature and top-k; greedy at temperature 0)."""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from helox.configbase import StrictModel
from helox.model.llama import KVCache, Llama


class SampleConfig(StrictModel):
    prompts: list[str] = ["The"]
    """Prompts that `helox run` completes after training."""
    max_new_tokens: int = Field(default=48, gt=0)
    """Tokens to generate per prompt."""
    temperature: float = Field(default=0.8, ge=0)
    """Softmax temperature; 0 means greedy."""
    top_k: int | None = Field(default=40, gt=0)
    """Sample among the k most likely tokens; None samples from all."""



@torch.no_grad()
def generate(model: Llama, prompt_ids: list[int], max_new_tokens: int, temperature: float,
             top_k: int | None, stop_id: int | None = None,
             generator: torch.Generator | None = None,
             should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Continue `prompt_ids`; returns only the new tokens (stopping early at `stop_id`, or
    once `should_stop(new tokens)` says so).

    The prompt is one forward into a KV cache, then each token one forward of one token. A
    context longer than the model's max_seq_len keeps its last max_seq_len // 2 tokens and
    refills the cache from them (positions are absolute, so a cache cannot slide)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    limit = model.cfg.max_seq_len
    context = list(prompt_ids)[-limit:]
    cache = KVCache(model.cfg, 1, limit, device, dtype)
    pending = context
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        if cache.length + len(pending) > limit:
            context = context[-(limit // 2):]
            cache.length, pending = 0, context
        logits_V = model(torch.tensor([pending], device=device), cache=cache)[0, -1].float()
        next_id = _pick(logits_V, temperature, top_k, generator)
        if next_id == stop_id:
            break
        new_ids.append(next_id)
        context.append(next_id)
        pending = [next_id]
        if should_stop is not None and should_stop(new_ids):
            break
    return new_ids


def _pick(logits_V: torch.Tensor, temperature: float, top_k: int | None,
          generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k is not None and top_k < logits_V.numel():
        kth_value = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth_value, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def complete(model: Llama, tokenizer, prompt: str, stop_id: int, max_new_tokens: int,
             temperature: float, top_k: int | None, seed: int = 0) -> str:
    """Text continuation of `prompt`, which is read as the start of a document (after EOS)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompt_ids = [stop_id, *tokenizer.encode(prompt, add_special_tokens=False).ids]
    new_ids = generate(model, prompt_ids, max_new_tokens, temperature, top_k, stop_id, generator)
    return tokenizer.decode(new_ids)
