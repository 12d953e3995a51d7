"""`helox export --format hf`: a folder transformers loads offline, whose logits, tokenization
and greedy generations are Helox's."""

import json

import numpy as np
import pytest
import torch

from helox.errors import HeloxError
from helox.export.exporter import export_model
from helox.export.provenance import safetensors_metadata
from helox.export.source import load_export_source
from helox.model.generate import generate

TEXTS = ["And God said, Let there be light",
         "ROMEO.\nBut soft, what light through yonder window breaks?",
         "def f(x):\n    return x ** 2  # 1234567890 ünïcödé",
         " leading space and  two  spaces"]


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory):
    from helox.export.manifest import generate_key

    key = tmp_path_factory.mktemp("keys") / "helox.pem"
    generate_key(key)
    return key


@pytest.fixture(scope="module", params=["export_run", "untied_run"])
def exported(request, signing_key, tmp_path_factory):
    """Writing a Hugging Face folder needs transformers (its config and tokenizer classes): the
    tests on it skip without, the refusal of an unknown format does not."""
    pytest.importorskip("transformers")
    run_dir = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("hf") / "model"
    return load_export_source(run_dir), export_model(run_dir, "hf", out, key=signing_key)


def load_hf(folder):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def test_transformers_loads_the_folder_with_the_same_logits_and_tokens(exported):
    source, result = exported
    model, tokenizer = load_hf(result.artifact)
    assert sorted(p.name for p in result.artifact.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "helox-manifest.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert model.config.tie_word_embeddings == source.model.cfg.tie_embeddings
    assert model.config.num_key_value_heads == source.model.cfg.kv_heads
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == [source.eos_id, *source.tokenizer.encode(text).ids]
        with torch.no_grad():
            theirs, ours = model(ids).logits, source.model(ids)
        # Measured 0 (the same torch ops); 2e-6 is the fp32 noise of the other runtimes.
        assert torch.allclose(theirs, ours, atol=2e-6, rtol=0), (theirs - ours).abs().max()
        assert tokenizer.decode(ids[0], skip_special_tokens=True) == text


def test_generate_in_transformers_equals_helox_greedy(exported):
    source, result = exported
    model, tokenizer = load_hf(result.artifact)
    ids = tokenizer(TEXTS[0], return_tensors="pt").input_ids
    theirs = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    ours = generate(source.model, ids[0].tolist(), 12, temperature=0, top_k=None,
                    stop_id=source.eos_id)
    assert theirs.tolist()[:len(ours)] == ours
    assert model.generation_config.eos_token_id == source.eos_id


def test_training_metadata_is_in_the_safetensors_header(exported):
    source, result = exported
    embedded = safetensors_metadata(result.artifact / "model.safetensors")
    assert embedded == result.metadata
    assert embedded["helox.run_fingerprint"] == source.run_info["fingerprint"]
    assert embedded["helox.dataset_version"] == source.run_info["dataset_version"]
    assert embedded["helox.checkpoint"] == source.checkpoint.name
    assert len(embedded["helox.model_fingerprint"]) == 64
    card = (result.artifact / "README.md").read_text()
    assert embedded["helox.model_fingerprint"] in card
    manifest = json.loads(result.manifest.read_text())
    assert manifest["metadata"] == embedded and manifest["format"] == "hf"


def test_a_non_empty_folder_is_not_replaced_unless_asked(export_run, signing_key, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(HeloxError, match="exists and is not empty"):
        export_model(export_run, "hf", out, key=signing_key)
    export_model(export_run, "hf", out, key=signing_key, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_unknown_format_is_refused(export_run, signing_key):
    with pytest.raises(HeloxError, match="unknown export format 'tflite'"):
        export_model(export_run, "tflite", key=signing_key)


def test_helox_reads_its_own_export_with_one_eos(exported, tmp_path):
    """The exported tokenizer adds the EOS itself (for transformers users); Helox, which adds
    it too, must not read texts with two: helox eval on the folder, and a dataset prepared
    with its tokenizer.json, see the ids of training."""
    from helox.data.prepare import prepare_dataset
    from helox.eval.lm import load_language_model
    from helox.testing.tiny import tiny_config

    source, result = exported
    lm = load_language_model(result.artifact)
    for text in TEXTS:
        assert lm.document(text) == [source.eos_id, *source.tokenizer.encode(text).ids]
    shards = {}
    for name, tokenizer in (("export", result.artifact / "tokenizer.json"),
                            ("training", source.tokenizer_json)):
        dataset = prepare_dataset(tiny_config(tmp_path / name, [f"tokenizer.path={tokenizer}"],
                                              train_documents=20, val_documents=4))
        shards[name] = [np.fromfile(path, dtype=dataset.dtype).tolist()
                        for path in dataset.shard_paths("train")]
    assert shards["export"] == shards["training"]
