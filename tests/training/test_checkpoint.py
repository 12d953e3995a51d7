"""Checkpoints: async equals sync, snapshots are not torn, writer errors surface, one save in
flight, crash mid-save, best kept through pruning, partial restores for grown models."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_model

from helox.model.config import ModelConfig
from helox.training.optim import OptimConfig
from helox.errors import HeloxError
from helox.model.llama import Llama
from helox.testing.tiny import tiny_config
from helox import checkpoint as ckpt
from helox.training.optim import build_optimizer

RUN_INFO = {"fingerprint": "f" * 64, "resume_key": "k" * 64}


def trained(num_layers: int = 2, vocab_size: int = 64, steps: int = 2, seed: int = 0):
    """A tiny tied-embedding Llama and its fused AdamW after `steps` updates."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig(vocab_size=vocab_size, d_model=32, num_layers=num_layers,
                              num_heads=4, max_seq_len=16))
    optimizer = build_optimizer(model, OptimConfig())
    for _ in range(steps):
        train_once(model, optimizer)
    return model, optimizer


def train_once(model, optimizer):
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9))
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return tiny_config(tmp_path_factory.mktemp("ws"))


class Held:
    """A registered part whose state is a value the test holds (and may mutate)."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, value):
        self.value = value


def parts(model, optimizer, counters=None, ema=None):
    """The registry of a trainer in miniature: module, optimizer, EMA module, plain state."""
    found = {"model": model, "optimizer": optimizer}
    if ema is not None:
        found["ema"] = ema
    if counters is not None:
        found["counters"] = Held(counters)
    return found


def take(step, model, optimizer, config, val_loss=None, counters=None, ema=None, **kwargs):
    return ckpt.snapshot(step, parts(model, optimizer, counters or [step], ema),
                         config.model_dump(mode="json"), RUN_INFO, val_loss=val_loss, **kwargs)


def save(run_dir, step, model, optimizer, config, keep_last, **kwargs):
    return ckpt.save_checkpoint(run_dir, step, parts(model, optimizer),
                                config.model_dump(mode="json"), RUN_INFO, keep_last, **kwargs)


def safetensors_content(path):
    """(header with its metadata, tensor bytes): safetensors writes metadata keys in hash-map
    order (safetensors issue #584), so equal files may differ in raw bytes only there."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + header_len]), raw[8 + header_len:]


def assert_same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    sums_a, sums_b = (json.loads((d / "checksums.json").read_text()) for d in (a, b))
    for name in names:
        if name.endswith(".safetensors"):
            assert safetensors_content(a / name) == safetensors_content(b / name), name
        elif name != "checksums.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
            assert sums_a[name] == sums_b[name]


def test_weights_file_is_what_save_model_writes_and_loads_back(config, tmp_path):
    model, optimizer = trained()
    path = save(tmp_path / "run", 2, model, optimizer, config, 3)
    save_model(model, str(tmp_path / "reference.safetensors"),
               metadata={"step": "2", "fingerprint": RUN_INFO["fingerprint"]})
    assert (safetensors_content(path / "model.safetensors")
            == safetensors_content(tmp_path / "reference.safetensors"))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata()["lm_head.weight"] == "embed.weight"  # tied: stored once
    fresh, _ = trained(seed=1, steps=0)
    ckpt.load_weights(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values()))


def test_async_save_writes_the_same_files_as_sync(config, tmp_path):
    model, optimizer = trained()
    ema, _ = trained(seed=3, steps=0)
    snap = take(2, model, optimizer, config, val_loss=1.5, ema=ema,
                extra_files={"tokenizer.json": _file(tmp_path / "tok.json", b"{}")})
    paths = []
    for mode, async_save in (("sync", False), ("async", True)):
        writer = ckpt.CheckpointWriter(tmp_path / mode, keep_last=2, async_save=async_save)
        paths.append(writer.save(snap))
        writer.close()
        assert writer.last_written == paths[-1] and writer.last_write_s > 0
        assert ckpt.verify_checkpoint(paths[-1]) is None
    assert_same_files(*paths)
    assert {p.name for p in paths[0].iterdir()} == {
        "model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt", "format.json",
        "config.yaml", "run.json", "tokenizer.json", "checksums.json"}
    assert json.loads((paths[0] / "format.json").read_text()) == {
        "format_version": 2, "step": 2,  # a single process writes format 2
        "parts": {"model": "model.safetensors", "ema": "ema.safetensors",
                  "optimizer": "optimizer.pt", "counters": "state.pt"}}


