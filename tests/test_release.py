"""`helox run` with a `release` section: train → evaluate → export → parity → register → promote
through the gates, one line of progress and one of result per stage; a refused promotion
stops the job and keeps what the earlier stages wrote."""

import json
import textwrap

import yaml
from typer.testing import CliRunner

from helox.cli import app
from helox.registry.store import open_registry
from helox.testing.tiny import tiny_raw_config

SUITE = """
    name: {name}
    tasks:
      - {{name: val, type: perplexity, source: validation, max_documents: 4, max_tokens: 64,
         thresholds: {{ppl: {{max: {max_ppl}}}}}}}
    """


def recipe(tmp_path, max_ppl: float, name: str) -> str:
    suite = tmp_path / f"{name}.yaml"
    suite.write_text(textwrap.dedent(SUITE.format(name=name, max_ppl=max_ppl)))
    raw = tiny_raw_config(tmp_path / "ws")
    raw["train"] |= {"max_steps": 8, "eval_every_steps": 0}
    raw["release"] = {"suite": str(suite), "exports": ["hf", "gguf"], "gguf_type": "F16",
                      "model_name": "tiny", "promote_to": "staging"}
    path = tmp_path / f"recipe-{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_the_main_job_ends_registered_and_promoted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HELOX_PRINCIPAL", "carol")
    result = CliRunner().invoke(app, ["run", recipe(tmp_path, 1e6, "lax"), "--json"])
    assert result.exit_code == 0, result.output
    stages = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("✓")]
    assert stages == ["eval", "export", "parity", "register", "promote"]
    done = json.loads(result.stdout)["release"]
    assert done["eval"]["passed"] and done["parity"]["passed"]
    assert set(done["exports"]) == {"hf", "gguf"} and done["registered"] == "models:/tiny/1"
    registry = open_registry(tmp_path / "ws")
    staged = registry.version("tiny", "@staging")
    assert staged.version == "1" and staged.lineage()["parity"] == "passed"
    assert staged.lineage()["eval.lax"] == "passed"


def test_a_refused_promotion_stops_the_job_and_keeps_the_version(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", recipe(tmp_path, 1.5, "strict")])
    assert result.exit_code == 1
    assert "thresholds:strict" in result.output and "needs ≤ 1.5" in result.output
    registry = open_registry(tmp_path / "ws")
    assert registry.version("tiny", "@dev").version == "1"
    assert registry.holder("tiny", "staging") is None
