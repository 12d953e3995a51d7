"""The model registry on a real MLflow store: versions carry their artifacts and lineage,
promotion runs the gates (thresholds, a planted regression, parity, an adapter's base) and
refuses with the failing metrics, --force is audited, rollback walks the alias back, every
change is in the hash-chained audit log, and a real `mlflow server` is a config switch."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from helox.checkpoint import load_trained_model, resolve_checkpoint
from helox.checkpoint.fingerprint import model_fingerprint
from helox.cli import app
from helox.data.access import AuditLog, governance_dir
from helox.errors import HeloxError
from helox.eval.runner import evaluate
from helox.events.outbox import Outbox
from helox.export.exporter import export_model
from helox.registry.lineage import gather
from helox.registry.store import PromotionRefused, open_registry
from helox.testing.redis import read_group
from helox.testing.tiny import tiny_config
from helox.training.loop import train

LORA = "lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}"
SUITE = """
    name: gate
    tasks:
      - {name: val, type: perplexity, source: validation, max_documents: 8, max_tokens: 64,
         thresholds: {ppl: {max: 100000}}}
    regression: {max_ppl_increase: 0.01}
    """


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "suite.yaml"
    path.write_text(textwrap.dedent(SUITE))
    return path


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, workspace, tmp_path_factory, suite):
    """Checkpoints at steps 4 (barely trained) and 16, each evaluated on the gate suite and
    exported to Hugging Face's format."""
    run_dir = tmp_path_factory.mktemp("registry") / "run"
    config = tiny_config(workspace, ["train.max_steps=16", "checkpoint.every_steps=4",
                                     "checkpoint.keep_last=4", "train.eval_every_steps=0"])
    train(config, run_dir, tiny_dataset, console=Console(quiet=True))
    for step in (4, 16):
        checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
        evaluate(checkpoint, str(suite))
        export_model(checkpoint, "hf")
    return run_dir


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory):
    """An empty MLflow store, migrated once (~1–6 s) and copied into each test's workspace."""
    folder = tmp_path_factory.mktemp("mlflow-template")
    open_registry(folder).names()
    return folder / "registry" / "mlflow.db"


@pytest.fixture
def registry_ws(tmp_path, migrated_store, monkeypatch):
    monkeypatch.setenv("HELOX_PRINCIPAL", "alice")
    monkeypatch.delenv("HELOX_REGISTRY_URI", raising=False)
    (tmp_path / "registry").mkdir()
    shutil.copy(migrated_store, tmp_path / "registry" / "mlflow.db")
    return tmp_path


def checkpoint(run_dir, step):
    return run_dir / "checkpoints" / f"step-{step:08d}"


def test_a_version_carries_its_artifacts_and_lineage(run_dir, registry_ws):
    registry = open_registry(registry_ws)
    info = registry.register(gather(checkpoint(run_dir, 16)), "tiny")
    assert (info.version, info.aliases, info.kind) == ("1", ["dev"], "model")
    lineage = info.lineage()
    source = load_trained_model(checkpoint(run_dir, 16))
    run_info = json.loads((run_dir / "run.json").read_text())
    assert lineage["model_fingerprint"] == model_fingerprint(source.model)
    assert lineage["run_fingerprint"] == run_info["fingerprint"]
    assert lineage["dataset_version"] == run_info["dataset_version"]
    assert lineage["config_sha256"] == run_info["config_sha256"]
    assert lineage["exports"] == "hf" and lineage["eval.gate"] == "passed"
    value, low, high, n = re.fullmatch(r"(\S+) \[(\S+), (\S+)\] n=(\d+)",
                                       lineage["eval.gate.val.ppl"]).groups()
    assert float(low) <= float(value) <= float(high) and n == "16"
    # The artifacts: a loadable run folder with the same weights, the export, the eval items.
    loaded = load_trained_model(resolve_checkpoint(registry.model_folder(info), print))
    tokens = torch.arange(12)[None]
    torch.testing.assert_close(loaded.model(tokens), source.model(tokens), rtol=0, atol=0)
    files = registry.artifacts(info)
    assert (files / "exports" / "hf" / "model.safetensors").is_file()
    assert (files / "evals" / "gate" / "items.jsonl").is_file()
    assert not list((files / "model").rglob("optimizer.pt"))


