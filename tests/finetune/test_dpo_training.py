"""SFT then DPO on a tiny model with SmolLM2's tokenizer: the chat run trains on assistant
tokens, a preference dataset packs one pair per row, a DPO run (LoRA, reference = its base
with the adapter off; or full, reference = its start) logs TRL's metrics, starts at loss
log 2 (policy = reference), learns its training pairs, and resumes bit-identically."""

import math

import pytest
from rich.console import Console

from helox.data.prepare import prepare_dataset
from helox.observe.metrics import read_metrics, without_wall_clock
from helox.observe.report import write_report
from helox.testing.chatdata import dpo_overrides, sft_overrides, write_chat_files
from helox.testing.tiny import tiny_config
from helox.training.loop import train


def run(config, run_dir, until_step=None):
    return train(config, run_dir, prepare_dataset(config), until_step=until_step,
                 console=Console(quiet=True))


def metrics(run_dir):
    return [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("dpo")
    return folder, write_chat_files(folder, smollm2[1])


@pytest.fixture(scope="module")
def sft_run(files):
    folder, paths = files
    run(tiny_config(folder / "ws", sft_overrides(paths, "train.max_steps=3",
                                                 "train.micro_batch_size=2")), folder / "sft")
    assert len(metrics(folder / "sft")) == 3
    return folder / "sft"


def dpo_config(files, sft_run, *overrides):
    folder, paths = files
    return tiny_config(folder / "ws", dpo_overrides(paths, sft_run, *overrides))


def test_a_lora_dpo_run_starts_at_log_2_and_learns_its_pairs(files, sft_run, tmp_path):
    config = dpo_config(files, sft_run, "lora={rank: 8, alpha: 16}")
    run(config, tmp_path / "dpo")
    lines = metrics(tmp_path / "dpo")
    assert len(lines) == 8
    first = lines[0]
    # The adapter's B starts at zero: policy = reference, every reward 0, loss log 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert first["rewards/accuracies"] == 0.0  # ties are not wins (TRL's strict >)
    for name in ("rewards/margins", "logps/chosen", "logps/rejected", "ref_logps/chosen",
                 "ref_logps/rejected"):
        assert name in first
    assert lines[-1]["rewards/accuracies"] == 1.0 and lines[-1]["rewards/margins"] > 0
    assert lines[-1]["loss"] < math.log(2)
    # The reference (the base, adapter off) does not move.
    assert lines[-1]["ref_logps/chosen"] != lines[-1]["logps/chosen"]
    evals = [m for m in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "val_loss" in m]
    assert [e["step"] for e in evals] == [4, 8]
    assert {"val_rewards/accuracies", "val_rewards/margins", "val_logps/chosen"} <= set(evals[0])
    assert evals[-1]["val_rewards/accuracies"] == 1.0 and evals[-1]["val_loss"] < math.log(2)
    page = write_report(tmp_path / "dpo").read_text()  # the dashboard charts them
    assert "Preference training (DPO)" in page and "preference accuracy" in page


def test_a_dpo_run_resumes_bit_identically(files, sft_run, tmp_path):
    config = dpo_config(files, sft_run, "lora={rank: 8, alpha: 16}", "train.max_steps=6",
                        "checkpoint.every_steps=3", "train.eval_every_steps=0")
    run(config, tmp_path / "straight")
    run(config, tmp_path / "resumed", until_step=3)
    run(config, tmp_path / "resumed")
    assert [without_wall_clock(m) for m in metrics(tmp_path / "resumed")] == \
        [without_wall_clock(m) for m in metrics(tmp_path / "straight")]


def test_full_dpo_takes_its_start_as_the_reference(files, sft_run, tmp_path):
    config = dpo_config(files, sft_run, "train.max_steps=3", "train.eval_every_steps=0",
                        "dpo.loss_type=ipo")
    run(config, tmp_path / "full")
    lines = metrics(tmp_path / "full")
    # IPO at policy = reference: (0 - 1 / (2 beta))^2 = 1.
    assert lines[0]["loss"] == pytest.approx(1.0, abs=1e-5)
    assert lines[0]["ref_logps/chosen"] == pytest.approx(lines[0]["logps/chosen"], abs=1e-4)


def test_preference_data_needs_dpo_and_dpo_needs_document_masking(files, sft_run):
    with pytest.raises(Exception, match="document_masking"):
        dpo_config(files, sft_run, "train.document_masking=false")
    with pytest.raises(Exception, match="add a dpo section"):
        dpo_config(files, sft_run, "dpo=null")
