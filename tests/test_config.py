from pathlib import Path

import pytest
import yaml

from helox.config import (ConfigError, apply_override, load_config, read_saved_config,
                          save_config)
from helox.testing.tiny import QUICKSTART, tiny_raw_config


def write_recipe(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def problems_of(exc_info):
    return dict(exc_info.value.problems)


def test_quickstart_recipe_loads_with_public_keys():
    config = load_config(QUICKSTART, ["train.max_steps=200", "optim.lr=1e-3"])
    assert config.train.max_steps == 200 and config.optim.lr == 1e-3
    for key in ("seed", "max_steps", "micro_batch_size", "grad_accum_steps", "seq_len"):
        assert hasattr(config.train, key)
    assert config.checkpoint.every_steps > 0 and config.checkpoint.keep_last >= 1
    assert config.data.train[0].path.is_absolute()  # resolved against the recipe folder


def test_every_problem_is_reported_at_once_with_its_dotted_path(tmp_path):
    raw = tiny_raw_config(tmp_path)
    raw["train"]["max_stpes"] = 5
    raw["train"]["micro_batch_size"] = "eight"
    raw["optim"]["lr"] = -0.1
    raw["data"]["train"][0]["path"] = "missing.jsonl"
    with pytest.raises(ConfigError) as exc_info:
        load_config(write_recipe(tmp_path, raw))
    problems = problems_of(exc_info)
    assert set(problems) == {"train.max_stpes", "train.micro_batch_size", "optim.lr",
                             "data.train.0.path"}
    assert "did you mean 'max_steps'" in problems["train.max_stpes"]
    assert "'eight'" in problems["train.micro_batch_size"]
    assert "greater than 0" in problems["optim.lr"]
    assert "file not found" in problems["data.train.0.path"]
    assert "missing.jsonl" in problems["data.train.0.path"]


def test_unknown_section_is_refused(tmp_path):
    raw = tiny_raw_config(tmp_path) | {"trian": {}}
    with pytest.raises(ConfigError) as exc_info:
        load_config(write_recipe(tmp_path, raw))
    assert "did you mean 'train'" in problems_of(exc_info)["trian"]


def test_cross_section_checks_name_the_field_to_edit(tmp_path):
    raw = tiny_raw_config(tmp_path)
    raw["train"]["seq_len"] = 128  # model.max_seq_len is 64
    with pytest.raises(ConfigError) as exc_info:
        load_config(write_recipe(tmp_path, raw))
    assert "exceeds model.max_seq_len" in problems_of(exc_info)["train.seq_len"]


def test_model_shape_problems(tmp_path):
    raw = tiny_raw_config(tmp_path)
    raw["model"]["num_kv_heads"] = 3
    with pytest.raises(ConfigError) as exc_info:
        load_config(write_recipe(tmp_path, raw))
    assert "multiple of num_kv_heads" in problems_of(exc_info)["model"]


def test_overrides_parse_yaml_values_and_reach_into_lists():
    raw = {"train": {"max_steps": 1}, "data": {"train": [{"path": "a"}]}}
    assert apply_override(raw, "train.max_steps=50") is None
    assert apply_override(raw, "train.compile=true") is None
    assert apply_override(raw, "data.train.0.path=b.jsonl") is None
    assert raw["train"] == {"max_steps": 50, "compile": True}
    assert raw["data"]["train"][0]["path"] == "b.jsonl"
    assert apply_override(raw, "no_equals_sign")[1].startswith("an override must look like")
    assert apply_override(raw, "data.train.5.path=x")[1] == "no such list item to override"


def test_bad_override_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc_info:
        load_config(QUICKSTART, ["train.max_steps=-3", "train.bogus=1"])
    problems = problems_of(exc_info)
    assert set(problems) == {"train.max_steps", "train.bogus"}


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("recipe", sorted(QUICKSTART.parent.glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_recipe_loads_and_its_saved_config_reads_back(recipe, tmp_path):
    # A fine-tuning recipe names its base on the command line (a folder that exists).
    needs_base = recipe.name in ("sft.yaml", "dpo.yaml")
    config = load_config(recipe, [f"train.init_from={tmp_path}"] if needs_base else [])
    save_config(config, tmp_path / "config.yaml")  # what run folders and checkpoints hold
    assert read_saved_config(tmp_path / "config.yaml") == config


def test_missing_lists_are_created_by_index_overrides():
    raw = tiny_raw_config(Path("ws"))
    assert apply_override(raw, "data.synthetic.0.task=passkey") is None
    assert apply_override(raw, "data.synthetic.1.task=kv_recall") is None
    assert raw["data"]["synthetic"] == [{"task": "passkey"}, {"task": "kv_recall"}]
    assert apply_override(raw, "data.synthetic.5.task=x") is not None


def test_a_relative_path_given_with_set_is_read_from_the_current_folder(tmp_path, monkeypatch):
    """A path typed on the command line is relative to where it was typed; one written in the
    recipe to the recipe's folder."""
    recipe_dir, here = tmp_path / "recipes", tmp_path / "here"
    (here / "corpus").mkdir(parents=True)
    (here / "corpus" / "docs.txt").write_text("a document\n")
    recipe_dir.mkdir()
    (recipe_dir / "docs.txt").write_text("another\n")
    (recipe_dir / "r.yaml").write_text("data: {train: [{path: docs.txt}]}\n"
                                       "train: {eval_every_steps: 0}\n")
    monkeypatch.chdir(here)
    assert load_config(recipe_dir / "r.yaml").data.train[0].path == recipe_dir / "docs.txt"
    config = load_config(recipe_dir / "r.yaml", ["data.train.0.path=corpus/docs.txt",
                                                 "train.seq_len=64"])
    assert config.data.train[0].path == here / "corpus" / "docs.txt"
    assert config.train.seq_len == 64