def test_training_right_after_save_does_not_tear_the_snapshot(config, tmp_path, monkeypatch):
    model, optimizer = trained()
    counters = [7]
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg_before = [optimizer.state[p]["exp_avg"].clone()  # in the state dict's order
                      for group in optimizer.param_groups for p in group["params"]]
    release = threading.Event()
    real_write = ckpt.write_snapshot

    def gated_write(*args, **kwargs):  # the write starts only after training has moved on
        release.wait(10)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ckpt.writer, "write_snapshot", gated_write)
    writer = ckpt.CheckpointWriter(tmp_path / "run", keep_last=2, async_save=True)
    path = writer.save(take(2, model, optimizer, config, counters=counters))
    train_once(model, optimizer)  # the next steps mutate weights, moments and state in place
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    counters.append(8)
    release.set()
    writer.close()
    saved = load_file(path / "model.safetensors")
    assert all(torch.equal(saved[k], weights_before[k]) for k in saved)
    saved_optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    for index, before in enumerate(exp_avg_before):
        assert torch.equal(saved_optimizer["state"][index]["exp_avg"], before)
    assert torch.load(path / "state.pt", weights_only=True)["counters"] == [7]


def test_wait_raises_a_background_error_on_the_training_thread(config, tmp_path):
    model, optimizer = trained(steps=1)
    writer = ckpt.CheckpointWriter(tmp_path / "run", keep_last=2, async_save=True)
    missing = {"tokenizer.json": tmp_path / "gone.json"}
    writer.save(take(1, model, optimizer, config, extra_files=missing))
    with pytest.raises(FileNotFoundError, match="gone.json"):
        writer.wait()
    assert ckpt.list_checkpoints(tmp_path / "run") == []  # nothing half-written published
    writer.save(take(2, model, optimizer, config))  # the writer still works afterwards
    writer.close()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000002"]


def test_a_save_waits_for_the_one_in_flight(config, tmp_path, monkeypatch):
    model, optimizer = trained(steps=1)
    events, release = [], threading.Event()

    def slow_write(run_dir, snap, *args, **kwargs):
        events.append(("start", snap.step))
        if snap.step == 1:
            release.wait(10)
        events.append(("end", snap.step))
        return run_dir / f"step-{snap.step}"

    monkeypatch.setattr(ckpt.writer, "write_snapshot", slow_write)
    writer = ckpt.CheckpointWriter(tmp_path / "run", keep_last=2, async_save=True)
    first, second = (take(step, model, optimizer, config) for step in (1, 2))
    writer.save(first)  # returns while step 1 is being written
    training = threading.Thread(target=writer.save, args=(second,))
    training.start()
    training.join(0.3)
    assert training.is_alive() and events == [("start", 1)]  # blocked: one save in flight
    release.set()
    training.join(10)
    writer.close()
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert writer.last_stall_s >= 0.3  # the second save's stall includes the wait


