import json
import os
import subprocess
import sys

import pytest
import typer
import typer.core
import yaml
from typer.testing import CliRunner

from helox.cli import app
from helox.testing.tiny import tiny_raw_config


def command_paths(group: typer.core.TyperGroup, path: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and group registered under `group`, as its words after `helox` (the
    CLI's own tree, so a new command is checked without anyone listing it here)."""
    paths = [list(path)]
    for name, command in group.commands.items():
        if isinstance(command, typer.core.TyperGroup):
            paths += command_paths(command, (*path, name))
        else:
            paths.append([*path, name])
    return paths


COMMANDS = command_paths(typer.main.get_command(app))


def helox(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "helox.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def test_the_command_tree_is_found():
    assert len(COMMANDS) > 20 and ["data", "prepare"] in COMMANDS
    assert ["provenance", "verify"] in COMMANDS and ["import-hf"] in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "helox")
def test_every_command_has_help_with_an_example(command):
    """In process (the subprocess tests below cover `python -m helox.cli`): ~24 commands."""
    result = CliRunner().invoke(app, [*command, "--help"], prog_name="helox",
                                env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps the description's lines
    assert " ".join(["Example: helox", *command]) in text, result.output


GROUPS = [[name] for name, command in typer.main.get_command(app).commands.items()
          if isinstance(command, typer.core.TyperGroup)]
LEAVES = [c for c in COMMANDS if c and c not in GROUPS]
SERVERS = [["serve"]]
"""Commands that run until stopped: they have no result to print as JSON."""


@pytest.mark.parametrize("command", [c for c in LEAVES if c not in SERVERS], ids=" ".join)
def test_every_command_offers_its_result_as_json(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert "--json" in result.output, result.output


def test_json_goes_to_stdout_and_progress_to_stderr(tmp_path):
    raw = tiny_raw_config(tmp_path / "ws")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = helox("data", "prepare", str(recipe), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)  # nothing else on stdout
    assert (tmp_path / record["path"] / "manifest.json").is_file()
    assert record["version"] in result.stderr  # the progress lines name it too


def test_bad_config_exits_nonzero_naming_each_path_without_traceback(tmp_path):
    raw = tiny_raw_config(tmp_path)
    raw["train"]["bogus_key"] = 1
    raw["optim"]["lr"] = -1
    raw["data"]["train"][0]["path"] = str(tmp_path / "absent.jsonl")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = helox("train", str(recipe), "--set", "train.max_steps=abc")
    assert result.returncode == 2
    for path in ("train.bogus_key", "optim.lr", "data.train.0.path", "train.max_steps"):
        assert path in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_generate_on_empty_folder_says_how_to_fix(tmp_path):
    result = helox("generate", str(tmp_path), "--prompt", "x")
    assert result.returncode == 1
    assert "no valid checkpoint" in result.stderr and "helox train" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_then_generate_end_to_end(tmp_path):
    raw = tiny_raw_config(tmp_path / "ws")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    result = helox("run", str(recipe), "--set", "train.max_steps=6", "--set",
                   "optim.warmup_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "ws" / "runs" / "tiny"
    for artifact in ("dataset version", "tokenizer", "checkpoints", "metrics",
                     str(run_dir / "checkpoints" / "step-00000006"), "unigram entropy"):
        assert artifact in result.stdout  # results on stdout; progress on stderr
    assert "sample: 'In the'" in result.stdout and "step 6/6" in result.stderr
    assert (run_dir / "report.html").stat().st_size > 1_000_000  # the dashboard, plotly inline
    generated = helox("generate", str(run_dir), "--prompt", "In the", "--max-new-tokens", "5",
                      "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("In the") and len(generated.stdout) > len("In the\n")
    again = helox("generate", str(run_dir / "checkpoints" / "step-00000006"), "--prompt",
                  "In the", "--max-new-tokens", "5", "--temperature", "0")
    assert again.stdout == generated.stdout
