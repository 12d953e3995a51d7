"""Fine-tuning on 2 processes (`helox train --nproc 2`, DDP over gloo) trains like one process:
LoRA SFT on conversations (the ranks hold different numbers of trained tokens: the loss is
divided by the global count), full SFT, and LoRA DPO (a pair per row, the reference the base
with the adapter off)."""

import pytest
import torch
from rich.console import Console

from helox import checkpoint as ckpt
from helox.config import save_config
from helox.data.prepare import prepare_dataset
from helox.observe.metrics import read_metrics
from helox.testing.chatdata import dpo_overrides, sft_overrides, write_chat_files
from helox.testing.distributed import helox_train
from helox.testing.tiny import tiny_config
from helox.training.loop import train

DDP = "parallel.dp_replicate=2"


def losses(run_dir, key="loss") -> torch.Tensor:
    return torch.tensor([r[key] for r in read_metrics(run_dir / "metrics.jsonl")
                         if key in r and "event" not in r], dtype=torch.float64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("finetune-ddp")
    files = write_chat_files(folder, smollm2[1])
    config = tiny_config(folder / "ws", sft_overrides(files, "train.max_steps=2",
                                                      "train.micro_batch_size=2"))
    train(config, folder / "base", prepare_dataset(config), console=Console(quiet=True))
    return folder, files


def one_and_two(setup, name, overrides):
    """The run on one process and on two (DDP); returns both run folders."""
    folder, _ = setup
    config = tiny_config(folder / "ws", overrides)
    recipe = folder / f"{name}.yaml"
    save_config(config, recipe)
    train(config, folder / f"{name}-1", prepare_dataset(config), console=Console(quiet=True))
    done = helox_train(recipe, folder / f"{name}-2", "--set", DDP)
    assert "2 ranks, DDP" in done.stdout + done.stderr
    return folder / f"{name}-1", folder / f"{name}-2"


def assert_same_training(one, two):
    torch.testing.assert_close(losses(two), losses(one), rtol=1e-5, atol=0)
    got, expected = (ckpt.saved_weights(ckpt.list_checkpoints(r)[0]) for r in (two, one))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_on_two_ranks_is_one_process_sft(setup, lora):
    folder, files = setup
    extra = ["lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj, up_proj]}"] if lora \
        else []
    one, two = one_and_two(setup, f"sft-{'lora' if lora else 'full'}", sft_overrides(
        files, f"train.init_from={folder / 'base'}", "train.max_steps=4",
        "train.micro_batch_size=2", "train.grad_accum_steps=2", "checkpoint.every_steps=4",
        *extra))
    assert_same_training(one, two)
    if lora:  # the checkpoint holds the adapter alone
        saved = ckpt.saved_weights(ckpt.list_checkpoints(two)[0])
        assert saved and all(".lora_" in name for name in saved)


def test_dpo_on_two_ranks_is_one_process_dpo(setup):
    folder, files = setup
    one, two = one_and_two(setup, "dpo", dpo_overrides(
        files, folder / "base", "lora={rank: 8, alpha: 16}", "train.max_steps=4",
        "train.eval_every_steps=4"))
    assert_same_training(one, two)
    for metric in ("rewards/accuracies", "rewards/margins", "val_rewards/accuracies"):
        torch.testing.assert_close(losses(two, metric), losses(one, metric), rtol=1e-5,
                                   atol=1e-6)