CRASH_SCRIPT = """
import sys
from pathlib import Path

import torch

from helox.model.config import ModelConfig
from helox.training.optim import OptimConfig
from helox.model.llama import Llama
from helox.testing.tiny import tiny_config
from helox import checkpoint as ckpt
from helox.training.optim import build_optimizer

if __name__ == "__main__":
    run_dir = Path(sys.argv[1])
    config = tiny_config(run_dir.parent / "ws")
    model = Llama(ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                              max_seq_len=16))
    optimizer = build_optimizer(model, OptimConfig())
    run_info = {"fingerprint": "f" * 64}
    writer = ckpt.CheckpointWriter(run_dir, keep_last=2, async_save=True)
    parts, raw = {"model": model, "optimizer": optimizer}, config.model_dump(mode="json")
    writer.save(ckpt.snapshot(1, parts, raw, run_info))
    writer.save(ckpt.snapshot(2, parts, raw, run_info), crash_halfway=True)
    writer.wait()
    print("survived the crash")
"""


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_SCRIPT))
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), str(run_dir)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "survived" not in done.stdout
    (half,) = (run_dir / "checkpoints").glob(".tmp-step-00000002-*")
    assert (half / "model.safetensors").is_file() and not (half / "optimizer.pt").exists()
    restored = ckpt.load_newest_valid(run_dir, warn=pytest.fail)
    assert restored.step == 1 and restored.path.name == "step-00000001"
    ckpt.remove_stale_temporaries(run_dir)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_the_best_checkpoint_survives_pruning_and_resume_takes_the_newest(config, tmp_path):
    model, optimizer = trained(steps=1)
    run_dir = tmp_path / "run"
    writer = ckpt.CheckpointWriter(run_dir, keep_last=2, async_save=True)
    for step, val_loss in enumerate([3.0, 2.0, 2.5, 2.0, None, 2.7], start=1):
        writer.save(take(step, model, optimizer, config, val_loss=val_loss))
    writer.close()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == [
        "step-00000006", "step-00000005", "step-00000002"]
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best == {"step": 2, "val_loss": 2.0, "path": "checkpoints/step-00000002"}
    assert ckpt.best_checkpoint(run_dir) == run_dir / "checkpoints" / "step-00000002"
    assert ckpt.load_newest_valid(run_dir, warn=pytest.fail).step == 6


def test_a_stale_or_broken_best_record_breaks_nothing(config, tmp_path):
    model, optimizer = trained(steps=1)
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"

    def save_at(step, val_loss):
        save(run_dir, step, model, optimizer, config, keep_last=1, val_loss=val_loss)

    save_at(1, 1.0)
    shutil.rmtree(root / "step-00000001")  # deleted by hand: best.json now names nothing
    assert ckpt.best_checkpoint(run_dir) is None
    save_at(2, 4.0)  # worse than the vanished best, yet it becomes the best
    assert json.loads((root / "best.json").read_text())["step"] == 2
    (root / "step-00000002" / "optimizer.pt").write_bytes(b"torn")
    assert ckpt.best_checkpoint(run_dir) is None  # fails its checksums
    (root / "best.json").write_text("{torn")
    save_at(3, 5.0)
    assert ckpt.best_checkpoint(run_dir) == root / "step-00000003"
    save_at(3, None)  # step 3 saved again (after a fall-back): its old val_loss no longer holds
    assert not (root / "best.json").exists() and ckpt.best_checkpoint(run_dir) is None
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000003"]


def param_state(optimizer, model, name):
    return optimizer.state[dict(model.named_parameters())[name]]


def restore_into(other, small, small_optimizer, config, tmp_path):
    """Save the small model, load it partially into `other` with a fresh AdamW; returns that
    optimizer and the weight and optimizer reports."""
    path = save(tmp_path / "run", 1, small, small_optimizer, config, keep_last=1)
    optimizer = build_optimizer(other, OptimConfig())
    weights = ckpt.load_weights_partial(path, other)
    return optimizer, weights, ckpt.load_optimizer_partial(path, optimizer, other)


def test_partial_restore_into_a_model_with_one_more_layer(config, tmp_path):
    small, small_optimizer = trained(num_layers=2, steps=2)
    grown, _ = trained(num_layers=3, steps=0, seed=5)
    optimizer, weights, report = restore_into(grown, small, small_optimizer, config, tmp_path)

    new_layer = {n for n, _ in grown.named_parameters() if n.startswith("blocks.2.")}
    small_names = [n for n, _ in small.named_parameters()]
    assert set(weights.fresh) == new_layer and weights.dropped == []
    assert set(report.fresh) == new_layer and report.dropped == []
    assert set(report.fresh.values()) == {"not in the checkpoint"}
    assert sorted(report.loaded) == sorted(small_names)
    for name, param in small.named_parameters():
        torch.testing.assert_close(dict(grown.named_parameters())[name], param, rtol=0, atol=0)
        saved, loaded = (param_state(small_optimizer, small, name),
                         param_state(optimizer, grown, name))
        assert set(loaded) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(loaded[key], saved[key]) for key in loaded)
    assert all(not param_state(optimizer, grown, name) for name in new_layer)
    train_once(grown, optimizer)
    assert param_state(optimizer, grown, "blocks.2.mlp_norm.weight")["step"].item() == 1
    assert param_state(optimizer, grown, "blocks.0.mlp_norm.weight")["step"].item() == 3


