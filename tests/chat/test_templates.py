"""Chat templates render and tokenize a conversation exactly as transformers'
`apply_chat_template` does, for SmolLM2-135M-Instruct's tokenizer with its own template and
with the built-in ChatML, Llama-3 and Alpaca templates, on multi-turn conversations with tool
calls; the trained tokens decode to the assistant turns and nothing else."""

import json

import pytest

from helox.chat.masks import encode_conversation, encode_file
from helox.chat.messages import Conversation, read_conversations
from helox.chat.templates import BUILTIN, ChatTemplate, TemplateRenderError
from helox.errors import HeloxError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city"]}}}


def call(name: str, arguments: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


TOOL_USE = Conversation.model_validate({"tools": [WEATHER], "messages": [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Is it warmer in Paris or in Oslo?"},
    {"role": "assistant", "content": "Let me look both up.", "tool_calls": [
        call("get_weather", {"city": "Paris", "unit": "C"}, "call_1"),
        call("get_weather", {"city": "Oslo", "unit": "C"}, "call_2")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"},
    {"role": "tool", "tool_call_id": "call_2", "content": "{\"temperature\": 9}"},
    {"role": "assistant", "content": "Paris: 21 °C against Oslo's 9 °C."},
    {"role": "user", "content": "And in Rome, in Fahrenheit?"},
    {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Rome", "unit": "F"},
                                              "call_3")]},
    {"role": "tool", "tool_call_id": "call_3", "content": "{\"temperature\": 75}"},
    {"role": "assistant", "content": "75 °F in Rome."}]})
PLAIN = Conversation.model_validate({"messages": [  # no system message: SmolLM2 adds its own
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another, in French?"},
    {"role": "assistant", "content": "Rouge."}]})


def helox_template(hf, name: str) -> ChatTemplate:
    if name == "tokenizer":
        return ChatTemplate("tokenizer", hf.chat_template,
                            tuple(sorted(hf.special_tokens_map.items())))
    return ChatTemplate.builtin(name, hf.special_tokens_map)


def transformers_ids(hf, template: ChatTemplate, conversation: Conversation) -> list[int]:
    return hf.apply_chat_template(conversation.template_messages(), tools=conversation.tools,
                                  chat_template=template.source, tokenize=True,
                                  return_dict=False)


@pytest.mark.parametrize("name, conversation", [
    ("tokenizer", PLAIN), ("chatml", PLAIN), ("chatml", TOOL_USE), ("llama3", PLAIN),
    ("llama3", TOOL_USE), ("alpaca", PLAIN)])
def test_the_ids_are_transformers_ids(smollm2, name, conversation):
    hf, tokenizer = smollm2
    template = helox_template(hf, name)
    encoded = encode_conversation(conversation, template, tokenizer)
    assert encoded.ids == transformers_ids(hf, template, conversation)
    assert encoded.text == hf.apply_chat_template(
        conversation.template_messages(), tools=conversation.tools,
        chat_template=template.source, tokenize=False)
    prompt = template.render(conversation, add_generation_prompt=True, upto=3)
    assert prompt == hf.apply_chat_template(conversation.template_messages()[:3],
                                            tools=conversation.tools,
                                            chat_template=template.source, tokenize=False,
                                            add_generation_prompt=True)


def test_the_trained_tokens_are_every_assistant_turn_with_its_end_token(smollm2):
    hf, tokenizer = smollm2
    encoded = encode_conversation(TOOL_USE, helox_template(hf, "chatml"), tokenizer)
    trained = [tokenizer.decode(encoded.ids[a:b], skip_special_tokens=False)
               for a, b in encoded.trained_spans()]
    assert trained == [
        'Let me look both up.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "C"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Oslo", "unit": "C"}}\n</tool_call><|im_end|>',
        "Paris: 21 °C against Oslo's 9 °C.<|im_end|>",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "F"}}\n'
        '</tool_call><|im_end|>',
        "75 °F in Rome.<|im_end|>"]
    assert not any(word in "".join(trained)
                   for word in ("system", "Is it warmer", "temperature", "<|im_start|>"))


def test_last_assistant_and_all_tokens(smollm2):
    hf, tokenizer = smollm2
    template = helox_template(hf, "llama3")
    last = encode_conversation(TOOL_USE, template, tokenizer, "last_assistant")
    (span,) = last.trained_spans()
    assert tokenizer.decode(last.ids[slice(*span)], skip_special_tokens=False) == \
        "75 °F in Rome.<|eot_id|>"
    assert all(encode_conversation(TOOL_USE, template, tokenizer, "all").trained)


def test_a_template_without_tool_calls_is_refused_not_trained_on_silently(smollm2):
    """SmolLM2's template prints a message's content and nothing else: a turn with text and
    calls would lose its calls, a turn with calls only does not render."""
    hf, tokenizer = smollm2
    template = helox_template(hf, "tokenizer")
    with_text = Conversation(messages=TOOL_USE.messages[:6], tools=TOOL_USE.tools)
    with pytest.raises(TemplateRenderError, match="does not render tool calls .message 2 "
                                                  "calls get_weather"):
        encode_conversation(with_text, template, tokenizer)
    with pytest.raises(TemplateRenderError, match="cannot render this conversation"):
        encode_conversation(TOOL_USE, template, tokenizer)


def test_a_role_the_template_lacks_is_an_error_naming_the_line(smollm2, tmp_path):
    hf, tokenizer = smollm2
    path = tmp_path / "chats.jsonl"
    path.write_text(PLAIN.model_dump_json(exclude_none=True) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Weather?"},
                                               {"role": "tool", "content": "21"}]}) + "\n")
    encoded = encode_file(path, helox_template(hf, "alpaca"), tokenizer)
    assert next(encoded)[0] == 1
    with pytest.raises(TemplateRenderError, match=r"chats.jsonl:3: the alpaca chat template "
                                                  r"cannot render .* no role 'tool'"):
        next(encoded)


def test_bad_lines_are_named(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n'
                    '{"messages": [{"role": "assistant"}]}\n')
    with pytest.raises(HeloxError, match="chats.jsonl:2: not a conversation: .*needs content"):
        list(read_conversations(path))
    path.write_text('{"messages": [{"role": "user", "content": "Hi", "contnet": 1}]}\n')
    with pytest.raises(HeloxError, match="chats.jsonl:1: .*contnet"):
        list(read_conversations(path))
    with pytest.raises(HeloxError, match="unknown chat template 'vicuna'"):
        ChatTemplate.builtin("vicuna")
    assert set(BUILTIN) == {"chatml", "llama3", "alpaca"}
