"""The trainer-state registry: a part registered once is saved, resumed and rolled back by the
checkpoint layer without any other edit."""

import json

import torch
from rich.console import Console

from helox import checkpoint as ckpt
from helox.model.config import ModelConfig
from helox.model.llama import Llama
from helox.testing.tiny import tiny_config
from helox.training.loop import Trainer, train
from helox.training.optim import OptimConfig, build_optimizer
from helox.training.state import Counters, TrainerState


class Ticks:
    """A stateful part the trainer does not know about."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def small_model():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                              max_seq_len=16))
    return model, build_optimizer(model, OptimConfig())


def test_resume_restores_every_part_and_rollback_only_its_own(tmp_path):
    model, optimizer = small_model()
    ticks, kept, counters = Ticks(3), Ticks(5), Counters(step=7, skipped_steps=1)
    reference = []
    state = TrainerState()
    state.register("model", model, rollback=True)
    state.register("optimizer", optimizer, rollback=True)
    state.register("ticks", ticks, rollback=True)
    state.register("kept", kept)  # a rollback keeps it, as it keeps the data position
    state.register("counters", counters, rollback=lambda saved: reference.append(saved))
    saved = ckpt.save_checkpoint(tmp_path / "run", 7, state.parts(), {}, {}, keep_last=1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    ticks.n, kept.n, counters.step = 30, 50, 9

    state.restore(ckpt.read_checkpoint(saved), rollback=True)
    assert ticks.n == 3 and kept.n == 50 and counters.step == 9
    assert reference == [{"step": 7, "skipped_steps": 1}]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    state.restore(ckpt.read_checkpoint(saved))
    assert kept.n == 5 and counters.step == 7
    record = json.loads((saved / "format.json").read_text())
    assert record["parts"] == {"model": "model.safetensors", "optimizer": "optimizer.pt",
                               "ticks": "state.pt", "kept": "state.pt", "counters": "state.pt"}


def test_a_part_registered_in_the_trainer_rides_along_to_its_checkpoints(
        tiny_dataset, workspace, tmp_path, monkeypatch):
    register_state = Trainer.register_state

    def with_ticks(self):  # the one registration a new stateful part needs
        state = register_state(self)
        self.ticks = Ticks(42)
        state.register("ticks", self.ticks)
        return state

    monkeypatch.setattr(Trainer, "register_state", with_ticks)
    config = tiny_config(workspace, ["train.max_steps=3", "checkpoint.every_steps=3"])
    train(config, tmp_path / "run", tiny_dataset, console=Console(quiet=True))
    (path,) = ckpt.list_checkpoints(tmp_path / "run")
    parts = json.loads((path / "format.json").read_text())["parts"]
    assert parts["ticks"] == "state.pt"
    assert set(parts) == {"model", "optimizer", "counters", "loader", "clip", "detector",
                          "recovery", "health", "telemetry", "ticks", "rng"}
    assert ckpt.read_checkpoint(path).state["ticks"] == {"n": 42}
