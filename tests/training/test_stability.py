"""Bad-step detection and recovery: the spike detector against a direct computation, and the
loop's rollback, LR cool-down, data-window skip and budget on injected faults."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from helox.training.stability import RollbackConfig, SpikeConfig
from helox.errors import HeloxError
from helox.observe.metrics import read_metrics, without_wall_clock
from helox.testing.tiny import tiny_config
from helox.training.loop import train
from helox.training.stability import Recovery, SpikeDetector

# Spike detection from step 6 on, checkpoints every 5 steps, rollback after 3 bad steps.
STABLE = ["train.max_steps=24", "train.eval_every_steps=0", "checkpoint.every_steps=5",
          "checkpoint.keep_last=4", "stability.spike={window_steps: 8, min_history: 5}",
          "stability.rollback={after_bad_steps: 3, lr_factor: 0.5, cooldown_steps: 4}"]


def run(config, dataset, run_dir, until_step=None):
    return train(config, run_dir, dataset, until_step=until_step, console=Console(quiet=True))


def step_records(run_dir):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def events(run_dir):
    path = run_dir / "events.jsonl"
    return read_metrics(path) if path.is_file() else []


def test_robust_z_score_is_median_and_scaled_mad_of_the_window():
    detector = SpikeDetector(SpikeConfig(window_steps=6, min_history=4, z_threshold=5.0))
    losses = [3.0, 2.9, 3.2, 3.1, 2.8, 3.05, 3.0]
    for step, loss in enumerate(losses, start=1):
        assert detector.record(step, loss, None) is None
    window = np.array(losses[-6:])  # the window keeps the newest window_steps losses
    median = np.median(window)
    mad = np.median(np.abs(window - median))
    assert detector.z_score(4.0) == pytest.approx((4.0 - median) / (1.4826 * mad))
    assert detector.is_spike(4.0) and not detector.is_spike(3.2)


def test_detector_waits_for_history_and_needs_a_relative_jump():
    detector = SpikeDetector(SpikeConfig(window_steps=10, min_history=3,
                                         min_relative_increase=0.1))
    for step in (1, 2):
        detector.record(step, 2.0, None)
    assert detector.z_score(100.0) is None and not detector.is_spike(100.0)
    detector.record(3, 2.0, None)
    # A flat, noiseless history has MAD 0: a 5% wiggle has a huge z-score, but is no spike.
    assert detector.z_score(2.1) > 1e6 and not detector.is_spike(2.1)
    assert detector.is_spike(2.3)


def test_streak_counts_consecutive_bad_steps_and_bad_losses_stay_out_of_the_window():
    detector = SpikeDetector(SpikeConfig(window_steps=10, min_history=3))
    for step in (1, 2, 3):
        detector.record(step, 2.0 + 0.01 * step, None)
    assert detector.gate(9.0, 1.0) == "loss_spike"
    assert detector.record(4, 9.0, "loss_spike") == "loss_spike"
    assert detector.record(5, math.nan, "nonfinite") == "nonfinite"
    assert (detector.streak, detector.streak_start) == (2, 4)
    assert len(detector.history) == 3
    assert detector.record(6, 2.02, None) is None and detector.streak == 0
    restored = SpikeDetector(detector.config)
    restored.load_state_dict(detector.state_dict())
    assert restored.state_dict() == detector.state_dict()


def test_a_rollback_during_a_cooldown_cuts_the_lr_again():
    recovery = Recovery(RollbackConfig(lr_factor=0.5, cooldown_steps=10, max_rollbacks=2))
    assert recovery.lr_factor(1) == 1.0
    recovery.start_cooldown(20)  # after step 20: steps 21..30 are cut
    assert [recovery.lr_factor(s) for s in (20, 21, 30, 31)] == [1.0, 0.5, 0.5, 1.0]
    recovery.start_cooldown(25)
    assert recovery.lr_factor(26) == 0.25 and recovery.lr_factor(35) == 0.25
    assert recovery.lr_factor(36) == 1.0 and recovery.budget_left == 0
    recovery.start_cooldown(50)  # a cool-down that had ended does not compound
    assert recovery.lr_factor(51) == 0.5


def test_a_clean_run_raises_no_alarm(tiny_dataset, workspace, tmp_path):
    run(tiny_config(workspace, STABLE), tiny_dataset, tmp_path / "clean")
    assert events(tmp_path / "clean") == []
    assert not any("skipped" in r for r in step_records(tmp_path / "clean"))


def test_a_persistent_spike_rolls_back_cuts_the_lr_and_skips_the_data_window(
        tiny_dataset, workspace, tmp_path):
    clean = tiny_config(workspace, STABLE)
    spiky = tiny_config(workspace, [*STABLE, "faults.spike_at_steps=[13, 14, 15]"])
    run(clean, tiny_dataset, tmp_path / "clean")
    result = run(spiky, tiny_dataset, tmp_path / "spiky")
    assert result.step == 24  # the run completes
    log = events(tmp_path / "spiky")
    assert [(e["step"], e["event"], e["runbook"]) for e in log] == [
        (13, "loss_spike", "loss-spike"), (14, "loss_spike", "loss-spike"),
        (15, "loss_spike", "loss-spike"), (15, "rollback", "rollback")]
    rollback = log[-1]
    assert rollback["checkpoint"] == "step-00000010" and rollback["skipped_data_steps"] == [11, 15]
    assert rollback["bad_steps"] == [13, 15] and rollback["cooldown_until_step"] == 20
    assert log[0]["z_score"] > 6 and log[0]["loss"] > 5 * log[0]["median_loss"]
    # The checkpoint written right after the rollback holds the weights of step 10.
    checkpoints = tmp_path / "spiky" / "checkpoints"
    restored = load_file(checkpoints / "step-00000015" / "model.safetensors")
    before = load_file(checkpoints / "step-00000010" / "model.safetensors")
    assert all(torch.equal(restored[k], before[k]) for k in before)
    spiky_steps, clean_steps = step_records(tmp_path / "spiky"), step_records(tmp_path / "clean")
    # LR halved for the cool-down (steps 16-19), then back on the schedule.
    for s in range(16, 25):
        factor = 0.5 if s < 20 else 1.0
        assert spiky_steps[s - 1]["lr"] == pytest.approx(factor * clean_steps[s - 1]["lr"])
        assert spiky_steps[s - 1].get("lr_cooldown_factor", 1.0) == factor
    # The data moved on: after the rollback the loader is where the clean run's is at step
    # 15, although the weights are those of step 10.
    loader_states = [torch.load(tmp_path / name / "checkpoints" / "step-00000015" / "state.pt",
                                weights_only=True)["loader"] for name in ("spiky", "clean")]
    assert loader_states[0] == loader_states[1]
    assert [r.get("skipped") for r in spiky_steps[12:15]] == ["loss_spike"] * 3
    assert abs(spiky_steps[-1]["loss"] - clean_steps[-1]["loss"]) < 0.3
    runbooks = (Path(__file__).resolve().parents[2] / "docs" / "runbooks.md").read_text()
    assert "## loss-spike" in runbooks and "## rollback" in runbooks


def test_resume_after_a_rollback_is_bit_identical(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace, [*STABLE, "faults.spike_at_steps=[13, 14, 15]",
                                     "checkpoint.every_steps=2"])
    run(config, tiny_dataset, tmp_path / "straight")
    run(config, tiny_dataset, tmp_path / "stopped", until_step=14)  # inside the streak
    run(config, tiny_dataset, tmp_path / "stopped")
    untimed = [without_wall_clock(r)
               for r in step_records(tmp_path / "straight")]
    assert [without_wall_clock(r)
            for r in step_records(tmp_path / "stopped")] == untimed
    assert events(tmp_path / "stopped") == events(tmp_path / "straight")


def test_past_the_rollback_budget_the_run_stops_with_a_diagnosis(tiny_dataset, workspace,
                                                                 tmp_path):
    config = tiny_config(workspace, [*STABLE, "stability.rollback.max_rollbacks=1",
                                     "faults.spike_at_steps=[8, 9, 10, 11, 12, 13, 14]"])
    with pytest.raises(HeloxError, match="rollback budget is spent") as caught:
        run(config, tiny_dataset, tmp_path / "run")
    assert "docs/runbooks.md#rollback-budget" in caught.value.hint
    log = events(tmp_path / "run")
    assert [e["event"] for e in log if e["event"] != "loss_spike"] == ["rollback", "run_stopped"]
    assert log[-1]["severity"] == "critical" and log[-1]["step"] == 13
    # What the hint offers: a new run with a lower LR from the stopped run's newest checkpoint.
    assert "train.init_from=" in caught.value.hint
    calmer = tiny_config(workspace, [*STABLE, "optim.lr=0.001",
                                     f"train.init_from={tmp_path / 'run'}"])
    assert run(calmer, tiny_dataset, tmp_path / "calmer").step == 24
    started = events(tmp_path / "calmer")[0]
    assert started["event"] == "initialized_from" and started["weights"]["fresh"] == {}


def test_a_corrupted_batch_is_detected_as_a_spike_and_skipped(tiny_dataset, workspace,
                                                             tmp_path):
    config = tiny_config(workspace, [*STABLE, "stability.spike.z_threshold=3",
                                     "faults.corrupt_batch_at_steps=[12]"])
    run(config, tiny_dataset, tmp_path / "run")
    log = events(tmp_path / "run")
    assert [(e["step"], e["event"]) for e in log] == [(12, "loss_spike")]
    # Uniformly random tokens cost about ln(vocabulary) nats each.
    assert log[0]["loss"] == pytest.approx(math.log(tiny_dataset.vocab_size), rel=0.1)


def test_a_grown_model_starts_from_a_smaller_runs_checkpoint(tiny_dataset, workspace, tmp_path):
    run(tiny_config(workspace, ["train.max_steps=4"]), tiny_dataset, tmp_path / "small")
    grown = tiny_config(workspace, ["train.max_steps=4", "model.num_layers=3",
                                    f"train.init_from={tmp_path / 'small'}"])
    run(grown, tiny_dataset, tmp_path / "grown", until_step=1)
    init = events(tmp_path / "grown")[0]
    assert init["event"] == "initialized_from" and init["checkpoint"].endswith("step-00000004")
    new_layer = {n for n in init["weights"]["fresh"] if n.startswith("blocks.2.")}
    assert new_layer and set(init["weights"]["fresh"]) == new_layer
    assert set(init["optimizer"]["fresh"]) == new_layer
    assert "blocks.1.mlp.up_proj.weight" in init["optimizer"]["loaded"]
    # The old layers carry what the small run learnt: the grown model starts well below a
    # model of the same shape trained from scratch.
    scratch = tiny_config(workspace, ["train.max_steps=4", "model.num_layers=3"])
    run(scratch, tiny_dataset, tmp_path / "scratch", until_step=1)
    warm, cold = (step_records(tmp_path / name)[0]["loss"] for name in ("grown", "scratch"))
    assert warm < cold - 0.25
