"""`helox train` on 2 processes (gloo, CPU): what one process guarantees holds on a job.
Every run here is a real launch: `helox train --nproc 2` (torch.distributed.run), two
torchrun commands joining as two nodes, or one process (`train`) for the references.

The reference is `straight`, an uninterrupted 2-rank FSDP2 run of 12 steps (checkpoints every
4). It trains like one process (losses within 1e-5 relative), and every interrupted run must
end as it does: bit for bit on 2 ranks, within 1e-5 across a change of world size."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from rich.console import Console

from helox import checkpoint as ckpt
from helox.checkpoint.sharded import dcp_tensors
from helox.config import save_config
from helox.distributed.job import Job
from helox.errors import HeloxError
from helox.eval.lm import load_language_model
from helox.export.exporter import export_model
from helox.observe.metrics import read_metrics, without_wall_clock
from helox.testing.distributed import free_port, helox_train, run_job
from helox.testing.tiny import tiny_config
from helox.training.loop import train
from helox.training.setup import check_parallel

STEPS = 12
OVERRIDES = [f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "checkpoint.keep_last=3",
             "train.eval_every_steps=4", "checkpoint.keep_best=false",
             "observe.telemetry.sample_every_steps=3"]


def steps(run_dir) -> list[dict]:
    """The step lines of metrics.jsonl, without wall-clock fields."""
    return [without_wall_clock(r) for r in read_metrics(run_dir / "metrics.jsonl")
            if "loss" in r and "event" not in r]


def losses(run_dir, after: int = 0) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in steps(run_dir) if r["step"] > after],
                        dtype=torch.float64)


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.saved_weights(ckpt.list_checkpoints(run_dir)[0])


def assert_same_weights(got: dict, expected: dict, exact: bool) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        if exact:
            assert torch.equal(got[name], tensor), name
        else:
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def recipe(workspace, tmp_path_factory):
    config = tiny_config(workspace, OVERRIDES)
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    save_config(config, path)
    return config, path


@pytest.fixture(scope="module")
def straight(recipe, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    helox_train(recipe[1], run_dir)
    return run_dir


@pytest.fixture(scope="module")
def one_process(recipe, tiny_dataset, tmp_path_factory):
    """The same run on one process, stopped at step 4 (its checkpoint kept aside) and
    finished."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    train(recipe[0], run_dir, tiny_dataset, until_step=4, console=Console(quiet=True))
    shutil.copytree(ckpt.list_checkpoints(run_dir)[0], run_dir.parent / "step-4")
    train(recipe[0], run_dir, tiny_dataset, console=Console(quiet=True))
    return run_dir