def test_promotion_runs_the_gates_and_refuses_a_regression(run_dir, registry_ws):
    registry = open_registry(registry_ws)
    early = registry.register(gather(checkpoint(run_dir, 4)), "tiny").version
    late = registry.register(gather(checkpoint(run_dir, 16)), "tiny").version
    first = registry.promote("tiny", late, "prod")
    assert first.gates.passed and first.previous is None
    with pytest.raises(PromotionRefused) as refused:
        registry.promote("tiny", early, "prod")  # step 4's perplexity is far worse
    failures = {check.name: check.detail for check in refused.value.report.failures}
    assert list(failures) == ["no regression:gate"]
    assert "val.ppl" in failures["no regression:gate"]
    assert "no regression:gate: val.ppl" in refused.value.message
    assert registry.holder("tiny", "prod").version == late  # nothing moved
    with pytest.raises(HeloxError, match="--force needs --reason"):
        registry.promote("tiny", early, "prod", force=True)
    forced = registry.promote("tiny", early, "prod", force=True, reason="hotfix drill")
    assert forced.forced and not forced.gates.passed
    assert registry.holder("tiny", "prod").version == early

    back = registry.rollback("tiny", "prod")
    assert (back.version, back.previous) == (late, early)
    assert registry.holder("tiny", "prod").version == late
    with pytest.raises(HeloxError, match="no previous holder"):
        registry.rollback("tiny", "prod")

    log = AuditLog(governance_dir(registry_ws))
    entries = [(e["principal"], e["action"], e["version"], e["details"].get("alias"))
               for e in log.entries(dataset="models/tiny")]
    assert entries == [("alice", "register", early, None), ("alice", "promote", early, "dev"),
                       ("alice", "register", late, None), ("alice", "promote", late, "dev"),
                       ("alice", "promote", late, "prod"), ("alice", "refuse", early, "prod"),
                       ("alice", "promote", early, "prod"), ("alice", "rollback", late, "prod")]
    forced_entry = [e for e in log.entries(dataset="models/tiny") if e["details"].get("forced")]
    assert forced_entry[0]["details"]["reason"] == "hotfix drill"
    assert log.verify().ok


def test_thresholds_parity_and_a_missing_evaluation_are_gates(run_dir, registry_ws, tmp_path):
    registry = open_registry(registry_ws)
    strict = tmp_path / "strict.yaml"
    strict.write_text(textwrap.dedent(SUITE).replace("name: gate", "name: strict")
                      .replace("max: 100000", "max: 2"))
    evaluate(checkpoint(run_dir, 8), str(strict))
    export_model(checkpoint(run_dir, 8), "hf")
    parity = checkpoint(run_dir, 8).parent.parent / "exports" / "step-00000008" / "parity.json"
    parity.write_text(json.dumps({"passed": False, "rows": [
        {"name": "gguf Q4_0", "figures": {"mean_kl": 0.5}, "failures": ["mean_kl 0.5 > 0.1"]}]}))
    try:
        version = registry.register(gather(checkpoint(run_dir, 8)), "tiny").version
    finally:
        parity.unlink()
    report = registry.gates(registry.version("tiny", version), "staging", None)
    failed = {check.name for check in report.failures}
    assert failed == {"thresholds:strict", "parity"}
    assert "needs ≤ 2" in next(c.detail for c in report.failures if c.name == "thresholds:strict")

    export_model(checkpoint(run_dir, 12), "hf")  # exported, never evaluated
    bare = registry.register(gather(checkpoint(run_dir, 12)), "tiny").version
    with pytest.raises(PromotionRefused, match="evaluated: no evaluation is registered"):
        registry.promote("tiny", bare, "staging")


