"""Suite files: every problem of a bad suite or item file is named by file:line at once; the
shipped suites load."""

import json
import textwrap

import pytest

from helox.errors import HeloxError
from helox.eval.suite import GoldenTask, SuiteError, load_suite
from helox.resources import suites_dir


def write(tmp_path, suite: str, items: dict[str, list] | None = None):
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(suite).lstrip())
    for name, lines in (items or {}).items():
        (tmp_path / name).write_text("".join(
            (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD_ITEM = {"prompt": "In the", "choices": [" beginning", " end"], "answer": 0}


def problems(path) -> list[str]:
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    return caught.value.problems


def test_a_missing_key_a_wrong_scorer_and_an_unknown_type_are_named_by_line(tmp_path):
    path = write(tmp_path, """
        name: broken
        tasks:
          - name: one
            type: golden
            items: items.jsonl
          - name: two
            type: golden
            items: items.jsonl
            scorer: fuzzy
          - name: three
            type: trivia
        """, {"items.jsonl": [GOOD_ITEM]})
    found = problems(path)
    assert found == [
        f"{path}:3: tasks.0.scorer: required key is missing",  # the task's line
        f"{path}:9: tasks.1.scorer: Input should be 'exact', 'contains', 'regex', 'choice' or "
        "'perplexity' (got 'fuzzy')",
        f"{path}:11: tasks.2: unknown type 'trivia'; valid types: golden, perplexity, recall, "
        "reasoning, tool_calls"]


def test_broken_jsonl_and_items_unfit_for_their_scorer_are_named_by_line(tmp_path):
    path = write(tmp_path, """
        name: items
        tasks:
          - {name: choose, type: golden, items: items.jsonl, scorer: choice}
        """, {"items.jsonl": [
            GOOD_ITEM,
            {"prompt": "a", "choices": [" b", " c"]},  # no answer
            '{"prompt": "a", "choices": [',  # torn line
            "",
            {"prompt": "a", "choices": [" b", " c"], "answer": 2},
            {"prompt": "a", "choices": [" b", " c"], "answer": 1, "colour": "red"},
            {"id": 1, "prompt": "x", "choices": [" b", " c"], "answer": 0},  # line 1's id
            {"prompt": "a", "scorer": "regex", "pattern": "(unclosed"},
        ]})
    items = tmp_path / "items.jsonl"
    assert problems(path) == [
        f"{items}:2: answer must be the index of a choice (0..1)",
        f"{items}:3: not valid JSON (Expecting value at column 29)",
        f"{items}:5: answer must be the index of a choice (0..1)",
        f"{items}:6: colour: unknown key (valid keys: answer, choices, id, max_ppl, pattern, "
        "prompt, scorer, target)",
        f"{items}:7: id '1' repeats line 1",
        f"{items}:8: pattern is not a valid regular expression (missing ), unterminated "
        "subpattern at position 0)"]


def test_invalid_yaml_a_missing_items_file_and_an_unknown_suite(tmp_path):
    path = write(tmp_path, "name: x\ntasks: [\n")
    assert problems(path)[0].startswith(f"{path}:3: not valid YAML")
    path = write(tmp_path, """
        name: x
        tasks:
          - {name: a, type: golden, items: absent.jsonl, scorer: exact}
          - {name: b, type: perplexity, path: absent.txt}
        """)
    assert problems(path) == [
        f"{path}:3: task a: items file {tmp_path / 'absent.jsonl'} does not exist",
        f"{path}:4: tasks.1.path: absent.txt does not exist"]
    with pytest.raises(HeloxError, match="no eval suite 'nonesuch'") as caught:
        load_suite("nonesuch")
    assert "quickstart" in caught.value.hint


def test_bounds_sources_and_task_names_are_checked(tmp_path):
    path = write(tmp_path, """
        name: x
        tasks:
          - {name: a, type: recall, context_words: [10], depths: [0.5], thresholds: {accuracy: {}}}
          - {name: b, type: perplexity}
        """)
    assert problems(path) == [
        f"{path}:3: tasks.0.thresholds.accuracy: give min, max or both",
        f"{path}:4: tasks.1: give exactly one of source: validation or path: FILE"]
    path = write(tmp_path, """
        name: x
        tasks:
          - {name: a, type: recall, context_words: [10], depths: [0.5]}
          - {name: a, type: reasoning, generator: chained_arithmetic, steps: [1]}
        """)
    assert problems(path) == [f"{path}:3: tasks: task names must be unique: a repeat"]


@pytest.mark.parametrize("suite", sorted(p.parent.name for p in suites_dir().glob("*/suite.yaml")))
def test_every_shipped_suite_loads(suite):
    loaded = load_suite(suite)
    assert loaded.name == suite and len(loaded.sha256) == 64
    for task in loaded.suite.tasks:
        if isinstance(task, GoldenTask):
            assert loaded.items[task.name]
