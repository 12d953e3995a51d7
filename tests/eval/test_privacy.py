"""Membership inference: the attacks' scores by hand, the member/non-member sampler, and the
must-show: a model that memorised its members is caught (AUC near 1), a model that never saw
them is not (AUC near 0.5)."""

import json
import lzma
import random
import shutil
import zlib

import numpy as np
import pytest
import torch
from rich.console import Console

from helox.data.access import AccessDenied
from helox.data.prepare import prepare_dataset
from helox.data.shards import DatasetVersion
from helox.data.tokenizer import load_tokenizer
from helox.errors import HeloxError
from helox.eval.lm import LanguageModel, helox_forward, load_language_model
from helox.model.llama import Llama
from helox.eval.privacy import (loss_attack, membership_inference, min_k_attack,
                                privacy_table, run_privacy, sample_documents,
                                sample_membership, tpr_at_fpr, zlib_attack)
from helox.testing.tiny import CORPUS, tiny_config
from helox.checkpoint import list_checkpoints
from helox.training.loop import train

NUM_MEMBERS, NUM_NON_MEMBERS, NUM_OTHER = 24, 40, 48
TRAIN_STEPS = 150  # 8 × 64 tokens a step over ~5k member tokens: ~15 epochs


# ---------------------------------------------------------------------------------------------
# Attacks on known log-probs

LOGPROBS = [np.array([-0.1, -5.0, -0.2, -3.0, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8]),
            np.array([-2.0, -1.0])]


def test_loss_attack_is_the_mean_token_logprob():
    np.testing.assert_allclose(loss_attack(LOGPROBS), [-11.6 / 10, -1.5])


def test_min_k_averages_the_lowest_fraction_of_tokens():
    # 20% of 10 tokens: the two lowest (-5, -3); of 2 tokens: floor(0.4) → at least one (-2).
    np.testing.assert_allclose(min_k_attack(LOGPROBS, 0.2), [-4.0, -2.0])
    np.testing.assert_allclose(min_k_attack(LOGPROBS, 0.3), [(-5.0 - 3.0 - 0.8) / 3, -2.0])
    np.testing.assert_allclose(min_k_attack(LOGPROBS, 1.0), loss_attack(LOGPROBS))
    with pytest.raises(HeloxError, match="not in"):
        min_k_attack(LOGPROBS, 0.0)


def test_zlib_attack_divides_by_the_compressed_length():
    texts = ["abc" * 50, "the quick brown fox jumps over the lazy dog"]
    expected = [np.mean(lp) / len(zlib.compress(t.encode())) for lp, t in zip(LOGPROBS, texts)]
    np.testing.assert_allclose(zlib_attack(LOGPROBS, texts), expected)
    # Repetitive text compresses well: the same loss counts as weaker evidence of membership.
    same = [np.array([-1.0]), np.array([-1.0])]
    repetitive, varied = zlib_attack(same, texts)
    assert repetitive < varied


def test_tpr_at_fpr_counts_members_above_the_non_member_threshold():
    non_members = np.arange(10.0)  # 0..9
    members = np.array([9.5, 8.5, 7.5, 1.0])
    assert tpr_at_fpr(members, non_members, 0.0) == 0.25  # above every non-member: 9.5
    assert tpr_at_fpr(members, non_members, 0.1) == 0.5  # one non-member (9) may pass
    assert tpr_at_fpr(members, non_members, 0.25) == 0.75  # two may pass: threshold 7
    assert tpr_at_fpr(members, non_members, 1.0) == 1.0


# ---------------------------------------------------------------------------------------------
# Datasets and models: members, non-members and disjoint "other" documents drawn at random
# from one pool (short docstrings of the bundled corpus), so the splits differ only in which
# documents the model trained on.


def write_pool(out_dir):
    with lzma.open(CORPUS / "train.jsonl.xz", "rt") as f:
        pool = [doc for doc in map(json.loads, f)
                if doc["domain"] == "technical" and 300 <= len(doc["text"]) <= 1000]
    random.Random(0).shuffle(pool)
    sizes = {"members": NUM_MEMBERS, "non_members": NUM_NON_MEMBERS, "other": NUM_OTHER}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for name, size in sizes.items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(doc) + "\n"
                                       for doc in pool[start:start + size]))
        start += size
    return paths


