import json

import pytest
from typer.testing import CliRunner

from helox.cli import app
from helox.data import versions
from helox.data.prepare import prepare_dataset
from helox.errors import HeloxError
from helox.testing.tiny import CORPUS, tiny_config

PIPELINE = ['data.pipeline=[{step: domain_tag, overwrite: true, rules: '
            '[{domain: code, patterns: ["\\\\bdef \\\\w+\\\\(", ">>> "]}]}]']


def small(workspace, train_documents=60, extra=()):
    return tiny_config(workspace, overrides=[*PIPELINE, *extra], train_documents=train_documents,
                       val_documents=6)


def test_report_removed_list_and_lineage_are_written(tmp_path):
    eval_set = tmp_path / "eval.jsonl"
    first_doc = json.loads(__import__("lzma").open(CORPUS / "train.jsonl.xz").readline())
    eval_set.write_text(json.dumps({"text": first_doc["text"][:400]}) + "\n")
    extra = [f'data.pipeline.1={{step: contamination, eval_sets: [{{name: heldout, '
             f'path: "{eval_set}"}}]}}']
    config = tiny_config(tmp_path, overrides=[*PIPELINE, *extra], train_documents=60,
                         val_documents=6)
    dataset = prepare_dataset(config)
    train_steps = dataset.report["splits"]["train"]
    assert [s["step"] for s in train_steps] == ["read", "domain_tag", "contamination"]
    val_steps = dataset.report["splits"]["val"]  # contamination checks training data only
    assert [s["step"] for s in val_steps] == ["read", "domain_tag"]
    assert train_steps[0]["docs_out"] == 60 and train_steps[2]["dropped"] == {
        "contaminated_heldout": 1}
    removed = [json.loads(line) for line in (dataset.path / "removed.jsonl").open()]
    assert [(r["split"], r["step"], r["reason"]) for r in removed] == [
        ("train", "contamination", "contaminated_heldout")]
    assert dataset.split("train")["num_documents"] == 59
    lineage = dataset.lineage
    assert lineage["name"] == "default" and lineage["parents"] == []
    assert [s["step"] for s in lineage["pipeline"]] == ["domain_tag", "contamination"]
    assert lineage["sources"]["train"][0]["files"][0]["sha256"]
    assert lineage["statistics"] == dataset.report["splits"]


def test_versions_of_a_name_form_a_history(tmp_path):
    first = prepare_dataset(small(tmp_path, 40))
    second = prepare_dataset(small(tmp_path, 50))
    root = versions.datasets_root(tmp_path)
    assert second.lineage["parents"] == [first.version]
    assert versions.head(root, "default") == second.version
    assert [d.version for d in versions.all_versions(root)] == [second.version, first.version]
    assert versions.resolve(root, second.version[:6]).version == second.version
    result = CliRunner().invoke(app, ["data", "log", "--workspace", str(tmp_path)],
                                terminal_width=200)
    assert result.exit_code == 0
    assert first.version in result.output and "head" in result.output
    result = CliRunner().invoke(app, ["data", "show", second.version[:8], "-w", str(tmp_path)],
                                terminal_width=200)
    assert result.exit_code == 0 and f"parents: {first.version}" in result.output
    assert "domain_tag" in result.output


def test_verify_quarantines_a_flipped_byte_and_points_to_the_parent(tmp_path):
    parent = prepare_dataset(small(tmp_path, 40))
    dataset = prepare_dataset(small(tmp_path, 50))
    shard = dataset.shard_paths("train")[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["data", "verify", dataset.version, "-w", str(tmp_path)])
    assert result.exit_code == 1
    assert shard.name in str(result.exception) and "quarantined" in str(result.exception)
    assert f"data.version={parent.version}" in result.exception.hint
    assert not shard.exists()
    assert (tmp_path / "datasets" / ".quarantine" / dataset.version / shard.name).is_file()
    with pytest.raises(HeloxError, match="quarantined") as refused:
        prepare_dataset(small(tmp_path, 60, [f"data.version={dataset.version}"]))
    assert parent.version in refused.value.hint
    pinned = prepare_dataset(small(tmp_path, 60, [f"data.version={parent.version}"]))
    assert pinned.version == parent.version
    rebuilt = prepare_dataset(small(tmp_path, 50))  # the same inputs rebuild the same version
    assert rebuilt.version == dataset.version and rebuilt.verify() == []


def test_verify_passes_on_an_intact_version(tmp_path):
    dataset = prepare_dataset(small(tmp_path, 30))
    result = CliRunner().invoke(app, ["data", "verify", dataset.version, "-w", str(tmp_path)])
    assert result.exit_code == 0 and "match the manifest" in result.output


def test_excluded_sources_are_reported_and_change_nothing_else(tmp_path):
    extra = [f"data.train.1={{path: {CORPUS / 'val.jsonl.xz'}, trust: 0.1}}",
             "data.min_trust=0.5"]
    with_untrusted = prepare_dataset(small(tmp_path / "a", 40, extra))
    without = prepare_dataset(small(tmp_path / "b", 40))
    assert with_untrusted.version == without.version
    [excluded] = with_untrusted.report["excluded_sources"]
    assert excluded["config_path"] == "data.train.1" and "trust 0.1" in excluded["reason"]


def test_all_sources_expired_is_a_clear_error(tmp_path):
    config = small(tmp_path, 10, ["data.train.0.expires_on=2020-01-01"])
    with pytest.raises(HeloxError, match="every training source is excluded"):
        prepare_dataset(config)
