"""Each health monitor fires on a series engineered to trigger it, once, and stays silent on a
clean series."""

import numpy as np
import pytest
from rich.console import Console

from helox.errors import HeloxError
from helox.observe.health import (DivergenceConfig, HealthConfig, HealthMonitor,
                                  NanSpikesConfig, StagnationConfig)


def clean_losses(steps=300, seed=0):
    """A decaying loss with noise, like a healthy run."""
    rng = np.random.default_rng(seed)
    return [4.0 * np.exp(-s / 150) + 2.0 + 0.05 * rng.standard_normal() for s in range(steps)]


def fired(monitor, losses, skips=()):
    alerts = []
    for step, loss in enumerate(losses, start=1):
        alerts += monitor.on_step(step, loss, "nonfinite" if step in skips else None)
    return alerts


def test_divergence_fires_once_when_the_loss_climbs_and_not_on_a_clean_run():
    config = HealthConfig(divergence=DivergenceConfig(window_steps=20, rise_fraction=0.25))
    assert fired(HealthMonitor(config), clean_losses()) == []
    climbing = clean_losses(200) + [2.3 * 1.01 ** s for s in range(100)]
    alerts = fired(HealthMonitor(config), climbing)
    assert [a.monitor for a in alerts] == ["divergence"]
    assert alerts[0].severity == "critical" and alerts[0].action == "rollback"
    event = alerts[0].event(250)
    assert event["runbook"] == "alert-divergence" and event["median_loss"] > \
        1.25 * event["best_median_loss"]


def test_nan_spikes_count_nonfinite_skips_in_a_sliding_window():
    config = HealthConfig(nan_spikes=NanSpikesConfig(window_steps=50, max_skipped=2))
    assert fired(HealthMonitor(config), clean_losses(200), skips={10, 70, 130}) == []
    alerts = fired(HealthMonitor(config), clean_losses(200), skips={10, 20, 30, 150})
    assert [(a.monitor, a.values["nonfinite_steps_in_window"]) for a in alerts] == [
        ("nan_spikes", 3)]


def test_stagnation_fires_when_the_validation_loss_stops_improving():
    monitor = HealthMonitor(HealthConfig(stagnation=StagnationConfig(window_evals=3)))
    improving = [4.0, 3.5, 3.2, 3.0, 2.9, 2.85, 2.8]
    assert sum((monitor.on_eval(s, v) for s, v in enumerate(improving)), []) == []
    flat = [2.81, 2.80, 2.805, 2.802]
    alerts = sum((monitor.on_eval(10 + s, v) for s, v in enumerate(flat)), [])
    assert [a.monitor for a in alerts] == ["stagnation"]
    assert monitor.on_eval(20, 2.5) == []  # improving again clears it
    assert "stagnation" not in monitor.firing


def test_probe_monitors_fire_on_collapse_dead_growth_and_drift():
    monitor = HealthMonitor(HealthConfig())
    healthy = {"attn_entropy.layer0.head0": 1.2, "attn_entropy.layer0.head1": 0.9,
               "attn_entropy.layer0": 1.05, "dead_neurons.layer0": 0.02,
               "token_drift_js": 0.01}
    assert monitor.on_sample(50, healthy) == []
    sick = healthy | {"attn_entropy.layer0.head1": 0.001, "dead_neurons.layer0": 0.30,
                      "token_drift_js": 0.4}
    alerts = monitor.on_sample(100, sick)
    assert sorted(a.monitor for a in alerts) == ["dead_units", "drift", "entropy_collapse"]
    collapse = next(a for a in alerts if a.monitor == "entropy_collapse")
    assert collapse.values["collapsed_heads"] == ["layer0.head1"]
    assert monitor.on_sample(150, sick) == []  # still firing: not repeated
    assert monitor.on_sample(200, healthy) == []
    assert len(monitor.on_sample(250, sick)) == 3  # re-armed after clearing


def test_state_round_trip_resumes_the_windows():
    monitor = HealthMonitor(HealthConfig(divergence=DivergenceConfig(window_steps=20)))
    fired(monitor, clean_losses(100), skips={5})
    monitor.on_eval(100, 3.0)
    copy = HealthMonitor(monitor.config)
    copy.load_state_dict(monitor.state_dict())
    assert copy.state_dict() == monitor.state_dict()


