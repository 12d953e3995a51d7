"""Per-request LoRA adapters: a batch mixing the base and two adapters gives each request what
the merged model gives; loading checks the base fingerprint; loading and unloading while
requests decode loses nothing."""

import copy
import threading
import time

import pytest

from helox.checkpoint.fingerprint import model_fingerprint
from helox.errors import HeloxError
from helox.finetune.lora import LoraConfig, load_adapter, lora_layers, merge_lora
from helox.model.generate import generate
from helox.serve.engine import Engine
from helox.serve.errors import UnknownModelError
from helox.serve.sampling import SamplingParams
from helox.testing.adapters import write_random_adapter

ADAPTERS = {"x": LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            "y": LoraConfig(rank=2, alpha=4, target_modules=["k_proj", "up_proj", "lm_head"])}
PROMPTS = [[5, 6, 7], [100, 200, 40, 50, 60], [9], list(range(30, 41))]


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    fingerprint = model_fingerprint(model)
    return {name: write_random_adapter(model, root / name, config, seed, fingerprint)
            for seed, (name, config) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def merged(model, adapters):
    """The model each request should see: the base, or the base with one adapter merged."""
    models = {None: model}
    for name, folder in adapters.items():
        models[name] = copy.deepcopy(model)
        load_adapter(models[name], folder)
        merge_lora(models[name])
    return models


def reference(merged, adapter, prompt, max_tokens):
    return generate(merged[adapter], prompt, max_tokens, 0, None, stop_id=0)


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0)


@pytest.mark.parametrize("naive", [False, True])
def test_a_mixed_batch_gives_each_request_its_adapters_merged_output(model, tokenizer, adapters,
                                                                     merged, naive):
    with Engine(copy.deepcopy(model), tokenizer, 0, name="tiny", naive=naive) as engine:
        for name, folder in adapters.items():
            engine.load_adapter(name, folder)
        assert engine.model_names() == ["tiny", "x", "y"]
        requests = [(None, PROMPTS[0]), ("x", PROMPTS[1]), ("y", PROMPTS[2]), ("x", PROMPTS[3]),
                    ("tiny", PROMPTS[1]), ("y", PROMPTS[0])]
        handles = [engine.submit(prompt, greedy(20), model=name) for name, prompt in requests]
        outputs = [list(handle.result().token_ids) for handle in handles]
    for (name, prompt), output in zip(requests, outputs):
        assert output == reference(merged, None if name == "tiny" else name, prompt, 20)
    assert outputs[1] != reference(merged, None, PROMPTS[1], 20)  # the adapter matters


def test_an_adapter_of_another_base_is_refused_naming_both_fingerprints(model, other_model,
                                                                        tokenizer, tmp_path):
    other = other_model
    folder = write_random_adapter(other, tmp_path / "other", ADAPTERS["x"], 3,
                                  model_fingerprint(other))
    with Engine(copy.deepcopy(model), tokenizer, 0) as engine:
        with pytest.raises(HeloxError) as caught:
            engine.load_adapter("other", folder)
        assert model_fingerprint(other) in str(caught.value)
        assert model_fingerprint(model) in str(caught.value)
        assert engine.model_names() == ["base"] and not lora_layers(engine.model)
        with pytest.raises(UnknownModelError):
            engine.submit([1, 2], model="other")
        with pytest.raises(HeloxError, match="no adapter_config.json"):
            engine.load_adapter("empty", tmp_path)
        assert engine.submit(PROMPTS[0], greedy(8)).result().finish_reason == "length"


def test_loading_and_unloading_while_requests_decode_loses_nothing(model, tokenizer, adapters,
                                                                   merged, slowed):
    engine = Engine(copy.deepcopy(model), tokenizer, 0, max_batch_size=4)
    with engine, slowed(engine, 0.005):
        engine.load_adapter("x", adapters["x"])
        on_base = engine.submit(PROMPTS[0], greedy(40))
        on_x = engine.submit(PROMPTS[1], greedy(40), model="x")
        stream = iter(on_x)
        first = [next(stream) for _ in range(3)]
        engine.load_adapter("y", adapters["y"])  # between iterations, the others decoding
        on_y = engine.submit(PROMPTS[2], greedy(30), model="y")
        unloading = threading.Thread(target=engine.unload_adapter, args=("x",))
        unloading.start()
        while "x" in engine.model_names():
            time.sleep(0.001)
        assert "x" in engine.stats().adapters  # kept for the request decoding with it
        with pytest.raises(UnknownModelError):
            engine.submit(PROMPTS[3], model="x")  # refused from the moment unloading starts
        assert [t for o in first + list(stream) for t in o.token_ids] == \
            reference(merged, "x", PROMPTS[1], 40)  # ...while the accepted one finishes
        unloading.join(timeout=10)
        assert not unloading.is_alive() and engine.stats().adapters == ("y",)
        assert all("x" not in layer.lora_A for layer in lora_layers(engine.model).values())
        assert list(on_base.result().token_ids) == reference(merged, None, PROMPTS[0], 40)
        assert list(on_y.result().token_ids) == reference(merged, "y", PROMPTS[2], 30)
        engine.unload_adapter("y")
        assert not lora_layers(engine.model)  # every adapter gone: the plain base again
        with pytest.raises(UnknownModelError):
            engine.unload_adapter("y")