def config_for(workspace, name, train_path, val_path, tokenizer=None):
    overrides = [f"data.name={name}", f"data.train.0.path={train_path}",
                 f"data.val.0.path={val_path}", "train.seq_len=64", "train.micro_batch_size=8",
                 f"train.max_steps={TRAIN_STEPS}", "optim.weight_decay=0",
                 "optim.warmup_steps=10", "train.eval_every_steps=0",
                 f"checkpoint.every_steps={TRAIN_STEPS}", "sample.prompts=[]"]
    if tokenizer is not None:
        overrides.append(f"tokenizer.path={tokenizer}")
    return tiny_config(workspace, overrides)


@pytest.fixture(scope="module")
def mia(tmp_path_factory):
    """Two models with one tokenizer (trained on the `other` documents, so it favours neither
    split): `memorised` trained on the members, `disjoint` on the other documents."""
    workspace = tmp_path_factory.mktemp("mia")
    paths = write_pool(workspace / "pool")
    other_config = config_for(workspace, "other", paths["other"], paths["non_members"])
    other = prepare_dataset(other_config)
    config = config_for(workspace, "members", paths["members"], paths["non_members"],
                        other.tokenizer_path)
    dataset = prepare_dataset(config)
    runs = workspace / "runs"
    train(config, runs / "memorised", dataset, console=Console(quiet=True))
    train(other_config, runs / "disjoint", other, console=Console(quiet=True))
    return {"dataset": dataset, "config": config, "paths": paths, "runs": runs}


