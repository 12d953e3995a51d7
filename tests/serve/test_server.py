"""`helox serve` over loopback with the official `openai` client: completions and chat, streamed
and not, the same tokens as the engine; OpenAI-shaped errors for bad requests; tool calls in
OpenAI's shape; vLLM's adapter endpoints; a sticky canary that rolls a failing candidate back;
and a registry alias served by name."""

import json
import threading

import httpx
import openai
import pytest
from rich.console import Console

from helox.checkpoint.fingerprint import model_fingerprint
from helox.chat.templates import ChatTemplate
from helox.errors import HeloxError
from helox.finetune.lora import LoraConfig
from helox.serve.app import ServeState, _assistant_message, _tool_free_prefix
from helox.serve.canary import CanaryConfig, Router, bucket
from helox.serve.chat import ChatSetup, turn_end
from helox.serve.deploy import Deployment
from helox.serve.engine import Engine
from helox.serve.sampling import SamplingParams
from helox.events.outbox import Outbox
from helox.export.exporter import export_model
from helox.registry.lineage import gather
from helox.registry.store import open_registry
from helox.testing.adapters import write_random_adapter
from helox.serve.server import ServeConfig, open_state, serve_in_thread
from helox.testing.tiny import tiny_config
from helox.training.loop import train

from .conftest import EOS

TEMPLATE = "chatml"


def deployment(model, tokenizer, version="1", name="tiny") -> Deployment:
    template = ChatTemplate.builtin(TEMPLATE, {"eos_token": EOS})
    turn_ids, turn_strings = turn_end(template, tokenizer)
    eos_id = tokenizer.token_to_id(EOS)
    chat = ChatSetup(template, frozenset({eos_id, *turn_ids}), turn_strings)
    engine = Engine(model, tokenizer, eos_id, name=name, chat=chat)
    return Deployment(name, version, f"test:{version}", engine, model_fingerprint(model))


@pytest.fixture
def served(model, tokenizer):
    state = ServeState(Router(deployment(model, tokenizer), None, CanaryConfig()))
    with serve_in_thread(state) as running:
        yield running


def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="-", max_retries=0)