def test_a_diverging_run_alerts_and_rolls_back(tiny_dataset, workspace, tmp_path):
    from helox.observe.metrics import read_metrics
    from helox.testing.tiny import tiny_config
    from helox.training.loop import train

    # A loss doubled from step 17 on, too mild per step for the spike detector (switched off
    # here), is a divergence: the window's median rises above 1.25 × its best.
    config = tiny_config(workspace, [
        "train.max_steps=30", "train.eval_every_steps=0", "checkpoint.every_steps=5",
        "checkpoint.keep_last=5", "stability.spike=null", "faults.spike_factor=2.0",
        f"faults.spike_at_steps={list(range(17, 31))}",
        "observe.health.divergence={window_steps: 6, rise_fraction: 0.25}",
        "stability.rollback={after_bad_steps: 3, cooldown_steps: 5, max_rollbacks: 1}"])
    # The fault persists past the one rollback allowed: the second divergence stops the run.
    with pytest.raises(HeloxError, match="rollback budget is spent"):
        train(config, tmp_path / "run", tiny_dataset, console=Console(quiet=True))
    events = read_metrics(tmp_path / "run" / "events.jsonl")
    kinds = [(e["event"], e.get("alert")) for e in events]
    assert kinds == [("alert", "divergence"), ("rollback", None), ("alert", "divergence"),
                     ("run_stopped", None)]
    alert, rollback = events[0], events[1]
    assert alert["severity"] == "critical" and alert["runbook"] == "alert-divergence"
    assert rollback["cause"] == alert["message"] and rollback["step"] == alert["step"]
    assert rollback["restored_step"] < alert["step"] - 6 + 1


def test_telemetry_in_the_loop_drift_alert_and_exact_resume(tiny_dataset, workspace, tmp_path):
    from helox.observe.metrics import read_metrics, without_wall_clock
    from helox.testing.tiny import tiny_config
    from helox.training.loop import train

    sampled = ["train.max_steps=32", "checkpoint.every_steps=8", "train.eval_every_steps=8",
               "observe.telemetry.sample_every_steps=8"]
    quiet = Console(quiet=True)
    train(tiny_config(workspace, sampled), tmp_path / "clean", tiny_dataset, console=quiet)
    assert not (tmp_path / "clean" / "events.jsonl").read_text()  # silent on a clean run
    lines = [r for r in read_metrics(tmp_path / "clean" / "metrics.jsonl")
             if r.get("event") == "telemetry"]
    assert [r["step"] for r in lines] == [8, 16, 24, 32]
    assert {"attn_entropy.layer1.head3", "dead_neurons.layer0", "token_drift_js",
            "rare_token_mass", "loss_p99"} <= set(lines[0])
    maps = read_metrics(tmp_path / "clean" / "telemetry.jsonl")
    assert len(maps) == 4 and len(maps[0]["attn_entropy_LH"]) == 2  # layers × heads
    assert sum(maps[0]["histograms"]["act_norm.layer0"]["counts"]) > 0
    # Random tokens from step 17 on: the window of steps 17-24 drifts, once alerted.
    drifting = tiny_config(workspace, [*sampled, "stability.spike=null",
                                       f"faults.corrupt_batch_at_steps={list(range(17, 33))}"])
    train(drifting, tmp_path / "drift", tiny_dataset, console=quiet)
    alerts = read_metrics(tmp_path / "drift" / "events.jsonl")
    assert [(a["step"], a["alert"]) for a in alerts] == [(24, "drift")]
    assert alerts[0]["token_drift_js"] > 3 * alerts[0]["token_drift_js_floor"]
    # The probes' windows are checkpointed: stopping at 20 and resuming changes nothing.
    train(drifting, tmp_path / "resumed", tiny_dataset, until_step=20, console=quiet)
    train(drifting, tmp_path / "resumed", tiny_dataset, console=quiet)
    straight, resumed = (
        [without_wall_clock(r) for r in read_metrics(tmp_path / name / "metrics.jsonl")
         if "checkpoint" not in r] for name in ("drift", "resumed"))
    assert resumed == straight
