import json

import numpy as np

from helox.data.prepare import prepare_dataset
from helox.data.shards import DatasetVersion
from helox.data.sources import read_documents
from helox.data.tokenizer import load_tokenizer
from helox.testing.tiny import tiny_config, tiny_mixed_config


def test_manifest_counts_match_the_documents(tiny_dataset, workspace):
    config = tiny_config(workspace)
    docs = list(read_documents(config.data.train[0]))
    train = tiny_dataset.split("train")
    assert train["num_documents"] == len(docs) == 400
    assert sum(s["num_tokens"] for s in train["shards"]) == train["num_tokens"]
    domains = {d.domain for d in docs}
    assert set(train["domain_documents"]) == domains
    assert sum(train["domain_tokens"].values()) == train["num_tokens"]
    assert tiny_dataset.verify() == []


def test_shards_hold_each_document_followed_by_eos(tiny_dataset, workspace):
    config = tiny_config(workspace)
    docs = list(read_documents(config.data.val[0]))
    tokens = np.concatenate([np.fromfile(p, dtype=tiny_dataset.dtype)
                             for p in tiny_dataset.shard_paths("val")])
    eos = tiny_dataset.eos_id
    assert tokens[-1] == eos and (tokens == eos).sum() == len(docs)
    tokenizer = load_tokenizer(tiny_dataset.tokenizer_path)
    pieces = np.split(tokens, np.flatnonzero(tokens == eos) + 1)[:-1]
    by_domain = sorted(docs, key=lambda d: d.domain)  # one shard series per domain, in order
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == [d.text for d in by_domain]


def test_version_is_content_addressed_and_reproducible(tiny_dataset, tmp_path):
    again = prepare_dataset(tiny_config(tmp_path / "elsewhere"))
    assert again.version == tiny_dataset.version
    other = prepare_dataset(tiny_config(tmp_path / "other", train_documents=300))
    assert other.version != tiny_dataset.version


def test_prepare_is_cached_by_inputs(tiny_dataset, workspace):
    calls = []
    again = prepare_dataset(tiny_config(workspace), lambda stage, done: calls.append(stage))
    assert again.version == tiny_dataset.version and calls == []


def test_verify_names_a_corrupted_shard(tmp_path):
    dataset = prepare_dataset(tiny_config(tmp_path, train_documents=50, val_documents=5))
    shard = dataset.shard_paths("train")[0]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert DatasetVersion(dataset.path).verify() == [shard.name]


def test_given_tokenizer_json_is_used(tiny_dataset, tmp_path):
    config = tiny_config(tmp_path, overrides=[f"tokenizer.path={tiny_dataset.tokenizer_path}",
                                              "tokenizer.vocab_size=9999"])
    dataset = prepare_dataset(config)
    assert dataset.manifest["tokenizer"] == tiny_dataset.manifest["tokenizer"]
    assert json.loads((dataset.path / "lineage.json").read_text())["tokenizer_config"]["path"]


def test_unigram_entropy_is_recorded(tiny_dataset):
    entropy = tiny_dataset.manifest["stats"]["unigram_entropy_nats"]
    assert 3.0 < entropy < np.log(tiny_dataset.vocab_size)


def test_synthetic_tasks_skip_the_pipeline_into_their_own_domain(tmp_path):
    config = tiny_mixed_config(tmp_path, [
        "data.synthetic.0.task=passkey", "data.synthetic.0.train_documents=60",
        "data.synthetic.0.val_documents=4", "data.pipeline.0={step: quality}"])
    dataset = prepare_dataset(config)
    assert "synthetic_passkey" in dataset.domains("train")
    assert dataset.split("train")["domain_documents"]["synthetic_passkey"] == 60
    assert dataset.split("val")["domain_documents"]["synthetic_passkey"] == 4
    quality = dataset.report["splits"]["train"][-1]
    assert quality["step"] == "quality" and quality["docs_out"] < quality["docs_in"]
    assert quality["docs_in"] == sum(n for d, n in dataset.split("train")[
        "domain_documents"].items() if d != "synthetic_passkey") + sum(
        quality["dropped"].values())  # the quality rules never saw the synthetic documents
    (task,) = dataset.report["synthetic"]
    assert task["domain"] == "synthetic_passkey" and task["signal"]["local_window_tokens"] == 64
    assert task["signal"]["fraction_beyond"] > 0.8  # measured with the dataset's tokenizer