def test_two_ranks_train_like_one_process_and_only_rank_0_writes(straight, one_process):
    torch.testing.assert_close(losses(straight), losses(one_process), rtol=1e-5, atol=0)
    assert_same_weights(final_weights(straight), final_weights(one_process), exact=False)
    records = steps(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # one line per step
    assert all(r["ranks"] == 2 for r in records)
    # Telemetry probes the FSDP2-sharded model on every rank; rank 0 writes what it saw.
    assert [r["step"] for r in read_metrics(straight / "telemetry.jsonl")] == [3, 6, 9, 12]
    checkpoint = ckpt.list_checkpoints(straight)[0]
    assert ckpt.read_format(checkpoint)["world_size"] == 2
    assert {p.name for p in checkpoint.glob("rank-*.pt")} == {"rank-00000.pt",
                                                                "rank-00001.pt"}
    assert ckpt.verify_checkpoint(checkpoint) is None
    assert "dcp/.metadata" in (checkpoint / "checksums.json").read_text()


@pytest.mark.parametrize("async_save", ["true", "false"], ids=["async", "sync"])
def test_resume_on_two_ranks_is_bit_identical(recipe, straight, tmp_path, async_save):
    run_dir, mode = tmp_path / "run", ["--set", f"checkpoint.async_save={async_save}"]
    helox_train(recipe[1], run_dir, "--until-step", "4", *mode)
    assert ckpt.list_checkpoints(run_dir)[0].name == "step-00000004"
    output = helox_train(recipe[1], run_dir, *mode).stderr
    assert "resuming from step-00000004" in output
    assert steps(run_dir) == steps(straight)
    assert_same_weights(final_weights(run_dir), final_weights(straight), exact=True)


def test_saved_on_two_ranks_resumes_on_one(recipe, straight, one_process, tiny_dataset,
                                           tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt.list_checkpoints(straight)[-1],  # step 4, saved by 2 ranks
                    run_dir / "checkpoints" / "step-00000004")
    train(recipe[0], run_dir, tiny_dataset, console=Console(quiet=True))
    torch.testing.assert_close(losses(run_dir, after=4), losses(straight, after=4), rtol=1e-5,
                               atol=0)
    assert_same_weights(final_weights(run_dir), final_weights(straight), exact=False)
    assert ckpt.read_format(ckpt.list_checkpoints(run_dir)[0])["format_version"] == 2


def test_saved_on_one_process_resumes_on_two_ranks(recipe, one_process, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(one_process.parent / "step-4", run_dir / "checkpoints" / "step-00000004")
    helox_train(recipe[1], run_dir)
    torch.testing.assert_close(losses(run_dir, after=4), losses(one_process, after=4),
                               rtol=1e-5, atol=0)
    assert_same_weights(final_weights(run_dir), final_weights(one_process), exact=False)


def test_kill_9_of_one_rank_restarts_in_place_and_ends_bit_identical(recipe, straight,
                                                                     tmp_path):
    # After step 8's save began, which waits for step 4's: a published checkpoint exists
    # (an earlier kill may catch step 4's asynchronous save in flight; the restarted job then
    # starts over, also bit-exact, but shows no resume).
    step = random.Random().randint(9, STEPS - 1)
    run_dir = tmp_path / "run"
    done = helox_train(recipe[1], run_dir, "--max-restarts", "1",
                       env={"HELOX_FAULT_KILL_AT": str(step), "HELOX_FAULT_RANKS": "1"})
    assert (run_dir / f".fault-killed-at-{step}").exists(), f"rank 1 was not killed at {step}"
    assert "resuming from step-" in done.stderr, f"killed at step {step}"
    assert steps(run_dir) == steps(straight), f"killed at step {step}"
    assert_same_weights(final_weights(run_dir), final_weights(straight), exact=True)


def test_two_nodes_on_one_machine_train_one_job(recipe, straight, tmp_path):
    """Two torchrun commands, one process each, meet at a c10d rendezvous on 127.0.0.1."""
    run_dir, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=helox-test",
            "-m", "helox.cli", "train", str(recipe[1]), "--run-dir", str(run_dir)]
    with ThreadPoolExecutor(2) as pool:  # the two machines, started together
        nodes = list(pool.map(run_job, [[*node[:3], f"--node-rank={rank}", *node[3:]]
                                         for rank in range(2)]))
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(n.stderr for n in nodes)
    assert steps(run_dir) == steps(straight)
    assert_same_weights(final_weights(run_dir), final_weights(straight), exact=True)


def test_sigterm_to_the_launcher_checkpoints_every_rank_then_resumes_exactly(
        recipe, straight, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "helox.cli", "train", str(recipe[1]), "--run-dir",
               str(run_dir), "--nproc", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").is_file() or len(steps(run_dir)) < 2:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler would
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stopped = [e for e in read_metrics(run_dir / "events.jsonl")
               if e["event"] == "stopped_by_signal"]
    assert len(stopped) == 1, output
    step = stopped[0]["step"]
    assert step < STEPS and ckpt.list_checkpoints(run_dir)[0].name == f"step-{step:08d}"
    helox_train(recipe[1], run_dir)
    assert steps(run_dir) == steps(straight)
    assert_same_weights(final_weights(run_dir), final_weights(straight), exact=True)


def test_a_spike_on_one_rank_rolls_back_both_and_replicas_stay_identical(recipe, tmp_path):
    """DDP with an EMA: both are restored by the rollback and kept in the checkpoints."""
    run_dir = tmp_path / "run"
    stable = ["--set", "stability.spike={window_steps: 8, min_history: 4}",
              "--set", "stability.rollback={after_bad_steps: 2, lr_factor: 0.5, "
                       "cooldown_steps: 2}", "--set", "parallel.dp_replicate=2",
              "--set", "train.eval_every_steps=0", "--set", "train.ema_decay=0.9"]
    helox_train(recipe[1], run_dir, *stable,
                env={"HELOX_FAULT_SPIKE_AT": "9,10", "HELOX_FAULT_RANKS": "1"})
    events = read_metrics(run_dir / "events.jsonl")
    assert [(e["step"], e["event"]) for e in events] == [
        (9, "loss_spike"), (10, "loss_spike"), (10, "rollback")]
    assert events[-1]["checkpoint"] == "step-00000008"
    assert events[-1]["replicas_identical"] is True
    assert steps(run_dir)[-1]["step"] == STEPS
    assert ckpt.read_format(ckpt.list_checkpoints(run_dir)[0])["parts"]["ema"] == "dcp"
    ema = ckpt.load_trained_model(ckpt.list_checkpoints(run_dir)[0], ema=True)
    assert not torch.equal(ema.model.embed.weight, final_weights(run_dir)["embed.weight"])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.dp_replicate=3"], r"parallel.dp_replicate \(3\) does not divide the world "
                                  r"size \(2\)"),
    (["parallel.dp_shard=4"], r"parallel.dp_replicate \(1\) × parallel.dp_shard \(4\) must "
                              r"equal the world size \(2\)"),
    (["train.micro_batch_size=3"], "the global batch of 3 sequences does not divide across 2"),
    (["train.ema_decay=0.99"], "train.ema_decay with parameters sharded over 2 ranks"),
    (["lora={rank: 4}", "train.init_from=/"], "a LoRA run with parameters sharded over 2"),
])
def test_a_job_that_does_not_fit_is_refused_naming_the_numbers(workspace, overrides, message):
    with pytest.raises(HeloxError, match=message):
        check_parallel(tiny_config(workspace, overrides), Job(rank=0, world_size=2))


