"""The run survives its process dying: `kill -9` at moments the test picks (between saves,
mid-save, right after a save) and SIGTERM or SIGINT. Each interrupted run is resumed by the same
`helox train` command and must end bit-identical to one uninterrupted run (CPU, fp32)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from helox.config import save_config
from helox.observe.metrics import read_metrics, without_wall_clock
from helox.testing.tiny import tiny_config
from helox.checkpoint import list_checkpoints
from helox.training.loop import train

STEPS = 24
OVERRIDES = [f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=2",
             "train.eval_every_steps=6"]


def start_cli(recipe, run_dir, env_extra=None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "helox.cli", "train", str(recipe),
                             "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass  # the line being written
    return max(steps)


def wait_for_step(process, run_dir, step, timeout_s=120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while logged_step(run_dir) < step:
        if process.poll() is not None:
            pytest.fail(f"helox train exited ({process.returncode}) before step {step}:\n"
                        + process.stdout.read())
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"step {step} not reached in {timeout_s} s")
        time.sleep(0.01)


def untimed(run_dir) -> list[dict]:
    return [without_wall_clock(r)
            for r in read_metrics(run_dir / "metrics.jsonl")]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir)[0] / "model.safetensors")


@pytest.fixture
def recipe(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace, [*OVERRIDES, f"data.version={tiny_dataset.version}"])
    path = tmp_path / "recipe.yaml"
    save_config(config, path)
    return config, path


@pytest.fixture
def straight(recipe, tiny_dataset, tmp_path):
    run_dir = tmp_path / "straight"
    train(recipe[0], run_dir, tiny_dataset, console=Console(quiet=True))
    return run_dir


def test_kill_9_at_random_moments_then_resume_is_bit_exact(recipe, straight, tmp_path):
    rng = random.Random(20261122)
    run_dir = tmp_path / "killed"
    # (step to reach, extra delay in seconds) before each SIGKILL: mid-interval, right after
    # a checkpoint step is logged (its save may be in flight), and late in the run; between
    # the second and the third, a crash in the middle of an async save.
    moments = [(rng.randint(2, 6), rng.uniform(0, 0.2)), (8, 0.0),
               (rng.randint(21, 23), rng.uniform(0, 0.2))]
    for step, delay_s in moments:
        process = start_cli(recipe[1], run_dir)
        wait_for_step(process, run_dir, step)
        time.sleep(delay_s)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        if step == 8:  # and then mid-way through the background write of step 20's checkpoint
            crash = start_cli(recipe[1], run_dir, {"HELOX_FAULT_CRASH_SAVE_AT": "20"})
            assert crash.wait(timeout=300) == -signal.SIGKILL
            assert list((run_dir / "checkpoints").glob(".tmp-step-00000020-*"))
    finish = start_cli(recipe[1], run_dir)
    output, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, output
    assert "resuming from step-" in output
    assert untimed(run_dir) == untimed(straight), f"moments {moments}"
    expected, got = final_weights(straight), final_weights(run_dir)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_and_exits_0_then_resumes_exactly(recipe, straight, tmp_path,
                                                               signum):
    run_dir = tmp_path / "preempted"
    process = start_cli(recipe[1], run_dir)
    wait_for_step(process, run_dir, 5)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    stopped = [e for e in read_metrics(run_dir / "events.jsonl")
               if e["event"] == "stopped_by_signal"]
    assert len(stopped) == 1 and stopped[0]["signal"] == signal.Signals(signum).name
    step = stopped[0]["step"]
    assert 5 <= step < STEPS and list_checkpoints(run_dir)[0].name == f"step-{step:08d}"
    assert f"{signal.Signals(signum).name}: stopped after step" in output
    finish = start_cli(recipe[1], run_dir)
    output, _ = finish.communicate(timeout=300)
    assert finish.returncode == 0, output
    # The same records, plus the line of the checkpoint the signal caused.
    extra = {"step": step, "checkpoint": f"step-{step:08d}"}
    assert [r for r in untimed(run_dir) if r != extra] == untimed(straight)