def test_completions_equal_the_engine_streamed_or_not(served):
    engine = served.deployments[0].engine
    expected = engine.submit(engine.document_prompt("the quick"), SamplingParams(
        max_tokens=12, temperature=0)).result()
    answer = client(served).completions.create(model="tiny", prompt="the quick", max_tokens=12,
                                               temperature=0)
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.completion_tokens == expected.usage.completion_tokens
    assert answer.usage.prompt_tokens == expected.usage.prompt_tokens
    chunks = list(client(served).completions.create(
        model="tiny", prompt="the quick", max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == answer.usage.total_tokens
    raw = httpx.post(f"{served.url}/v1/completions", json={
        "model": "tiny", "prompt": "the", "max_tokens": 3, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]") and raw.startswith("data: {")
    seeded = [client(served).completions.create(model="tiny", prompt="a bird", max_tokens=10,
                                                temperature=1.0, seed=5, n=2)
              for _ in range(2)]
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    assert [m.id for m in client(served).models.list().data] == ["tiny"]


def test_chat_renders_the_template_and_streams_deltas(served):
    messages = [{"role": "user", "content": "the quick brown fox"}]
    answer = client(served).chat.completions.create(model="tiny", messages=messages,
                                                    max_tokens=10, temperature=0)
    message = answer.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert answer.usage.prompt_tokens > 10  # the template's header tokens are in the prompt
    chunks = list(client(served).chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


@pytest.mark.parametrize("body, status, code", [
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "invalid_value"),
    ({"model": "tiny", "prompt": "the " * 80, "max_tokens": 8}, 400, "context_length_exceeded"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "invalid_value"),
    ({"model": "tiny", "prompt": "x", "bogus": 1}, 400, "extra_forbidden"),
    ({"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "value_error"),
    ({"model": "tiny"}, 400, "missing"),
])
def test_bad_requests_get_openai_error_bodies(served, body, status, code):
    answer = httpx.post(f"{served.url}/v1/completions", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert client(served).completions.create(model="tiny", prompt="x", max_tokens=2)  # alive


def test_malformed_json_and_unknown_routes_are_4xx(served):
    bad = httpx.post(f"{served.url}/v1/chat/completions", content=b"{nope",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "json_invalid"
    assert httpx.get(f"{served.url}/v1/nowhere").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(served).chat.completions.create(model="other", messages=[
            {"role": "user", "content": "hi"}])


def test_tool_calls_come_back_in_openai_shape():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}' \
           '\n</tool_call>'
    message, reason = _assistant_message(text, "stop", "chatml")
    assert reason == "tool_calls" and message["content"] == "Let me look."
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert _assistant_message("<tool_call>{broken</tool_call>", "stop", "chatml") == (
        {"role": "assistant", "content": "<tool_call>{broken</tool_call>"}, "stop")
    assert _tool_free_prefix("Sure <tool_", "chatml") == len("Sure ")
    assert _tool_free_prefix("Sure <tool_call>{", "chatml") == len("Sure ")
    assert _tool_free_prefix("plain text", None) == len("plain text")


def test_adapters_load_and_unload_at_runtime(served, model, tmp_path):
    config = LoraConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = write_random_adapter(model, tmp_path / "x", config, seed=3,
                                   fingerprint=model_fingerprint(model))
    loaded = httpx.post(f"{served.url}/v1/load_lora_adapter",
                        json={"lora_name": "x", "lora_path": str(adapter)})
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    cards = {m.id: m for m in client(served).models.list().data}
    assert cards["x"].parent == "tiny" and cards["tiny"].parent is None
    engine = served.deployments[0].engine
    expected = engine.submit(engine.document_prompt("the"), SamplingParams(
        max_tokens=8, temperature=0), model="x").result().text
    assert client(served).completions.create(model="x", prompt="the", max_tokens=8,
                                             temperature=0).choices[0].text == expected
    again = httpx.post(f"{served.url}/v1/load_lora_adapter",
                       json={"lora_name": "x", "lora_path": str(adapter)})
    assert again.status_code == 400 and "already served" in again.json()["error"]["message"]
    gone = httpx.post(f"{served.url}/v1/unload_lora_adapter", json={"lora_name": "x"})
    assert gone.status_code == 200 and "removed successfully" in gone.text
    with pytest.raises(openai.NotFoundError):
        client(served).completions.create(model="x", prompt="the", max_tokens=2)
    assert httpx.post(f"{served.url}/v1/unload_lora_adapter",
                      json={"lora_name": "x"}).status_code == 404
    missing = httpx.post(f"{served.url}/v1/load_lora_adapter",
                         json={"lora_name": "y", "lora_path": str(tmp_path / "absent")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"


def test_the_canary_is_sticky_per_user_and_rolls_back_a_failing_candidate(
        model, other_model, tokenizer):
    rollbacks = []
    prod, candidate = deployment(model, tokenizer, "1"), deployment(other_model, tokenizer, "2")
    router = Router(prod, candidate, CanaryConfig(percent=50, min_requests=4,
                                                  max_latency_ratio=1000),
                    lambda decision: rollbacks.append(decision))
    users = [f"user-{i}" for i in range(24)]
    with serve_in_thread(ServeState(router)) as served:
        first = {user: _version(served, user) for user in users}
        seen = {user: _version(served, user) for user in users}
        assert seen == first  # each user lands on the same version every time
        expected = {u: "2" if bucket(u) < 5000 else "1" for u in users}
        assert seen == expected and set(seen.values()) == {"1", "2"}

        candidate.engine.model.decode = _broken  # the candidate now fails every request
        statuses = [_status(served, u) for u in users for _ in range(2)]
        assert 500 in statuses and len(rollbacks) == 1
        assert router.percent == 0 and "error rate" in router.decision.reason
        assert {_version(served, u) for u in users} == {"1"}  # all back on prod
        snapshot = httpx.get(f"{served.url}/admin/canary").json()
        assert snapshot["percent"] == 0 and snapshot["rolled_back"].startswith("candidate error")
        metrics = httpx.get(f"{served.url}/metrics").text
        assert 'role="candidate",status="error"' in metrics and "helox_serve_canary_percent 0.0" \
            in metrics
        del candidate.engine.model.decode


def _version(served, user: str, model: str = "tiny") -> str:
    answer = httpx.post(f"{served.url}/v1/completions", json={
        "model": model, "prompt": "the", "max_tokens": 2, "user": user})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-helox-model-version"]


def _status(served, user: str, model: str = "tiny") -> int:
    return httpx.post(f"{served.url}/v1/completions", json={
        "model": model, "prompt": "the", "max_tokens": 2, "user": user}).status_code


def test_a_failed_candidate_gate_is_never_routed(model, other_model, tokenizer):
    prod, candidate = deployment(model, tokenizer, "1"), deployment(other_model, tokenizer, "2")
    candidate.eval_gate = "failed"
    router = Router(prod, candidate, CanaryConfig(percent=100))
    assert router.percent == 0 and "evaluation failed" in router.decision.reason
    for deployed in (prod, candidate):
        deployed.engine.close()


def test_registry_versions_are_served_by_name_and_a_canary_rollback_is_published(
        tiny_dataset, workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("HELOX_PRINCIPAL", "dana")
    run_dir = tmp_path / "run"
    train(tiny_config(workspace, ["train.max_steps=4", "checkpoint.every_steps=2",
                                  "train.eval_every_steps=0"]), run_dir, tiny_dataset,
          console=Console(quiet=True))
    with open_registry(tmp_path / "ws") as registry:
        for step in (2, 4):
            export_model(run_dir / "checkpoints" / f"step-{step:08d}", "hf")
            registry.register(gather(run_dir / "checkpoints" / f"step-{step:08d}"), "tiny-reg",
                              alias=None)
    config = ServeConfig(model="models:/tiny-reg/1", candidate="models:/tiny-reg/2",
                         workspace=tmp_path / "ws", device="cpu",
                         canary=CanaryConfig(percent=100, min_requests=3,
                                             max_latency_ratio=1000))
    with serve_in_thread(open_state(config)) as served:
        answer = client(served).completions.create(model="tiny-reg", prompt="In the",
                                                   max_tokens=6, temperature=0, user="u1")
        assert answer.system_fingerprint.startswith("helox-2-")  # 100%: the candidate
        reference = Engine.from_checkpoint(run_dir / "checkpoints" / "step-00000004")
        try:
            expected = reference.submit(reference.document_prompt("In the"), SamplingParams(
                max_tokens=6, temperature=0)).result().text
        finally:
            reference.close()
        assert answer.choices[0].text == expected
        prod, candidate = served.deployments
        served.state.router.set_percent(0)
        for _ in range(3):  # prod's own figures, for the comparison
            assert _status(served, "u0", "tiny-reg") == 200
        served.state.router.set_percent(100)
        candidate.engine.model.decode = _broken
        assert [_status(served, "u1", "tiny-reg") for _ in range(3)] == [500] * 3
        assert served.state.router.percent == 0
        assert _version(served, "u1", "tiny-reg") == "1"  # back on prod; registry untouched
    stored = [e for e in Outbox(tmp_path / "ws").events() if e.event == "model-rolled-back"]
    assert len(stored) == 1
    event = stored[0].entry
    assert (event["alias"], event["version"], event["previous_version"]) == ("canary", "1", "2")
    assert event["registry_path"] == "models:/tiny-reg/1"
    assert json.loads(event["metadata"])["scope"] == "canary"
    with pytest.raises(HeloxError, match="no version or alias 'prod'"):
        open_state(ServeConfig(model="models:/tiny-reg@prod", workspace=tmp_path / "ws"))


def _broken(*args, **kwargs):
    raise RuntimeError("injected: the candidate's kernel fails")


def test_the_engines_are_closed_when_the_server_stops(model, tokenizer):
    state = ServeState(Router(deployment(model, tokenizer), None, CanaryConfig()))
    with serve_in_thread(state) as served:
        engine = served.deployments[0].engine
    assert not any(t.name == "helox-engine" and t.is_alive() for t in threading.enumerate()
                   if t is getattr(engine, "_thread", None))
    with pytest.raises(HeloxError):
        engine.submit([1, 2], SamplingParams(max_tokens=1))