def test_partial_restore_reports_changed_shapes_and_dropped_names(config, tmp_path):
    small, small_optimizer = trained(num_layers=2, steps=1)
    other, _ = trained(num_layers=1, vocab_size=80, steps=0)
    optimizer, weights, report = restore_into(other, small, small_optimizer, config, tmp_path)
    reason = "shape [64, 32] in the checkpoint, [80, 32] now"
    assert weights.fresh == {"embed.weight": reason, "lm_head.weight": reason}
    assert report.fresh == {"embed.weight": reason}
    dropped = sorted(n for n, _ in small.named_parameters() if n.startswith("blocks.1."))
    assert report.dropped == dropped and weights.dropped == dropped
    assert not param_state(optimizer, other, "embed.weight")
    assert param_state(optimizer, other, "norm.weight")["step"].item() == 1


def test_exact_resume_loads_new_and_old_optimizer_files(config, tmp_path):
    model, optimizer = trained(steps=2)
    path = save(tmp_path / "run", 2, model, optimizer, config, 1)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(optimizer.state_dict(), old / "optimizer.pt")  # as written before names
    for folder in (path, old):
        fresh = build_optimizer(model, OptimConfig())
        ckpt.load_optimizer(folder, fresh)
        assert all("param_names" not in group for group in fresh.param_groups)
        for param in model.parameters():
            assert all(torch.equal(fresh.state[param][k], optimizer.state[param][k])
                       for k in optimizer.state[param])
    with pytest.raises(HeloxError, match="does not name its parameters"):
        ckpt.load_optimizer_partial(old, build_optimizer(model, OptimConfig()), model)
    adafactor = build_optimizer(model, OptimConfig(optimizer="adafactor"))
    with pytest.raises(HeloxError, match="holds AdamW state, which does not fit Adafactor"):
        ckpt.load_optimizer_partial(path, adafactor, model)


def _file(path, content: bytes):
    path.write_bytes(content)
    return path


def test_the_loop_saves_by_minutes_and_keeps_the_best(tiny_dataset, workspace, tmp_path):
    from rich.console import Console

    from helox.observe.metrics import read_metrics
    from helox.training.loop import train

    by_minutes = tiny_config(workspace, ["train.max_steps=6", "checkpoint.every_steps=100",
                                         "checkpoint.every_minutes=1.0e-6"])
    train(by_minutes, tmp_path / "minutes", tiny_dataset, console=Console(quiet=True))
    saves = [r["step"] for r in read_metrics(tmp_path / "minutes" / "metrics.jsonl")
             if "checkpoint" in r]
    assert saves == [1, 2, 3, 4, 5, 6]
    # Evaluated at every save; the best is kept though keep_last is 1.
    best = tiny_config(workspace, ["train.max_steps=12", "checkpoint.every_steps=2",
                                   "train.eval_every_steps=2", "checkpoint.keep_last=1",
                                   "optim.lr=0.05"])
    train(best, tmp_path / "best", tiny_dataset, console=Console(quiet=True))
    val = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "best" / "metrics.jsonl")
           if "val_loss" in r}
    best_step = min(val, key=val.get)
    record = json.loads((tmp_path / "best" / "checkpoints" / "best.json").read_text())
    assert record["step"] == best_step and record["val_loss"] == val[best_step]
    kept = sorted(p.name for p in ckpt.list_checkpoints(tmp_path / "best"))
    assert kept == sorted({f"step-{best_step:08d}", "step-00000012"})
    assert ckpt.best_checkpoint(tmp_path / "best").name == f"step-{best_step:08d}"
