import os
import subprocess
import sys

import pytest
import yaml

from helox.testing.tiny import tiny_raw_config

COMMANDS = [[], ["run"], ["data"], ["data", "prepare"], ["train"], ["generate"], ["report"],
            ["explain"], ["eval"]]


def helox(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "helox.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "helox")
def test_every_command_has_help_with_an_example(command):
    result = helox(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    assert "helox" in result.stdout


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
        assert artifact in result.stderr.replace("\n", " ") or artifact in result.stderr
    assert "sample: 'In the'" in result.stderr
    assert (run_dir / "report.html").stat().st_size > 1_000_000  # the dashboard, plotly inline
    generated = helox("generate", str(run_dir), "--prompt", "In the", "--max-new-tokens", "5",
                      "--temperature", "0")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("In the") and len(generated.stdout) > len("In the\n")
    again = helox("generate", str(run_dir / "checkpoints" / "step-00000006"), "--prompt",
                  "In the", "--max-new-tokens", "5", "--temperature", "0")
    assert again.stdout == generated.stdout
