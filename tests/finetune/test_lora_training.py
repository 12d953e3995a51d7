"""A LoRA run: the base that train.init_from names stays bitwise frozen, the checkpoints hold
the adapter alone (with the base's fingerprint), readers get the merged model, a resume is
bit-exact, and adapters trained on another base are refused naming both fingerprints."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from helox.checkpoint import list_checkpoints, load_trained_model
from helox.checkpoint.fingerprint import model_fingerprint
from helox.errors import HeloxError
from helox.finetune.lora import (BASE_FINGERPRINT_KEY, adapter_base_fingerprint, apply_lora,
                                 load_adapter, lora_layers, save_adapter_tensors, set_active)
from helox.config import save_config
from helox.observe.metrics import read_metrics, without_wall_clock
from helox.testing.tiny import tiny_config
from helox.training.loop import train

LORA = "lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj]}"


def run(config, dataset, run_dir, until_step=None):
    return train(config, run_dir, dataset, until_step=until_step, console=Console(quiet=True))


def newest(run_dir):
    return list_checkpoints(run_dir)[0]


def losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


@pytest.fixture(scope="module")
def base_run(tiny_dataset, workspace, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    run(tiny_config(workspace, ["train.max_steps=4"]), tiny_dataset, run_dir)
    return run_dir


def lora_config(workspace, base_run, *overrides):
    return tiny_config(workspace, [f"train.init_from={base_run}", LORA, "train.max_steps=6",
                                   "checkpoint.every_steps=3", "optim.lr=1e-2", *overrides])


def test_the_base_stays_frozen_and_checkpoints_hold_the_adapter(tiny_dataset, workspace,
                                                                base_run, tmp_path):
    base = load_trained_model(newest(base_run))
    result = run(lora_config(workspace, base_run, "observe.telemetry.sample_every_steps=3"),
                 tiny_dataset, tmp_path / "lora")  # the probes read adapted layers too
    saved = load_file(result.checkpoint / "model.safetensors")
    assert saved and all(".lora_A.default." in k or ".lora_B.default." in k for k in saved)
    assert len(saved) == 2 * 3 * base.model.cfg.num_layers
    assert not (result.checkpoint / "ema.safetensors").exists()
    info = json.loads((result.checkpoint / "run.json").read_text())["lora"]
    assert info["base_fingerprint"] == model_fingerprint(base.model)
    tuned = load_trained_model(result.checkpoint)
    assert tuned.adapter is not None and tuned.adapter.base_fingerprint == info["base_fingerprint"]
    # The base weights under the adapter are bitwise the base run's (frozen), and the merged
    # model is base + scaling · B A for each adapted layer.
    changed = 0
    for name, weight in base.model.state_dict().items():
        merged = tuned.model.state_dict()[name]
        layer = name.removesuffix(".weight")
        a_key, b_key = f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight"
        if a_key in saved:
            delta = (saved[b_key] @ saved[a_key]) * (8 / 4)
            assert torch.allclose(merged, weight + delta, atol=1e-6)
            changed += int(delta.abs().max() > 0)
        else:
            assert torch.equal(merged, weight), name
    assert changed == 3 * base.model.cfg.num_layers  # every adapter learned something


def test_a_lora_run_resumes_bit_identically(tiny_dataset, workspace, base_run, tmp_path):
    config = lora_config(workspace, base_run)
    run(config, tiny_dataset, tmp_path / "straight")
    run(config, tiny_dataset, tmp_path / "resumed", until_step=3)
    second = run(config, tiny_dataset, tmp_path / "resumed")
    assert second.resumed_from_step == 3
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a, b = (load_file(list_checkpoints(tmp_path / d)[0] / "model.safetensors")
            for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stacked_adapters_add_and_only_the_new_one_trains(tiny_dataset, workspace, base_run,
                                                          tmp_path):
    first = run(lora_config(workspace, base_run), tiny_dataset, tmp_path / "v1")
    v1 = load_trained_model(first.checkpoint)
    folder = save_adapter_tensors(v1.adapter.state, tmp_path / "v1-adapter", v1.adapter.config,
                                  metadata={BASE_FINGERPRINT_KEY: v1.adapter.base_fingerprint})
    assert adapter_base_fingerprint(folder) == v1.adapter.base_fingerprint
    config = lora_config(workspace, base_run, f"lora.stack=[{folder}]", "lora.name=v2",
                         "train.max_steps=3")
    second = run(config, tiny_dataset, tmp_path / "v2")
    saved = load_file(second.checkpoint / "model.safetensors")
    assert all(".v2." in key for key in saved)  # the stacked adapter is not checkpointed
    v2 = load_trained_model(second.checkpoint)
    # v2's merged model = base + v1's delta + v2's delta
    base = load_trained_model(newest(base_run)).model
    expected = load_trained_model(newest(base_run)).model
    load_adapter(expected, folder, "stack0")
    apply_lora(expected, v1.adapter.config, "v2")
    for path, layer in lora_layers(expected).items():
        layer.lora_A["v2"].weight.data.copy_(saved[f"{path}.lora_A.v2.weight"])
        layer.lora_B["v2"].weight.data.copy_(saved[f"{path}.lora_B.v2.weight"])
    set_active(expected, ["stack0", "v2"])
    ids = torch.randint(0, base.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(v2.model(ids), expected(ids), atol=1e-5)
        assert not torch.allclose(v2.model(ids), v1.model(ids), atol=1e-5)


def test_an_adapter_of_another_base_is_refused_naming_both_fingerprints(
        tiny_dataset, workspace, base_run, tmp_path):
    result = run(lora_config(workspace, base_run, "train.max_steps=3"), tiny_dataset,
                 tmp_path / "lora")
    tuned = load_trained_model(result.checkpoint)
    folder = save_adapter_tensors(tuned.adapter.state, tmp_path / "adapter",
                                  tuned.adapter.config,
                                  metadata={BASE_FINGERPRINT_KEY: tuned.adapter.base_fingerprint})
    other = tmp_path / "other-base"
    run(tiny_config(workspace, ["train.max_steps=3", "train.seed=99"]), tiny_dataset, other)
    other_model = load_trained_model(newest(other)).model
    other_fingerprint = model_fingerprint(other_model)
    with pytest.raises(HeloxError) as refused:
        load_adapter(other_model, folder, base_fingerprint=other_fingerprint)
    assert tuned.adapter.base_fingerprint in str(refused.value)
    assert other_fingerprint in str(refused.value)
    # Training on top of it is refused the same way.
    config = lora_config(workspace, other, f"lora.stack=[{folder}]", "lora.name=v2")
    with pytest.raises(HeloxError, match=other_fingerprint):
        run(config, tiny_dataset, tmp_path / "wrong")


def test_a_lora_run_needs_a_base_and_no_ema(workspace):
    with pytest.raises(Exception, match="train.init_from"):
        tiny_config(workspace, [LORA])
    with pytest.raises(Exception, match="ema_decay"):
        tiny_config(workspace, [LORA, f"train.init_from={workspace}", "train.ema_decay=0.9"])


def test_exports_merged_pass_parity_and_the_peft_export_loads_on_the_base(
        tiny_dataset, workspace, base_run, tmp_path):
    """hf/onnx/gguf of a LoRA run hold the merged model (helox parity passes); `peft` is the
    adapter alone, which PeftModel puts on the transformers form of the base for the same
    logits, and which names its base (checkpoint and fingerprint)."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from helox.export.exporter import export_model
    from helox.export.manifest import generate_key, verify_artifact
    from helox.export.parity import run_parity
    from helox.model.hf import to_hf_config, to_hf_state_dict

    result = run(lora_config(workspace, base_run, "train.max_steps=3"), tiny_dataset,
                 tmp_path / "lora")
    report = run_parity(result.checkpoint, formats=["hf", "onnx"])
    assert report.passed, report.as_dict()
    key = tmp_path / "key.pem"
    public = generate_key(key)
    exported = export_model(result.checkpoint, "peft", tmp_path / "peft", key=key)
    assert verify_artifact(exported.artifact, public).passed
    config = json.loads((exported.artifact / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(newest(base_run))
    tuned = load_trained_model(result.checkpoint)
    with safe_open(str(exported.artifact / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()[BASE_FINGERPRINT_KEY] == tuned.adapter.base_fingerprint
    base = load_trained_model(newest(base_run)).model
    hf_base = LlamaForCausalLM(to_hf_config(base.cfg)).eval()
    hf_base.load_state_dict(to_hf_state_dict(base.state_dict(), base.cfg), strict=False)
    peft_model = PeftModel.from_pretrained(hf_base, str(exported.artifact)).eval()
    ids = torch.randint(0, base.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, tuned.model(ids), atol=1e-5)
    with pytest.raises(HeloxError, match="not a LoRA run"):
        export_model(newest(base_run), "peft", tmp_path / "nope", key=key)


def test_the_dry_run_shows_trainable_and_frozen_parameters(workspace, base_run):
    from helox.training.precision import dry_run_plan

    config = lora_config(workspace, base_run)
    config.model.vocab_size = 512
    plan = dry_run_plan(config, torch.device("cpu"), "fp32")
    cfg, rank = config.model, 4
    per_layer = rank * (cfg.d_model + cfg.num_heads * cfg.head_dim) \
        + rank * (cfg.d_model + cfg.kv_heads * cfg.head_dim) + rank * (cfg.ffn_dim + cfg.d_model)
    assert plan["trainable_params"] == cfg.num_layers * per_layer
    assert plan["frozen_params"] == plan["num_params"] - plan["trainable_params"] > 0
    assert plan["gradients_bytes"] == 4 * plan["trainable_params"]
    assert plan["optimizer_state_bytes"] == 8 * plan["trainable_params"]
    assert sum(layer["trainable"] for layer in plan["layers"]) == plan["trainable_params"]


def test_a_lora_run_killed_with_sigkill_resumes_to_the_same_adapter(tiny_dataset, workspace,
                                                                    base_run, tmp_path):
    config = lora_config(workspace, base_run, "train.max_steps=8", "checkpoint.every_steps=2",
                         f"data.version={tiny_dataset.version}")
    recipe = tmp_path / "lora.yaml"
    save_config(config, recipe)
    run(config, tiny_dataset, tmp_path / "straight")
    command = [sys.executable, "-m", "helox.cli", "train", str(recipe), "--run-dir",
               str(tmp_path / "killed")]
    killed = subprocess.run(command, env={**os.environ, "HELOX_FAULT_KILL_AT": "5"},
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    # step 4's checkpoint, or step 2's when the kill came while step 4's was being written
    assert "resuming from step-0000000" in finished.stdout + finished.stderr
    assert [without_wall_clock(m) for m in read_metrics(tmp_path / "killed" / "metrics.jsonl")] \
        == [without_wall_clock(m) for m in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    a, b = (load_file(newest(tmp_path / d) / "model.safetensors") for d in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