def test_registering_needs_an_export_and_a_known_alias(run_dir, registry_ws, tmp_path):
    registry = open_registry(registry_ws)
    with pytest.raises(HeloxError, match="reached through the gates"):
        registry.register(gather(checkpoint(run_dir, 16)), "tiny", alias="prod")
    lone = tmp_path / "lone" / "checkpoints"
    shutil.copytree(checkpoint(run_dir, 16), lone / "step-00000016")
    with pytest.raises(HeloxError, match="has no exports"):
        gather(lone / "step-00000016")
    with pytest.raises(HeloxError, match="no registered model named 'nope'"):
        registry.versions("nope")


def test_an_adapter_is_a_version_of_its_own_gated_on_its_served_base(
        run_dir, registry_ws, tiny_dataset, workspace, tmp_path, suite):
    base = checkpoint(run_dir, 16)
    config = tiny_config(workspace, [f"train.init_from={base}", LORA, "train.max_steps=4",
                                     "checkpoint.every_steps=4", "train.eval_every_steps=0"])
    lora_run = tmp_path / "lora"
    result = train(config, lora_run, tiny_dataset, console=Console(quiet=True))
    evaluate(result.checkpoint, str(suite))
    registry = open_registry(registry_ws)
    with pytest.raises(HeloxError, match="no PEFT export"):
        gather(result.checkpoint)
    export_model(result.checkpoint, "peft")
    with pytest.raises(HeloxError, match="base model .* is not registered"):
        registry.register(gather(result.checkpoint), "tiny-chat")
    base_version = registry.register(gather(base), "tiny").version
    adapter = registry.register(gather(result.checkpoint), "tiny-chat")
    assert adapter.kind == "adapter"
    lineage = adapter.lineage()
    assert (lineage["base.name"], lineage["base.version"]) == ("tiny", base_version)
    assert lineage["base.model_fingerprint"] == model_fingerprint(
        load_trained_model(base).model)
    with pytest.raises(PromotionRefused, match="no version of the base model tiny holds `prod`"):
        registry.promote("tiny-chat", adapter.version, "prod")
    registry.promote("tiny", base_version, "prod")
    promoted = registry.promote("tiny-chat", adapter.version, "prod")
    assert [c.name for c in promoted.gates.checks][-1] == "adapter base"
    assert (registry.artifacts(adapter) / "exports" / "peft" / "adapter_config.json").is_file()


