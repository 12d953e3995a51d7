"""Conversations as OpenAI's chat API shapes them: messages with the roles `system`, `user`,
`assistant` and `tool`; an assistant message may call tools (`tool_calls`: a function name and
its arguments as a JSON string), and a `tool` message answers one call (`tool_call_id`).

A conversation file is JSON Lines, one conversation per line:
    {"messages": [...], "tools": [<JSON schema of each tool>, ...]}
`tools` is optional; so is a line's `id`. A bad line is an error naming its line number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator

from helox.configbase import StrictModel, describe_error
from helox.errors import HeloxError

Role = Literal["system", "user", "assistant", "tool"]


class FunctionCall(StrictModel):
    name: str = Field(min_length=1)
    arguments: str
    """The arguments as a JSON object, serialised (OpenAI's shape)."""

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments are not JSON ({exc.msg})") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object")
        return value

    def parsed_arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments)


class ToolCall(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(StrictModel):
    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant's calls of tools (its `content` may then be empty)."""
    tool_call_id: str | None = None
    """A tool message: the call it answers."""
    name: str | None = None

    @model_validator(mode="after")
    def _fits_its_role(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot call tools; only assistant ones do")
        if self.content is None and not self.tool_calls:
            raise ValueError(f"a {self.role} message needs content")
        return self

    def template_data(self) -> dict[str, Any]:
        """The message as a chat template reads it: keys whose value is None left out, as
        transformers' apply_chat_template does (templates test for a missing key), and a tool
        call's arguments also parsed (templates print them with `tojson`)."""
        data = self.model_dump(exclude_none=True)
        for call in data.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        return data


class Conversation(StrictModel):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    """JSON schemas of the tools the conversation may call (rendered by templates that list
    them)."""
    id: str | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.template_data() for message in self.messages]

    def assistant_turns(self) -> list[int]:
        """Indices of the assistant messages."""
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]


def read_conversations(path: Path) -> Iterator[tuple[int, Conversation]]:
    """(line number, conversation) for every non-blank line of a JSONL file; a line that is
    not a conversation is an error naming it."""
    return read_records(path, Conversation, "a conversation",
                        "each message needs a role (system, user, assistant, tool) and "
                        "content, or an assistant's tool_calls")


Record = TypeVar("Record", bound=StrictModel)


def read_records(path: Path, model: type[Record], what: str, hint: str,
                 ) -> Iterator[tuple[int, Record]]:
    """(line number, `model`) for every non-blank line of a JSONL file; a line that is not
    JSON, or not `what`, is an error naming the file and line and every problem."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield number, model.model_validate(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HeloxError(f"{where}: not JSON ({exc.msg})",
                                 hint=f"one JSON object per line; {hint}") from None
            except ValidationError as exc:
                problems = []
                for err in exc.errors():
                    loc, message = describe_error(err, model)
                    problems.append(f"{'.'.join(loc)}: {message}" if loc else message)
                raise HeloxError(f"{where}: not {what}: " + "; ".join(problems),
                                 hint=hint) from None
