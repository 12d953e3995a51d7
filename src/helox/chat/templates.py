"""Chat templates: the tokenizer's own Jinja template, or one of the built-in ChatML, Llama-3 and
Alpaca templates, rendered the way transformers' `apply_chat_template` renders them.

Why not call transformers: it is an optional dependency of Helox, and training needs more than
the rendered text, namely where each assistant turn starts and ends. The engine below is
transformers' (a sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, its
`tojson` filter, `raise_exception`, `strftime_now`, `dict` and `namespace`, the special tokens
and `tools` as variables, keys whose value is None left out of messages), so a conversation
renders to the same text, and tokenizes to the same ids; tests/chat/ compares them with
transformers for SmolLM2's own template, ChatML and Llama-3.

Assistant turns are found by rendering prefixes: turn i spans from the end of the
conversation before it rendered with the generation prompt (the assistant header) to the end
of the conversation up to it. That works for any template that renders a conversation as the
concatenation of its turns, which is checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from helox.chat.messages import Conversation
from helox.errors import HeloxError

CHATML = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- 'You may call one or more functions. Their signatures are within <tools></tools>:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each call, return a JSON object with the function name and arguments \
within <tool_call></tool_call>:\\n<tool_call>\\n{"name": <name>, "arguments": <arguments>}\\n\
</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{- raise_exception('a system message must come first') }}{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.content %}{{- message.content }}{%- endif %}
{%- for call in message.tool_calls or [] %}
{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}
{{- '<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' \
+ call.function.arguments | tojson + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>tool\\n<tool_response>\\n' + message.content \
+ '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
"""ChatML (`<|im_start|>role … <|im_end|>`), with tool calls in `<tool_call>` tags and tool
results in `<tool_response>` tags as Hermes and Qwen2.5 write them."""

LLAMA3 = """\
{{- bos_token }}
{%- if messages and messages[0].role == 'system' %}{%- set system = messages[0].content %}\
{%- else %}{%- set system = '' %}{%- endif %}
{%- if system or tools %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}
{{- 'Environment: ipython\\n\\nYou have access to the following functions. To call one, \
respond with JSON of the form {"name": function name, "parameters": dictionary of argument \
name and its value}.\\n\\n' }}
{%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
{%- endif %}
{{- system + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{- raise_exception('a system message must come first') }}{%- endif %}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- elif message.role == 'assistant' %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- if message.content %}{{- message.content }}{%- endif %}
{%- for call in message.tool_calls or [] %}
{{- '{"name": "' + call.function.name + '", "parameters": ' + call.function.arguments | tojson \
+ '}' }}
{%- endfor %}
{{- '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content \
+ '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\
{%- endif %}
"""
"""Llama 3's headers (`<|start_header_id|>role<|end_header_id|>`, `<|eot_id|>`), with tools
as Llama 3.1 describes them: JSON calls `{"name", "parameters"}`, results from `ipython`."""

ALPACA = """\
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{- raise_exception('a system message must come first') }}{%- endif %}
{{- message.content + '\\n\\n' }}
{%- elif message.role == 'user' %}
{{- '### Instruction:\\n' + message.content + '\\n\\n' }}
{%- elif message.role == 'assistant' %}
{%- if message.tool_calls %}{{- raise_exception('the alpaca template has no tool calls') }}\
{%- endif %}
{{- '### Response:\\n' + message.content + eos_token + '\\n\\n' }}
{%- else %}
{{- raise_exception("the alpaca template has no role '" + message.role + "'") }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}
"""
"""Alpaca's instruction/response blocks; no tools."""

BUILTIN = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA}
TEMPLATE_FILE = "chat_template.json"
"""A tokenizer's own template, saved beside its tokenizer.json."""


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    """A built-in's name, or where the template came from (e.g. "tokenizer")."""
    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()
    """(bos_token, "<s>"), (eos_token, "</s>"), …: what transformers passes to templates."""

    @classmethod
    def builtin(cls, name: str, special_tokens: dict[str, str] | None = None) -> ChatTemplate:
        if name not in BUILTIN:
            raise HeloxError(f"unknown chat template {name!r}",
                             hint=f"choose one of {', '.join(BUILTIN)}, or the tokenizer's own")
        return cls(name, BUILTIN[name], tuple(sorted((special_tokens or {}).items())))

    @classmethod
    def from_file(cls, path: Path) -> ChatTemplate:
        """A template saved with `save` (`helox import-hf` saves the imported tokenizer's
        as chat_template.json beside its tokenizer.json)."""
        try:
            raw = json.loads(Path(path).read_text())
            return cls(raw["name"], raw["template"],
                       tuple(sorted(raw.get("special_tokens", {}).items())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HeloxError(f"{path}: not a chat template file ({exc})",
                             hint="re-import the model with `helox import-hf`, or choose a "
                                  "built-in template") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"name": self.name, "template": self.source,
                                          "special_tokens": dict(self.special_tokens)},
                                         indent=1, ensure_ascii=False))

    def render(self, conversation: Conversation, add_generation_prompt: bool = False,
               upto: int | None = None) -> str:
        """The conversation as text (its first `upto` messages)."""
        messages = conversation.template_messages()[:upto]
        try:
            return compile_template(self.source).render(
                messages=messages, tools=conversation.tools, documents=None,
                add_generation_prompt=add_generation_prompt, **dict(self.special_tokens))
        except jinja2.TemplateError as exc:
            raise TemplateRenderError(f"the {self.name} chat template cannot render this "
                                      f"conversation: {exc}") from None

    def assistant_spans(self, conversation: Conversation) -> list[tuple[int, int, int]]:
        """(message index, first char, end char) of every assistant turn in `render()`: its
        content, tool calls and end token; not its header, nor the whitespace after it."""
        full = self.render(conversation)
        spans = []
        for index in conversation.assistant_turns():
            head = self.render(conversation, add_generation_prompt=True, upto=index)
            upto = self.render(conversation, upto=index + 1)
            if not (upto.startswith(head) and full.startswith(upto)):
                raise TemplateRenderError(
                    f"the {self.name} chat template does not render a conversation as the "
                    f"concatenation of its turns (at message {index}), so its assistant turns "
                    "cannot be found")
            # The turn ends with its end token: the whitespace the template puts after it
            # is never generated, so it is not trained.
            end = max(len(head), len(upto.rstrip()))
            spans.append((index, len(head), end))
            self._check_tool_calls(conversation, index, full[len(head):end])
        return spans

    def _check_tool_calls(self, conversation: Conversation, index: int, text: str) -> None:
        """A template without tool support renders an assistant's calls as nothing: refuse
        rather than train on turns whose calls vanished."""
        for call in conversation.messages[index].tool_calls or []:
            if call.function.name not in text:
                raise TemplateRenderError(
                    f"the {self.name} chat template does not render tool calls (message "
                    f"{index} calls {call.function.name})")


class TemplateRenderError(HeloxError):
    """A conversation the chosen template cannot render (a role or a tool call it lacks)."""

    def __init__(self, message: str):
        super().__init__(message, hint="choose a template that has it (data.chat.template: "
                                       "chatml and llama3 render tool calls), or drop the "
                                       "conversation")


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """`source` compiled in transformers' sandboxed environment (see the module docstring)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = jinja2.utils.Namespace
    return env.from_string(source)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: json.dumps without Jinja's HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class Generation(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask markers) renders
    its body; Helox finds assistant turns by prefixes instead."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()
