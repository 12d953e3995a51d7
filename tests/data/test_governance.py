"""Access control as the CLI and the trainer see it (the rules themselves: test_access.py)."""

import json

from typer.testing import CliRunner

from helox.cli import app
from helox.data import access
from helox.testing.tiny import tiny_config

TRAIN_OVERRIDES = ["train.max_steps=2", "optim.warmup_steps=1", "train.eval_every_steps=0",
                   "checkpoint.every_steps=2"]


def cli(args, principal, monkeypatch):
    monkeypatch.setenv("HELOX_PRINCIPAL", principal)
    return CliRunner().invoke(app, args, terminal_width=200)


def write_recipe(tmp_path, overrides=()):
    config = tiny_config(tmp_path, overrides=[*TRAIN_OVERRIDES, *overrides], train_documents=40,
                         val_documents=4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(config.model_dump(mode="json")))
    return recipe


def test_training_refuses_an_unreadable_dataset_until_the_owner_grants(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, ["data.name=private"])
    built = cli(["data", "prepare", str(recipe)], "alice", monkeypatch)
    assert built.exit_code == 0, built.output
    denied = cli(["train", str(recipe), "--run-dir", str(tmp_path / "bob-run")], "bob",
                 monkeypatch)
    assert denied.exit_code == 1
    error = denied.exception
    assert "bob" in error.message and "private" in error.message and "alice" in error.message
    assert "helox data grant private bob --read" in error.hint
    gov = access.governance_dir(tmp_path)
    [deny] = [e for e in access.AuditLog(gov).entries(principal="bob") if e["action"] == "deny"]
    assert deny["dataset"] == "private" and deny["details"]["attempted"] == "read"
    assert not (tmp_path / "bob-run").exists()

    not_owner = cli(["data", "grant", "private", "bob", "--read", "-w", str(tmp_path)], "bob",
                    monkeypatch)
    assert not_owner.exit_code == 1
    granted = cli(["data", "grant", "private", "bob", "--read", "-w", str(tmp_path)], "alice",
                  monkeypatch)
    assert granted.exit_code == 0 and "bob: read" in granted.output
    trained = cli(["train", str(recipe), "--run-dir", str(tmp_path / "bob-run")], "bob",
                  monkeypatch)
    assert trained.exit_code == 0, trained.output
    actions = [(e["principal"], e["action"]) for e in access.AuditLog(gov).entries()]
    assert actions[0] == ("alice", "write") and ("bob", "deny") in actions
    assert actions[-1] == ("bob", "read")

    listing = cli(["data", "audit", "-w", str(tmp_path), "--principal", "bob"], "x", monkeypatch)
    assert listing.exit_code == 0 and "deny" in listing.output and "grant" in listing.output


def test_audit_verify_from_the_cli_catches_an_edited_entry(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path)
    assert cli(["data", "prepare", str(recipe)], "alice", monkeypatch).exit_code == 0
    clean = cli(["data", "audit", "--verify", "-w", str(tmp_path)], "alice", monkeypatch)
    assert clean.exit_code == 0 and "intact" in clean.output
    log = access.governance_dir(tmp_path) / "audit.jsonl"
    lines = log.read_text().splitlines()
    lines[0] = lines[0].replace('"alice"', '"mallory"')
    log.write_text("\n".join(lines) + "\n")
    tampered = cli(["data", "audit", "--verify", "-w", str(tmp_path)], "alice", monkeypatch)
    assert tampered.exit_code == 1 and "line 1" in tampered.exception.message


def test_a_writer_without_grant_cannot_publish_a_new_version(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, ["data.name=shared"])
    assert cli(["data", "prepare", str(recipe)], "alice", monkeypatch).exit_code == 0
    other = write_recipe(tmp_path, ["data.name=shared", "tokenizer.vocab_size=300"])
    denied = cli(["data", "prepare", str(other)], "bob", monkeypatch)
    assert denied.exit_code == 1 and "write" in denied.exception.message
    assert len([p for p in (tmp_path / "datasets").iterdir() if not p.name.startswith(".")]) == 1
