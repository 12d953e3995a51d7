"""The CUDA path of distributed training (skipped without CUDA): NCCL, bf16, FSDP2 with CPU
offload, and `helox train` on GPUs. Ranks take one GPU each, so these run on every GPU there
is up to 2. On one GPU the NCCL group has one rank: the bf16 test then runs NCCL's
collectives without sharding, and the offload test still runs FSDP2 (offloading shards even
one rank's parameters)."""

import subprocess
import sys

import pytest
import torch

from helox.config import save_config
from helox.observe.metrics import read_metrics
from helox.testing.distributed import run_distributed
from helox.testing.parallel_maths import train_steps
from helox.testing.tiny import tiny_config

pytestmark = pytest.mark.gpu


def ranks() -> int:
    return min(2, torch.cuda.device_count())


def test_fsdp2_on_nccl_in_bf16_trains_like_one_gpu():
    reference = train_steps(None, steps=10, device="cuda", precision="bf16")
    results = run_distributed(train_steps, ranks(), ("fsdp_any", 10, 0, "cuda", "bf16"),
                              backend="nccl")
    for result in results:
        # bf16 autocast: the shards' reductions round differently, within bf16's precision
        torch.testing.assert_close(torch.tensor(result["losses"]),
                                   torch.tensor(reference["losses"]), rtol=2e-2, atol=0)
    assert results[0]["losses"][-1] < results[0]["losses"][0]


def test_fsdp2_with_cpu_offload_matches_fsdp2_on_the_gpu():
    on_gpu = run_distributed(train_steps, ranks(), ("fsdp_any", 10, 0, "cuda"),
                             backend="nccl")[0]
    offloaded = run_distributed(train_steps, ranks(), ("fsdp_offload", 10, 0, "cuda"),
                                backend="nccl")[0]
    # fp32: the optimizer steps on the CPU instead of the GPU, the same maths
    torch.testing.assert_close(torch.tensor(offloaded["losses"]),
                               torch.tensor(on_gpu["losses"]), rtol=1e-4, atol=0)
    for name, weight in on_gpu["weights"].items():
        torch.testing.assert_close(offloaded["weights"][name], weight, rtol=1e-4, atol=1e-5)


def test_helox_train_on_gpus_in_bf16(workspace, tmp_path):
    config = tiny_config(workspace, ["train.device=cuda", "train.precision=bf16",
                                     "train.max_steps=8"])
    recipe = tmp_path / "recipe.yaml"
    save_config(config, recipe)
    done = subprocess.run([sys.executable, "-m", "helox.cli", "train", str(recipe),
                           "--run-dir", str(tmp_path / "run"), "--nproc", str(ranks())],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
             if "loss" in r and "event" not in r]
    assert len(steps) == 8 and steps[-1]["loss"] < steps[0]["loss"]
