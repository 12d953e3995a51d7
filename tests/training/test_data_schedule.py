"""The loader's schedules seen from training: curriculum steps in metrics.jsonl, rebalancing
toward a hard domain, and exact resume with both active."""

import json

import pytest
from rich.console import Console

from helox.observe.metrics import read_metrics, without_wall_clock
from helox.testing.tiny import tiny_mixed_config as mixed_config
from helox.training.loop import train
from helox.training.optim import lr_at

CURRICULUM = [
    "curriculum.seq_len=[{from_step: 0, value: 16}, {from_step: 5, value: 32}]",
    "curriculum.batch_size=[{from_step: 0, value: 2}, {from_step: 3, value: 4}]",
    "curriculum.lr_batch_scaling=sqrt",
    "curriculum.inject=[{from_step: 6, domain: noise, weight: 0.25}]",
    "mixture.weights={drama: 1, scripture: 1, technical: 1, noise: 0}",
    "train.document_masking=true",
]


def step_records(run_dir):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def test_curriculum_changes_happen_at_the_configured_steps(mixed_dataset, mixed_workspace,
                                                           tmp_path):
    config = mixed_config(mixed_workspace, CURRICULUM)
    train(config, tmp_path / "run", mixed_dataset, console=Console(quiet=True))
    records = step_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9))
    # stage `from_step: k` applies once k steps are complete: from the update logged as k + 1
    assert [r["seq_len"] for r in records] == [16] * 5 + [32] * 3
    assert [r["batch_sequences"] for r in records] == [4, 4, 4, 8, 8, 4, 4, 4]
    assert [r["tokens_seen"] for r in records] == [64, 128, 192, 320, 448, 576, 704, 832]
    assert [r["mix_weight.noise"] for r in records] == [0] * 6 + [0.25] * 2
    for record in records:
        full_lr = lr_at(record["step"] - 1, config.optim, config.train.max_steps)
        factor = (2 / 4) ** 0.5 if record["step"] <= 3 else 1.0
        assert record["lr"] == pytest.approx(full_lr * factor, rel=1e-12)


def test_rebalancing_moves_weight_to_the_domain_with_the_highest_excess_loss(
        mixed_dataset, mixed_workspace, tmp_path):
    config = mixed_config(mixed_workspace, [
        "train.max_steps=24", "train.eval_every_steps=0", "optim.lr=0.02",
        "mixture.rebalance={every_steps: 8, learning_rate: 1.0, floor: 0.05}"])
    train(config, tmp_path / "run", mixed_dataset, console=Console(quiet=True))
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    updates = [m for m in metrics if m.get("event") == "rebalance"]
    assert [u["step"] for u in updates] == [8, 16, 24]
    domains = ["drama", "noise", "scripture", "technical"]
    for update in updates:
        losses = {d: update[f"rebalance_loss.{d}"] for d in domains}
        assert max(losses, key=losses.get) == "noise"  # random tokens stay hard
    records = step_records(tmp_path / "run")
    noise = [records[0]["mix_weight.noise"]] + [u["rebalance_weight.noise"] for u in updates]
    assert noise == sorted(noise) and noise[-1] > 2 * noise[0]
    # the sampler follows: the weights of steps 17-24 are those of the update after step 16
    assert records[-1]["mix_weight.noise"] == pytest.approx(updates[1]["rebalance_weight.noise"],
                                                            abs=1e-6)


def test_resume_with_rebalancing_and_curriculum_is_exact(mixed_dataset, mixed_workspace,
                                                        tmp_path):
    overrides = [*CURRICULUM, "train.max_steps=10", "checkpoint.every_steps=3",
                 "mixture.rebalance={every_steps: 2, floor: 0.05}"]
    config = mixed_config(mixed_workspace, overrides)
    quiet = Console(quiet=True)
    train(config, tmp_path / "straight", mixed_dataset, console=quiet)
    with_workers = mixed_config(mixed_workspace, [*overrides, "train.data_workers=2"])
    train(with_workers, tmp_path / "resumed", mixed_dataset, until_step=5, console=quiet)
    result = train(config, tmp_path / "resumed", mixed_dataset, console=quiet)
    assert result.resumed_from_step == 5
    assert without_speed(tmp_path / "resumed") == without_speed(tmp_path / "straight")


def without_speed(run_dir) -> list[dict]:
    """Every metric but the wall-clock ones: losses, weights, shares, curriculum fields
    (checkpoint lines differ: a stopped run saves where it stops)."""
    return [without_wall_clock(r)
            for r in read_metrics(run_dir / "metrics.jsonl") if "checkpoint" not in r]


def test_a_named_dataset_is_injected_and_pinned_for_resume(mixed_dataset, mixed_workspace,
                                                          extra_dataset, tmp_path):
    config = mixed_config(mixed_workspace, [
        "train.max_steps=6", "train.eval_every_steps=0",
        "curriculum.inject=[{from_step: 3, dataset: extra, weight: 0.5}]"])
    train(config, tmp_path / "run", mixed_dataset, console=Console(quiet=True))
    run_info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_info["injected_datasets"] == {"extra": extra_dataset.version}
    assert [r["mix_weight.extra"] for r in step_records(tmp_path / "run")] == [0] * 3 + [0.5] * 3