def test_the_cli_lists_shows_promotes_and_rolls_back(run_dir, registry_ws):
    runner = CliRunner()
    ws = ["--workspace", str(registry_ws)]
    for step in (4, 16):
        done = runner.invoke(app, ["registry", "register", str(checkpoint(run_dir, step)),
                                   "--name", "tiny", *ws])
        assert done.exit_code == 0, done.output
    first = runner.invoke(app, ["registry", "promote", "tiny", "1", "--to", "staging", *ws])
    assert first.exit_code == 0, first.output  # nothing holds staging: no baseline
    better = runner.invoke(app, ["registry", "promote", "tiny", "2", "--to", "staging", *ws])
    assert better.exit_code == 0, better.output  # step 16 is better than step 4
    back = runner.invoke(app, ["registry", "promote", "tiny", "1", "--to", "staging", *ws])
    assert back.exit_code == 1 and "FAIL" in back.output
    listed = runner.invoke(app, ["registry", "list", "--json", *ws])
    versions = {v["version"]: v for v in json.loads(listed.output)}
    assert sorted(versions["2"]["aliases"]) == ["dev", "staging"]
    shown = runner.invoke(app, ["registry", "show", "tiny", "@staging", *ws])
    assert shown.exit_code == 0 and "tiny version 2" in shown.output
    rolled = runner.invoke(app, ["registry", "rollback", "tiny", "--alias", "staging", *ws])
    assert rolled.exit_code == 0 and "version 1" in rolled.output


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not healthy(url):
            assert server.poll() is None, "mlflow server exited at start"
            assert time.monotonic() < deadline, "mlflow server did not answer in 90 s"
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_a_tracking_server_is_a_config_switch(run_dir, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HELOX_PRINCIPAL", "bob")
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "platform.yaml").write_text(f"registry: {{tracking_uri: {mlflow_server}}}\n")
    registry = open_registry(tmp_path / "ws")
    assert registry.uri == mlflow_server
    early = registry.register(gather(checkpoint(run_dir, 4)), "tiny").version
    late = registry.register(gather(checkpoint(run_dir, 16)), "tiny").version
    registry.promote("tiny", late, "prod")
    with pytest.raises(PromotionRefused, match="no regression:gate"):
        registry.promote("tiny", early, "prod")
    info = registry.version("tiny", "@prod")
    assert info.source.startswith("mlflow-artifacts:")
    folder = registry.model_folder(info, tmp_path / "download")
    loaded = load_trained_model(resolve_checkpoint(folder, print))
    assert model_fingerprint(loaded.model) == info.model_fingerprint
    assert not (tmp_path / "ws" / "registry").exists()  # nothing went to the local store


def test_registry_changes_reach_a_consumer_group_like_cyrexs(run_dir, registry_ws,
                                                             redis_server, redis_client):
    (registry_ws / "platform.yaml").write_text(f"events: {{redis_url: '{redis_server.url}'}}\n")
    redis_client.xgroup_create("model-events", "cyrex", id="$", mkstream=True)
    with open_registry(registry_ws) as registry:
        early = registry.register(gather(checkpoint(run_dir, 4)), "tiny").version
        late = registry.register(gather(checkpoint(run_dir, 16)), "tiny").version
        registry.promote("tiny", late, "prod")
        registry.promote("tiny", early, "prod", force=True, reason="drill")
        registry.rollback("tiny", "prod")
    events = read_group(redis_client, "model-events")
    assert [(e["event"], e["version"], e.get("alias"), e.get("previous_version"))
            for e in events] == [
        ("model-ready", early, "dev", None), ("model-ready", late, "dev", None),
        ("model-promoted", late, "prod", None), ("model-promoted", early, "prod", late),
        ("model-rolled-back", late, "prod", early)]
    run_fingerprint = json.loads((run_dir / "run.json").read_text())["fingerprint"]
    for event in events:  # the platform's ModelReadyEvent fields, and Cyrex's
        assert {"event", "timestamp", "source", "model_name", "version", "registry_path",
                "metadata", "correlation_id", "idempotency_key"} <= set(event)
        assert event["model_name"] == "tiny" and event["source"] == "helox"
        assert event["registry_path"] == f"models:/tiny/{event['version']}"
        assert event["correlation_id"] == run_fingerprint
        metadata = json.loads(event["metadata"])
        assert metadata["run_fingerprint"] == run_fingerprint and metadata["kind"] == "model"
    ready = load_trained_model(resolve_checkpoint(Path(events[1]["checkpoint_path"]), print))
    assert model_fingerprint(ready.model) == json.loads(events[1]["metadata"])[
        "model_fingerprint"]
    assert redis_client.xpending("model-events", "cyrex")["pending"] == 0


def test_without_redis_the_events_wait_in_the_workspace_outbox(run_dir, registry_ws):
    with open_registry(registry_ws) as registry:
        version = registry.register(gather(checkpoint(run_dir, 16)), "tiny").version
    stored = Outbox(registry_ws).events()
    assert [(e.event, e.entry["version"]) for e in stored] == [("model-ready", version)]
    assert stored[0].stream == "model-events" and not stored[0].to_redis