def read_texts(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Sampling


def test_members_are_exactly_the_training_documents_read_as_in_training(mia):
    dataset, paths = mia["dataset"], mia["paths"]
    tokenizer, eos = load_tokenizer(dataset.tokenizer_path), dataset.eos_id
    sample = sample_membership(dataset, num_documents=200, min_tokens=1, max_tokens=40)

    def expected(name):
        return sorted([eos, *tokenizer.encode(t).ids[:40]] for t in read_texts(paths[name]))

    assert sorted(sample.members.sequences) == expected("members")  # a small set: all of it
    assert sorted(sample.non_members.sequences) == expected("non_members")
    assert sample.members.num_documents == NUM_MEMBERS


def test_sampling_is_seeded(mia):
    dataset = mia["dataset"]
    first = sample_documents(dataset, "val", 10, seed=3).sequences
    assert sample_documents(dataset, "val", 10, seed=3).sequences == first
    assert sample_documents(dataset, "val", 10, seed=4).sequences != first
    assert len(first) == 10 and len({tuple(s) for s in first}) == 10


def test_too_short_documents_are_skipped_and_counted(mia):
    dataset, paths = mia["dataset"], mia["paths"]
    tokenizer = load_tokenizer(dataset.tokenizer_path)
    lengths = [len(tokenizer.encode(t).ids) for t in read_texts(paths["non_members"])]
    min_tokens = int(np.median(lengths))
    sample = sample_documents(dataset, "val", 200, min_tokens=min_tokens, max_tokens=500)
    assert sample.too_short == sum(n < min_tokens for n in lengths) > 0
    assert len(sample.sequences) == sum(n >= min_tokens for n in lengths)
    assert all(len(s) - 1 >= min_tokens for s in sample.sequences)


def test_a_non_member_equal_to_a_member_is_dropped(mia):
    dataset = mia["dataset"]
    members = sample_documents(dataset, "val", 5, seed=0).sequences  # pretend: members
    sample = sample_documents(dataset, "val", 200, seed=1, exclude=members)
    assert sample.duplicates == 5 and len(sample.sequences) == NUM_NON_MEMBERS - 5


def test_warns_when_a_split_has_fewer_documents_than_asked(mia):
    warnings = []
    sample_membership(mia["dataset"], num_documents=30, warn=warnings.append)
    assert len(warnings) == 1 and "train split gave 24 of the 30" in warnings[0]


# ---------------------------------------------------------------------------------------------
# The must-show


def test_a_memorised_model_is_caught(mia):
    warnings = []
    report = run_privacy(mia["runs"] / "memorised", max_tokens=64, warn=warnings.append)
    loss, min_k = report.attack("loss"), report.attack("min_k")
    assert loss.auc.value > 0.9 and loss.auc.low > 0.7, loss
    assert min_k.auc.value > 0.9 and min_k.auc.low > 0.7, min_k
    assert report.member_loss_nats.high < report.non_member_loss_nats.low
    assert (report.num_members, report.num_non_members) == (NUM_MEMBERS, NUM_NON_MEMBERS)
    assert report.dataset_version == mia["dataset"].version
    train_tokens = sum(s["num_tokens"] for s in mia["dataset"].split("train")["shards"])
    assert report.epochs_trained == pytest.approx(TRAIN_STEPS * 8 * 64 / train_tokens)
    assert report.epochs_trained > 10
    assert any("gave 24 of the 200" in w for w in warnings)
    record = json.loads(json.dumps(report.as_dict()))
    assert record["attacks"][0]["name"] == "loss"
    assert record["attacks"][0]["auc"]["value"] == loss.auc.value
    console = Console(record=True, width=120)
    console.print(privacy_table(report))
    assert "min_k (20%)" in console.export_text()


def chance(result):
    return result.auc.low <= 0.5 <= result.auc.high


def test_a_model_trained_on_other_documents_scores_chance(mia):
    """Same distribution, same training, but neither split was trained on: the attack sees no
    difference (the members' AUC above comes from membership, not from the split)."""
    warnings = []
    report = run_privacy(mia["runs"] / "disjoint", max_tokens=64,
                         dataset=mia["dataset"].path, warn=warnings.append)
    assert chance(report.attack("loss")) and chance(report.attack("min_k")), report.attacks
    assert any("was trained on dataset" in w for w in warnings)
    assert report.epochs_trained is None  # its epochs are over other documents


def test_an_untrained_model_scores_chance(mia):
    trained = load_language_model(mia["runs"] / "memorised")
    config = mia["config"].model.model_copy(update={"vocab_size": trained.vocab_size})
    torch.manual_seed(0)
    fresh = LanguageModel(helox_forward(Llama(config).eval()), trained.tokenizer,
                          trained.eos_id, trained.max_seq_len, trained.vocab_size, "fresh",
                          "fresh", torch.device("cpu"))
    sample = sample_membership(mia["dataset"], max_tokens=64)
    report = membership_inference(fresh, sample.members.sequences, sample.non_members.sequences)
    assert chance(report.attack("loss")) and chance(report.attack("min_k")), report.attacks


# ---------------------------------------------------------------------------------------------
# Errors


def copied_checkpoint(mia, tmp_path):
    """The memorised run's checkpoint outside its run folder, to edit its run.json."""
    source = list_checkpoints(mia["runs"] / "memorised")[-1]
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def test_a_missing_dataset_is_a_clear_error(mia, tmp_path):
    checkpoint = copied_checkpoint(mia, tmp_path)
    run_info = json.loads((checkpoint / "run.json").read_text())
    run_info["dataset_path"] = str(tmp_path / "gone")
    (checkpoint / "run.json").write_text(json.dumps(run_info))
    with pytest.raises(HeloxError, match=f"dataset version {run_info['dataset_version']}.*is "
                                         "not in the workspace") as error:
        run_privacy(checkpoint)
    assert "datasets/" in error.value.hint


def test_a_folder_without_run_json_needs_the_dataset_given(mia, tmp_path):
    checkpoint = copied_checkpoint(mia, tmp_path)
    (checkpoint / "run.json").unlink()
    with pytest.raises(HeloxError, match="no run.json names the dataset"):
        run_privacy(checkpoint)
    report = run_privacy(checkpoint, dataset=mia["dataset"].path, num_documents=8)
    assert report.num_members == 8 and report.epochs_trained is None


def test_reading_the_training_data_needs_read_permission(mia):
    with pytest.raises(AccessDenied, match="'mallory' may not read"):
        run_privacy(mia["runs"] / "memorised", principal="mallory", num_documents=4)


def test_a_shard_with_fewer_documents_than_its_manifest_is_refused(mia, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(mia["dataset"].path, copy)
    shard = copy / mia["dataset"].split("val")["shards"][0]["file"]
    tokens = np.fromfile(shard, dtype=mia["dataset"].dtype)
    tokens[: len(tokens) // 2].tofile(shard)  # as if cut short on the way
    with pytest.raises(HeloxError, match="end-of-document tokens but the manifest lists"):
        sample_documents(DatasetVersion(copy), "val", 10)


def test_helox_eval_privacy_prints_the_table_and_stores_the_report(mia, tmp_path):
    from typer.testing import CliRunner

    from helox.cli import app

    result = CliRunner().invoke(app, ["eval", str(mia["runs"] / "memorised"), "--privacy",
                                      "--privacy-max-tokens", "64", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "Membership inference" in result.output and "min_k (20%)" in result.output
    (stored,) = tmp_path.glob("evals/privacy/step-*/privacy.json")
    record = json.loads(stored.read_text())
    assert record["attacks"][0]["name"] == "loss" and record["attacks"][0]["auc"]["value"] > 0.9
