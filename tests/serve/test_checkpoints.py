"""Engines built the ways `helox serve` builds them: from a transformers folder, from the run
`helox import-hf` makes of it (its chat template and turn end found), and from a base run with
the adapter `helox export --format peft` writes of a LoRA run on it, which gives what the LoRA
run's merged model gives."""

import pytest
import torch
from rich.console import Console

from helox.checkpoint import list_checkpoints, load_trained_model
from helox.data.tokenizer import train_bpe
from helox.errors import HeloxError
from helox.export.exporter import export_model
from helox.export.importing import import_hf
from helox.model.config import ModelConfig
from helox.model.generate import generate
from helox.model.hf import to_hf_config, to_hf_state_dict
from helox.model.llama import Llama
from helox.serve.engine import Engine
from helox.serve.sampling import SamplingParams
from helox.testing.tiny import tiny_config
from helox.training.loop import train

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPTS = [[5, 6, 7], [100, 200, 40, 50, 60], [9, 10]]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def served(engine, prompts, model=None):
    handles = [engine.submit(prompt, GREEDY, model=model) for prompt in prompts]
    return [list(handle.result().token_ids) for handle in handles]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny transformers Llama with a ChatML tokenizer (EOS `<|endoftext|>`), and the
    Helox model it holds."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = train_bpe(["the cat sat on the mat by the door"] * 10, 300, 2, "<|endoftext|>")
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64, init_std=0.1, tie_embeddings=False)
    model = Llama(cfg).eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-chat"
    hf = LlamaForCausalLM(to_hf_config(cfg))
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg))
    hf.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                            chat_template=CHATML).save_pretrained(folder)
    return folder, model, tokenizer


def test_a_transformers_folder_and_its_import_serve_the_same_tokens(hf_folder, tmp_path):
    folder, model, tokenizer = hf_folder
    expected = [generate(model, p, 12, 0, None, stop_id=0) for p in PROMPTS]
    turn_end = {tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")}
    with Engine.from_hf(folder) as engine:
        assert served(engine, PROMPTS) == expected
        assert engine.name == "tiny-chat" and engine.chat.stop_token_ids == turn_end
    import_hf(folder, tmp_path / "imported")
    with Engine.from_checkpoint(tmp_path / "imported", name="smol") as engine:
        assert served(engine, PROMPTS) == expected
        assert engine.model_names() == ["smol"]
        assert engine.chat.template.source == CHATML and engine.chat.stop_token_ids == turn_end


def test_a_lora_runs_peft_export_served_on_its_base_gives_the_merged_model(
        tiny_dataset, workspace, tmp_path):
    def run(overrides, run_dir):
        return train(tiny_config(workspace, overrides), run_dir, tiny_dataset,
                     console=Console(quiet=True))

    base_run = tmp_path / "base"
    run(["train.max_steps=4"], base_run)
    lora_run = tmp_path / "lora"
    run([f"train.init_from={base_run}", "lora={rank: 4, alpha: 128, target_modules: "
         "[q_proj, v_proj, down_proj]}", "train.max_steps=3", "optim.lr=5e-2"], lora_run)
    adapter = export_model(lora_run, "peft", out=tmp_path / "adapter").artifact
    merged = load_trained_model(list_checkpoints(lora_run)[0]).model
    base = load_trained_model(list_checkpoints(base_run)[0]).model
    # Seeded sampling at temperature 1, as generate() draws: a 4-step model's greedy choices
    # do not move, its draws do (a large alpha makes 3 steps of adapter training show).
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    with Engine.from_checkpoint(base_run) as engine:
        engine.load_adapter("sft", adapter)
        handles = [engine.submit(p, sampled, model=name) for name in ("sft", None)
                   for p in PROMPTS]
        tuned, untuned = ([list(h.result().token_ids) for h in part]
                          for part in (handles[:3], handles[3:]))
    assert untuned == [sample(base, p) for p in PROMPTS]
    assert tuned == [sample(merged, p) for p in PROMPTS]
    assert tuned != untuned
    with Engine.from_checkpoint(lora_run) as engine:  # the merged model is not its base
        with pytest.raises(HeloxError, match="fingerprint"):
            engine.load_adapter("sft", adapter)


def sample(model, prompt):
    return generate(model, prompt, 12, 1.0, None, stop_id=0,
                    generator=torch.Generator().manual_seed(7))
