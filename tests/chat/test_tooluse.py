"""The synthetic tool-use set is reproducible, its held-out split shares no request with its
training split, every call fits its tool's schema; the call parser reads back every call the
ChatML and Llama-3 templates render, and the scorer tells well-formed, right-tool and
right-argument generations apart."""

import json
from collections import Counter
from pathlib import Path

import pytest

from helox.chat.messages import FunctionCall, read_conversations
from helox.chat.parity import write_parity_set
from helox.chat.templates import ChatTemplate
from helox.chat.tooluse import (TOOLS, parse_tool_calls, score_calls, tool_use_set,
                                write_tool_use_set)

SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def test_the_set_is_reproducible_and_its_splits_are_disjoint(tmp_path):
    train, test = write_tool_use_set(tmp_path / "a", train=300, test=80, seed=3)
    again = write_tool_use_set(tmp_path / "b", train=300, test=80, seed=3)
    assert [p.read_bytes() for p in (train, test)] == [p.read_bytes() for p in again]
    requests = {name: [c.messages[1].content for _, c in read_conversations(path)]
                for name, path in (("train", train), ("test", test))}
    assert len(requests["train"]) == 300 and len(requests["test"]) == 80
    assert not set(requests["train"]) & set(requests["test"])
    tools = Counter(c.messages[2].tool_calls[0].function.name if c.messages[2].tool_calls
                    else None for _, c in read_conversations(train))
    assert set(tools) == {*SCHEMAS, None} and 10 <= tools[None] <= 60


def test_every_call_fits_its_tools_schema():
    for conversation in tool_use_set(200, seed=0):
        for call in conversation.messages[2].tool_calls or []:
            schema, arguments = SCHEMAS[call.function.name], call.function.parsed_arguments()
            assert set(arguments) == set(schema["required"]) == set(schema["properties"])
            for key, value in arguments.items():
                spec = schema["properties"][key]
                assert value in spec.get("enum", [value])
                assert isinstance(value, {"string": str, "integer": int,
                                          "number": (int, float)}[spec["type"]])


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_the_parser_reads_back_every_rendered_call(template):
    chat = ChatTemplate.builtin(template, {"bos_token": "<s>", "eos_token": "</s>"})
    for conversation in tool_use_set(100, seed=1):
        text = chat.render(conversation)
        for index, start, end in chat.assistant_spans(conversation):
            expected = [c.function for c in conversation.messages[index].tool_calls or []]
            turn = text[start:end]
            assert parse_tool_calls(turn, template) == expected, turn
            assert score_calls(turn, expected, template) == (True, True, True)


def test_the_scorer_tells_malformed_wrong_tool_and_wrong_arguments_apart():
    expected = [FunctionCall(name="set_timer", arguments=json.dumps({"minutes": 5,
                                                                    "label": "tea"}))]
    def call(body: str) -> str:
        return f"<tool_call>\n{body}\n</tool_call><|im_end|>"
    assert score_calls(call('{"name": "set_timer", "arguments": {"label": "tea", '
                            '"minutes": 5}}'), expected, "chatml") == (True, True, True)
    assert score_calls(call('{"name": "set_timer", "arguments": {"minutes": 6, '
                            '"label": "tea"}}'), expected, "chatml") == (True, True, False)
    assert score_calls(call('{"name": "add_event", "arguments": {}}'), expected,
                       "chatml") == (True, False, False)
    assert score_calls(call('{"name": "set_timer", "arguments": {"minutes": 5'), expected,
                       "chatml") == (False, False, False)
    assert score_calls("<tool_call>\n{}", expected, "chatml") == (False, False, False)
    assert score_calls("Sure, five minutes.", expected, "chatml") == (True, False, False)
    assert score_calls("Hello! How can I help?", [], "chatml") == (True, True, True)
    assert score_calls('{"name": "set_timer", "parameters": {"minutes": 5, "label": "tea"}}',
                       expected, "llama3") == (True, True, True)


def test_the_shipped_set_is_the_generators_and_the_suite_loads(tmp_path):
    """src/helox/evals/tool-use/ holds what scripts/build_chat_sets.py writes."""
    from helox.eval.suite import load_suite
    from helox.resources import suites_dir

    shipped = suites_dir() / "tool-use"
    for path in write_tool_use_set(tmp_path, 400, 100, 0):
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name
    loaded = load_suite("tool-use")
    assert len(loaded.items["tool_calls"]) == 100


def test_the_shipped_parity_set_is_what_its_builder_writes(tmp_path):
    """src/helox/evals/parity/ holds what scripts/build_chat_sets.py writes; the splits share no
    number and are balanced."""
    shipped = Path(__file__).resolve().parents[2] / "src" / "helox" / "evals" / "parity"
    for path in write_parity_set(tmp_path):
        assert path.read_text() == (shipped / path.name).read_text(), path.name
    train, test = ([json.loads(line) for line in (shipped / f"{s}.jsonl").open()]
                   for s in ("train", "test"))
    assert not {p["id"] for p in train} & {p["id"] for p in test}
    assert sum(p["chosen"] == "Odd." for p in test) == 50
    assert all((int(p["id"].split("-")[1]) % 2 == 1) == (p["chosen"] == "Odd.") for p in train)