def test_readers_take_the_sharded_checkpoint_and_consolidate_writes_the_single_file_form(
        straight, tmp_path):
    """export, eval and generate load models through `load_trained_model`; consolidate gives
    the same weights, optimizer state and trainer state in the one-process form."""
    sharded = ckpt.list_checkpoints(straight)[0]
    done = subprocess.run([sys.executable, "-m", "helox.cli", "checkpoint", "consolidate",
                           str(straight), "--out", str(tmp_path / "single"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    single = tmp_path / "single"
    assert ckpt.verify_checkpoint(single) is None
    assert ckpt.read_format(single)["format_version"] == 2
    assert (single / "model.safetensors").is_file() and (single / "optimizer.pt").is_file()

    tokens = torch.arange(24).unsqueeze(0)
    logits = [ckpt.load_trained_model(path).model(tokens) for path in (sharded, single)]
    assert torch.equal(*logits)
    generated = run_job([sys.executable, "-m", "helox.cli", "generate", str(straight),
                         "--prompt", "In the", "--max-new-tokens", "4", "--json"])
    assert generated.returncode == 0, generated.stderr
    assert load_language_model(sharded).version.startswith(sharded.name)  # helox eval's model
    exports = [export_model(path, "hf", tmp_path / f"hf-{path.name}") for path in
               (sharded, single)]
    assert len({e.metadata["helox.model_fingerprint"] for e in exports}) == 1

    saved = torch.load(single / "optimizer.pt", weights_only=True)
    names = [name for group in saved["param_groups"] for name in group["param_names"]]
    exp_avg = {name: saved["state"][index]["exp_avg"] for group in saved["param_groups"]
               for name, index in zip(group["param_names"], group["params"])}
    assert len(names) == len(exp_avg) > 0
    shards = dcp_tensors(sharded, "optimizer")
    for name, tensor in exp_avg.items():
        assert torch.equal(shards[f"state.{name}.exp_avg"], tensor), name
    assert ckpt.read_checkpoint(single).state.keys() == ckpt.read_checkpoint(sharded).state.keys()


def test_a_job_warm_starts_from_a_one_process_checkpoint_like_one_process(
        recipe, one_process, tiny_dataset, tmp_path):
    """train.init_from into FSDP2: each rank copies its shard of every matching tensor."""
    source = ["--set", f"train.init_from={one_process.parent / 'step-4'}"]
    config = tiny_config(recipe[0].workspace, [*OVERRIDES, source[1]])
    train(config, tmp_path / "one", tiny_dataset, console=Console(quiet=True))
    helox_train(recipe[1], tmp_path / "job", *source)
    started = [e for e in read_metrics(tmp_path / "job" / "events.jsonl")
               if e["event"] == "initialized_from"]
    assert len(started) == 1 and not started[0]["weights"]["fresh"]
    torch.testing.assert_close(losses(tmp_path / "job"), losses(tmp_path / "one"), rtol=1e-5,
                               atol=0)
