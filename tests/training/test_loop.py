"""Tier-5 checks of the loop: determinism, exact resume, fall-back, refusal, loss going down."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from rich.console import Console
from torch._dynamo.exc import TorchRuntimeError
from torch._dynamo.utils import counters

from helox.config import load_config
from helox.model.config import ModelConfig
from helox.data.prepare import prepare_dataset
from helox.errors import HeloxError
from helox.observe.metrics import read_metrics
from helox.testing.tiny import QUICKSTART, tiny_config, tiny_mixed_config
from helox.checkpoint import list_checkpoints, load_trained_model, read_config_raw
from helox.checkpoint.layout import write_config
from helox.fileio import sha256_file, sha256_json
from helox.training.setup import trajectory_config
from helox.model.llama import Llama
from helox.data.loader import MicroBatch
from helox.training.loop import train
from helox.training.step import compile_blocks, compiled, make_loss_fn, train_step


def run(config, dataset, run_dir, until_step=None, console=None):
    return train(config, run_dir, dataset, until_step=until_step,
                 console=console or Console(quiet=True))


def names(run_dir):
    return [p.name for p in list_checkpoints(run_dir)]


def losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


def test_same_seed_gives_identical_losses(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace)
    run(config, tiny_dataset, tmp_path / "a")
    run(config, tiny_dataset, tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 8
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    other = tiny_config(workspace, overrides=["train.seed=8"])
    run(other, tiny_dataset, tmp_path / "c")
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


@pytest.mark.parametrize("overrides", [
    [], ["train.grad_accum_steps=2"], ["train.precision=bf16", "train.grad_accum_steps=3"],
    ["optim.optimizer=adafactor", "optim.schedule=wsd", "optim.decay_fraction=0.3"],
    ["optim.adaptive_clip={window_steps: 4, min_history: 2, multiplier: 1.0}"],
    ["train.precision=fp16"],
    ["train.precision=bf16", "train.activation_checkpointing=[1]",
     "train.fp32_modules=[lm_head, '*norm']"]],
    ids=["plain", "accum2", "bf16-accum3", "adafactor-wsd", "adaptive-clip", "fp16",
         "bf16-policy-actckpt"])
def test_stop_and_resume_is_bit_identical(tiny_dataset, workspace, tmp_path, overrides):
    config = tiny_config(workspace, overrides=["train.max_steps=10", "checkpoint.every_steps=3",
                                               *overrides])
    run(config, tiny_dataset, tmp_path / "straight")
    first = run(config, tiny_dataset, tmp_path / "resumed", until_step=5)
    assert first.step == 5 and first.checkpoint.name == "step-00000005"
    second = run(config, tiny_dataset, tmp_path / "resumed")
    assert second.resumed_from_step == 5 and second.step == 10
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_metrics_after_the_checkpoint_are_replaced_on_resume(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace, overrides=["train.max_steps=8", "checkpoint.every_steps=4"])
    run(config, tiny_dataset, tmp_path / "straight")
    run(config, tiny_dataset, tmp_path / "crashed", until_step=6)  # checkpoints at 4 and 6
    with (tmp_path / "crashed" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 7, "loss": 123.0}) + "\n{torn")  # as if killed mid-write
    # Drop the step-6 checkpoint: the resume starts from step 4.
    shutil.rmtree(tmp_path / "crashed" / "checkpoints" / "step-00000006")
    run(config, tiny_dataset, tmp_path / "crashed")
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")


def test_corrupt_newest_checkpoint_falls_back_to_previous(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace, overrides=["train.max_steps=8", "checkpoint.every_steps=2",
                                               "checkpoint.keep_last=3"])
    run(config, tiny_dataset, tmp_path / "straight")
    run(config, tiny_dataset, tmp_path / "run", until_step=6)
    newest = list_checkpoints(tmp_path / "run")[0]
    assert newest.name == "step-00000006"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    console = Console(record=True, width=200)
    result = run(config, tiny_dataset, tmp_path / "run", console=console)
    assert result.resumed_from_step == 4
    warning = "skipping checkpoint step-00000006: model.safetensors does not match"
    assert warning in console.export_text()
    assert (tmp_path / "run" / "checkpoints" / "corrupt-step-00000006").is_dir()  # kept aside
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_half_written_checkpoint_is_ignored(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace)
    run(config, tiny_dataset, tmp_path / "run", until_step=4)
    (tmp_path / "run" / "checkpoints" / "step-00000004" / "checksums.json").unlink()
    (tmp_path / "run" / "checkpoints" / ".tmp-step-00000006-1").mkdir()  # crash mid-save
    result = run(config, tiny_dataset, tmp_path / "run")
    assert result.resumed_from_step is None and result.step == 8
    assert names(tmp_path / "run") == ["step-00000008", "step-00000004"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_resume_with_a_different_config_is_refused(tiny_dataset, workspace, tmp_path):
    run(tiny_config(workspace), tiny_dataset, tmp_path / "run", until_step=4)
    changed = tiny_config(workspace, overrides=["optim.lr=0.01"])
    with pytest.raises(HeloxError, match=r"different run: optim.lr 0.003 → 0.01"):
        run(changed, tiny_dataset, tmp_path / "run")
    harmless = tiny_config(workspace, overrides=["train.eval_every_steps=2"])
    assert run(harmless, tiny_dataset, tmp_path / "run").resumed_from_step == 4


def saved_before_fields_existed(run_dir: Path, fields: list[str]) -> None:
    """Rewrite a run folder as a Helox without `fields` (dotted) saved it: its configs lack
    them, and its resume keys hash the config without them, as keys were always computed."""
    for folder in [run_dir, *list_checkpoints(run_dir)]:
        raw = read_config_raw(folder)
        for field in fields:
            section, name = field.split(".")
            del raw[section][name]
        write_config(folder / "config.yaml", raw)
        info = json.loads((folder / "run.json").read_text())
        info["resume_key"] = sha256_json(trajectory_config(raw)
                                         | {"dataset_version": info["dataset_version"]})
        (folder / "run.json").write_text(json.dumps(info))
        if (folder / "checksums.json").is_file():
            sums = json.loads((folder / "checksums.json").read_text())
            sums |= {name: sha256_file(folder / name) for name in ("config.yaml", "run.json")}
            (folder / "checksums.json").write_text(json.dumps(sums))


def test_a_run_saved_before_a_trajectory_field_existed_resumes_with_its_old_value(
        tiny_dataset, workspace, tmp_path):
    """A run saved before train.attention and train.deterministic existed resumes where they
    hold what it ran with (SDPA, the only kernel then; deterministic's default), bit for bit;
    other values are refused, and the refusal says which value the saved run needs."""
    old_ways = ["train.max_steps=6", "train.attention=sdpa"]
    run(tiny_config(workspace, overrides=old_ways), tiny_dataset, tmp_path / "straight")
    run(tiny_config(workspace, overrides=old_ways), tiny_dataset, tmp_path / "old", until_step=3)
    saved_before_fields_existed(tmp_path / "old", ["train.attention", "train.deterministic"])
    auto = tiny_config(workspace, overrides=["train.max_steps=6"])
    with pytest.raises(HeloxError, match=r"predates train.attention and ran as "
                                         r"train.attention=sdpa \(resume with --set"):
        run(auto, tiny_dataset, tmp_path / "old")
    changed = tiny_config(workspace, overrides=[*old_ways, "train.deterministic=true"])
    with pytest.raises(HeloxError, match=r"train.deterministic \(absent\) → True"):
        run(changed, tiny_dataset, tmp_path / "old")
    resumed = run(tiny_config(workspace, overrides=old_ways), tiny_dataset, tmp_path / "old")
    assert resumed.resumed_from_step == 3
    assert losses(tmp_path / "old") == losses(tmp_path / "straight")


def test_keep_last_prunes_old_checkpoints(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace, overrides=["checkpoint.every_steps=1",
                                               "checkpoint.keep_last=2"])
    run(config, tiny_dataset, tmp_path / "run")
    assert names(tmp_path / "run") == ["step-00000008", "step-00000007"]


def test_run_folder_records_config_and_fingerprint(tiny_dataset, workspace, tmp_path):
    run(tiny_config(workspace), tiny_dataset, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["dataset_version"] == tiny_dataset.version
    assert len(info["fingerprint"]) == 64 and info["libraries"]["torch"]
    assert (tmp_path / "run" / "config.yaml").read_text().count("vocab_size: 512") == 2
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]


@pytest.mark.slow
def test_compiled_run_resumes_bit_identically(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace, overrides=["train.compile=true", "train.max_steps=6"])
    run(config, tiny_dataset, tmp_path / "straight")
    run(config, tiny_dataset, tmp_path / "resumed", until_step=3)
    run(config, tiny_dataset, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    eager = tiny_config(workspace, overrides=["train.max_steps=6"])
    run(eager, tiny_dataset, tmp_path / "eager")
    assert losses(tmp_path / "eager") == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)


@pytest.mark.slow
def test_per_block_compilation_trains_as_one_graph_does_and_resumes_bit_identically(
        tiny_dataset, workspace, tmp_path):
    """train.compile: blocks, with telemetry probes and evaluation on the compiled blocks."""
    common = ["train.max_steps=6", "train.eval_every_steps=3",
              "observe.telemetry.sample_every_steps=2"]
    blocks = tiny_config(workspace, overrides=["train.compile=blocks", *common])
    run(blocks, tiny_dataset, tmp_path / "straight")
    run(blocks, tiny_dataset, tmp_path / "resumed", until_step=3)
    run(blocks, tiny_dataset, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    run(tiny_config(workspace, overrides=["train.compile=true", *common]), tiny_dataset,
        tmp_path / "whole")
    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "whole"), rel=1e-4)


def test_the_blocks_share_one_compiled_graph():
    torch._dynamo.reset()
    counters.clear()
    model = Llama(ModelConfig(vocab_size=97, d_model=32, num_layers=3, num_heads=4,
                              max_seq_len=16))
    eager = Llama(model.cfg)
    eager.load_state_dict(model.state_dict())
    compile_blocks(model)
    tokens = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(model(tokens), eager(tokens), rtol=1e-5, atol=1e-5)
    model(tokens).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1  # one block's, not one per block


def test_memory_reuse_changes_nothing_a_run_computes(tiny_dataset, workspace, tmp_path):
    """train.reuse_memory is the allocator's business: a run stopped with it on resumes with it
    off (the same resume key, and runs from before the option existed keep theirs), bit for
    bit the straight run."""
    on = tiny_config(workspace, overrides=["train.max_steps=6"])
    off = tiny_config(workspace, overrides=["train.max_steps=6", "train.reuse_memory=false"])
    run(on, tiny_dataset, tmp_path / "straight")
    run(on, tiny_dataset, tmp_path / "resumed", until_step=3)
    run(off, tiny_dataset, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


@pytest.mark.slow
def test_quickstart_recipe_loss_goes_down(tmp_path):
    config = load_config(QUICKSTART, [f"workspace={tmp_path}", "train.max_steps=40",
                                      "optim.warmup_steps=10", "train.eval_every_steps=40",
                                      "train.compile=false"])
    dataset = prepare_dataset(config)
    run(config, dataset, tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    val = [m["val_loss"] for m in records if "val_loss" in m]
    assert val[-1] < dataset.manifest["stats"]["unigram_entropy_nats"]


def test_accumulated_micro_batches_equal_one_big_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_seq_len=16)
    tokens = torch.randint(0, 64, (8, 17))
    big = [MicroBatch(tokens[:, :-1], tokens[:, 1:])]
    split = [MicroBatch(tokens[i:i + 2, :-1], tokens[i:i + 2, 1:]) for i in range(0, 8, 2)]
    results = []
    for batches in (big, split):
        torch.manual_seed(1)
        model = Llama(cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # update = -(clipped) gradient
        loss_fn = make_loss_fn(model, torch.device("cpu"), "fp32")
        loss, norm = train_step(loss_fn, model, optimizer, batches, clip_norm=0.5)[:2]
        results.append((loss, norm, [p.detach().clone() for p in model.parameters()]))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and norm_a == pytest.approx(norm_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiler_failure_says_how_to_run_without_it(monkeypatch):
    def broken_compile(fn):
        def call(*args):
            raise TorchRuntimeError("C++ compiler not found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    loss_fn = compiled(lambda batch: batch.inputs.sum())
    with pytest.raises(HeloxError, match="torch.compile failed: TorchRuntimeError: C\\+\\+ "
                                         "compiler not found") as exc_info:
        loss_fn(MicroBatch(torch.ones(1), torch.ones(1)))
    assert "train.compile=false" in exc_info.value.hint


def test_adaptive_clip_threshold_follows_the_recent_norms(tiny_dataset, workspace, tmp_path):
    config = tiny_config(workspace, [
        "train.max_steps=10", "optim.adaptive_clip={window_steps: 3, min_history: 2, "
        "percentile: 50, multiplier: 1.5, floor: 0.01, ceiling: 100}"])
    run(config, tiny_dataset, tmp_path / "run")
    records = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    norms = [r["grad_norm"] for r in records]
    for i, record in enumerate(records):
        window = norms[max(0, i - 3):i]
        expected = config.optim.grad_clip_norm if len(window) < 2 else 1.5 * float(
            np.median(window))
        assert record["clip_norm"] == pytest.approx(expected, rel=1e-12)


def test_ema_weights_are_saved_resumed_exactly_and_beat_raw_weights_late_in_a_noisy_run(
        mixed_dataset, mixed_workspace, tmp_path):
    config = tiny_mixed_config(mixed_workspace, [  # a high constant LR on 32-token batches
        "train.max_steps=300", "train.ema_decay=0.98", "optim.lr=0.05", "train.seed=1",
        "optim.schedule=constant", "optim.warmup_steps=10", "train.micro_batch_size=1",
        "train.eval_every_steps=75", "train.eval_batches=16", "checkpoint.every_steps=100"])
    run(config, mixed_dataset, tmp_path / "straight")
    run(config, mixed_dataset, tmp_path / "resumed", until_step=150)
    run(config, mixed_dataset, tmp_path / "resumed")
    straight = tmp_path / "straight" / "checkpoints" / "step-00000300"
    resumed = tmp_path / "resumed" / "checkpoints" / "step-00000300"
    ema_straight, ema_resumed = (load_file(p / "ema.safetensors") for p in (straight, resumed))
    assert ema_straight.keys() == ema_resumed.keys()
    assert all(torch.equal(ema_straight[k], ema_resumed[k]) for k in ema_straight)
    raw = load_trained_model(straight).model
    ema = load_trained_model(straight, ema=True).model
    assert not torch.equal(raw.lm_head.weight, ema.lm_head.weight)
    evals = [m for m in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "val_loss" in m]
    late = evals[-2:]  # steps 225 and 300
    assert (sum(m["val_loss_ema"] for m in late) < sum(m["val_loss"] for m in late))


def test_objectives_are_weighted_summed_and_each_reported():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_seq_len=16)
    tokens = torch.randint(0, 64, (4, 17))
    batches = [MicroBatch(tokens[i:i + 2, :-1], tokens[i:i + 2, 1:]) for i in (0, 2)]
    outcomes, params = [], []
    for weights in ({"lm": 1.0}, {"lm": 1.0, "z_loss": 0.0}, {"lm": 1.0, "z_loss": 0.5}):
        torch.manual_seed(1)
        model = Llama(cfg)
        with torch.no_grad():
            logits = model(tokens[:, :-1]).flatten(0, 1)
        expected_z = torch.logsumexp(logits, dim=-1).square().mean().item()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loss_fn = make_loss_fn(model, torch.device("cpu"), "fp32", ["lm", "z_loss"])
        outcomes.append(train_step(loss_fn, model, optimizer, batches, None, weights))
        params.append([p.detach().clone() for p in model.parameters()])
        terms = outcomes[-1].terms
        assert terms["z_loss"] == pytest.approx(expected_z, rel=1e-5)
        assert terms["total"] == pytest.approx(
            terms["lm"] + weights.get("z_loss", 0.0) * terms["z_loss"], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(params[0], params[1]))  # weight 0: no effect
    assert not all(torch.equal(a, b) for a, b in zip(params[0], params[2]))
    assert outcomes[2].grad_norm != pytest.approx(outcomes[0].grad_norm)


def test_objective_weights_follow_their_schedule_in_the_metrics(tiny_dataset, workspace,
                                                                tmp_path):
    config = tiny_config(workspace, [
        "train.objectives=[{name: lm}, {name: z_loss, weight: 0.0, "
        "stages: [{from_step: 3, weight: 0.001}]}]"])
    run(config, tiny_dataset, tmp_path / "run")
    records = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    assert [r["weight.z_loss"] for r in records] == [0.0] * 3 + [0.001] * 5
    for r in records:
        assert r["loss.lm"] == r["loss"] and r["loss.z_loss"] > 0
        assert r["loss.total"] == pytest.approx(r["loss"] + r["weight.z_loss"] * r["loss.z_loss"])


def test_an_injected_nan_step_is_skipped_logged_and_the_run_recovers(tiny_dataset, workspace,
                                                                     tmp_path):
    clean = tiny_config(workspace, ["train.max_steps=16", "checkpoint.every_steps=3"])
    faulty = tiny_config(workspace, ["train.max_steps=16", "checkpoint.every_steps=3",
                                     "faults.nan_loss_at_steps=[4]"])
    run(clean, tiny_dataset, tmp_path / "clean")
    run(faulty, tiny_dataset, tmp_path / "faulty", until_step=4)
    before = load_file(tmp_path / "faulty" / "checkpoints" / "step-00000003" / "model.safetensors")
    after = load_file(tmp_path / "faulty" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at the NaN step
    run(faulty, tiny_dataset, tmp_path / "faulty")  # resumes from step 4 and completes
    records = [m for m in read_metrics(tmp_path / "faulty" / "metrics.jsonl") if "loss" in m]
    assert [r["step"] for r in records] == list(range(1, 17))
    assert records[3]["skipped"] == "nonfinite" and math.isnan(records[3]["grad_norm"])
    assert all(r["skipped_steps"] == 1 for r in records[3:]) and "skipped" not in records[4]
    events = read_metrics(tmp_path / "faulty" / "events.jsonl")
    assert [(e["step"], e["event"], e["runbook"]) for e in events] == [
        (4, "nonfinite_step_skipped", "nonfinite-step")]
    runbooks = Path(__file__).resolve().parents[2] / "docs" / "runbooks.md"
    assert "## nonfinite-step" in runbooks.read_text()
    assert abs(records[-1]["loss"] - losses(tmp_path / "clean")[-1]) < 0.05


def test_fault_steps_come_from_the_environment_too(monkeypatch):
    from helox.training.faults import FaultConfig

    monkeypatch.setenv("HELOX_FAULT_NAN_AT", "5, 9")
    assert FaultConfig(nan_loss_at_steps=[2]).nan_steps() == {2, 5, 9}
    monkeypatch.setenv("HELOX_FAULT_NAN_AT", "five")
    with pytest.raises(HeloxError, match="not a list of step numbers"):
        FaultConfig().nan_steps()
