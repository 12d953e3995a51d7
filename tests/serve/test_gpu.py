"""The engine on CUDA (skipped without it): a mixed batch of requests, one of them on an
adapter, gives the tokens the CPU engine gives, and the server answers from the GPU."""

import copy

import pytest

from helox.checkpoint.fingerprint import model_fingerprint
from helox.finetune.lora import LoraConfig
from helox.serve.engine import Engine
from helox.serve.sampling import SamplingParams
from helox.testing.adapters import write_random_adapter

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7], [100, 200, 40, 50, 60], [9], list(range(30, 41))]


def greedy(engine: Engine, adapter: str) -> list[tuple[int, ...]]:
    handles = [engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0),
                             model=adapter if i % 2 else None)
               for i, prompt in enumerate(PROMPTS)]
    return [handle.result().token_ids for handle in handles]


def test_cuda_decoding_gives_the_cpu_tokens(model, tokenizer, tmp_path):
    adapter = write_random_adapter(model, tmp_path / "x", LoraConfig(
        rank=4, alpha=8, target_modules=["q_proj", "v_proj"]), 3, model_fingerprint(model))
    results = {}
    for device in ("cpu", "cuda"):
        with Engine(copy.deepcopy(model).to(device), tokenizer, 0, name="tiny") as engine:
            assert engine.device.type == device
            engine.load_adapter("x", adapter)
            results[device] = greedy(engine, "x")
    assert results["cuda"] == results["cpu"]
