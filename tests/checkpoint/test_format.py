"""The checkpoint format version: a format-1 checkpoint (written before the checkpoint layer)
is read through its migration, a newer or damaged one is refused naming its version, a
pre-feature format-1 trainer state is refused saying what to do, and the run's resume key,
computed before train.attention existed, still matches with the kernel it ran."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from helox import checkpoint as ckpt
from helox.config import RunConfig
from helox.errors import HeloxError
from helox.model.llama import Llama
from helox.observe.health import HealthConfig, HealthMonitor
from helox.repro import rng_state, set_rng_state
from helox.resources import corpus_dir
from helox.training.setup import legacy_resume_key, resume_key
from helox.training.optim import AdaptiveClip, OptimConfig, build_optimizer
from helox.training.stability import Recovery, RollbackConfig, SpikeConfig, SpikeDetector
from helox.training.state import Counters, TrainerState, ValueState

V1 = Path(__file__).parent / "data" / "v1" / "step-00000004"


@pytest.fixture
def v1_copy(tmp_path):
    """A writable copy of the format-1 checkpoint, inside a run folder."""
    path = tmp_path / "run" / "checkpoints" / V1.name
    shutil.copytree(V1, path)
    return path


def test_a_format_1_checkpoint_loads_with_the_logits_its_helox_computed():
    expected = torch.load(V1.with_name(V1.name + ".expected.pt"), weights_only=True)
    assert ckpt.read_format(V1) == {"format_version": 1}
    assert ckpt.verify_checkpoint(V1) is None
    for ema, logits in ((False, expected["logits"]), (True, expected["ema_logits"])):
        trained = ckpt.load_trained_model(V1, ema=ema)
        with torch.no_grad():
            torch.testing.assert_close(trained.model(expected["tokens"]), logits, rtol=0,
                                       atol=0)
    assert trained.step == 4 and trained.eos_token == "<|endoftext|>"
    assert trained.tokenizer.token_to_id("<|endoftext|>") == trained.eos_id


def test_the_format_1_trainer_state_migrates_into_the_registry_names():
    raw = torch.load(V1 / "state.pt", weights_only=True)
    restored = ckpt.read_checkpoint(V1)
    assert restored.step == 4
    assert set(restored.state) == {"counters", "rng", "loader", "clip", "ema_updates",
                                   "detector", "recovery", "health", "telemetry"}  # no scaler
    assert restored.state["counters"] == {"step": 4, "skipped_steps": raw["skipped_steps"]}
    assert restored.state["detector"] == raw["stability"]["detector"]
    assert restored.state["recovery"] == raw["stability"]["recovery"]
    assert restored.state["ema_updates"] == {"updates": raw["ema_updates"]}
    assert restored.state["loader"] == raw["loader"]
    assert restored.state["telemetry"].keys() == raw["telemetry"].keys()


def test_a_trainer_registry_resumes_from_a_format_1_checkpoint():
    """Every part a format-1 checkpoint holds, restored through the registry as a resume
    does (the loader needs its dataset, which the fixture does not ship)."""
    trained = ckpt.load_trained_model(V1)
    model = Llama(trained.model_config)
    optimizer = build_optimizer(model, OptimConfig())
    counters, clip = Counters(), AdaptiveClip(None, 1.0)
    detector = SpikeDetector(SpikeConfig(min_history=2))
    recovery, health = Recovery(RollbackConfig()), HealthMonitor(HealthConfig())
    state = TrainerState()
    state.register("model", model, rollback=True)
    state.register("optimizer", optimizer, rollback=True)
    for name, part in (("counters", counters), ("clip", clip), ("detector", detector),
                       ("recovery", recovery), ("health", health),
                       ("rng", ValueState(rng_state, set_rng_state))):
        state.register(name, part)
    torch.manual_seed(99)
    state.restore(ckpt.read_checkpoint(V1))
    assert counters.step == 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 trained.model.state_dict().values()))
    steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
    assert steps == {4 - counters.skipped_steps}
    raw = torch.load(V1 / "state.pt", weights_only=True)
    assert torch.equal(torch.get_rng_state(), raw["rng"]["torch_cpu"])
    assert detector.state_dict() == raw["stability"]["detector"]


def test_the_stored_run_predating_train_attention_resumes_with_the_kernel_it_ran():
    """The format-1 run was saved before train.attention existed, when every run attended
    through SDPA: its resume key is accepted with train.attention=sdpa and with no other."""
    saved = ckpt.read_config_raw(V1)
    info = ckpt.read_run_info(V1)
    raw = copy.deepcopy(saved)
    for split in ("train", "val"):  # where the package's corpus is on this machine
        raw["data"][split][0]["path"] = str(corpus_dir() / f"{split}.jsonl.xz")
    keys = {}
    for attention in ("sdpa", "auto", "math"):
        config = RunConfig.model_validate(raw | {"train": raw["train"] | {"attention": attention}})
        keys[attention] = legacy_resume_key(config, saved, info["dataset_version"])
        assert resume_key(config, info["dataset_version"]) != info["resume_key"]
    assert keys == {"sdpa": info["resume_key"], "auto": None, "math": None}


def test_a_newer_format_is_refused_naming_its_version(v1_copy):
    newer = ckpt.FORMAT_VERSION + 1
    (v1_copy / "format.json").write_text(json.dumps({"format_version": newer, "step": 4}))
    with pytest.raises(HeloxError, match=f"format-{newer} checkpoint; this Helox reads "
                                         f"formats 1 to {ckpt.FORMAT_VERSION}") as exc_info:
        ckpt.load_trained_model(v1_copy)
    assert "upgrade Helox" in str(exc_info.value)
    with pytest.raises(HeloxError, match=f"format-{newer}"):
        ckpt.read_checkpoint(v1_copy)
    (v1_copy / "format.json").write_text("{torn")
    with pytest.raises(HeloxError, match="format.json is unreadable"):
        ckpt.read_checkpoint(v1_copy)


def test_a_format_1_state_from_before_a_feature_is_refused_saying_what_to_do(v1_copy):
    state = torch.load(v1_copy / "state.pt", weights_only=True)
    del state["health"], state["telemetry"]  # as written before the health monitors
    torch.save(state, v1_copy / "state.pt")
    with pytest.raises(HeloxError, match="format-1 trainer state written before health, "
                                         "telemetry existed") as exc_info:
        ckpt.read_checkpoint(v1_copy)
    assert "train.init_from" in str(exc_info.value)
    ckpt.load_trained_model(v1_copy)  # its weights still load


def test_a_required_part_missing_from_a_checkpoint_is_named(tmp_path):
    model = Llama(ckpt.load_trained_model(V1).model_config)
    saved = ckpt.save_checkpoint(tmp_path / "run", 1, {"model": model}, {}, {"fingerprint": ""},
                                 keep_last=1)
    state = TrainerState()
    state.register("model", model)
    state.register("counters", Counters())
    with pytest.raises(HeloxError, match="holds no state for 'counters'"):
        state.restore(ckpt.read_checkpoint(saved))
    optional = TrainerState()
    optional.register("model", model)
    optional.register("counters", Counters(step=9), required=False)
    optional.restore(ckpt.read_checkpoint(saved))  # kept fresh
    assert optional.parts()["counters"].step == 9


def test_a_folder_that_is_no_checkpoint_is_named_not_a_traceback(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")  # an export's folder looks like this
    with pytest.raises(HeloxError, match="not a Helox run or checkpoint folder") as exc_info:
        ckpt.load_trained_model(tmp_path)
    assert "helox eval" in exc_info.value.hint
