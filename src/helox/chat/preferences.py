"""Preference pairs for DPO: a prompt and two responses, the chosen and the rejected one.

A preference file is JSON Lines, one pair per line, in either of TRL's shapes:
    {"prompt": "text", "chosen": "text", "rejected": "text"}
    {"messages": [<the conversation so far>], "chosen": <assistant message or [message]>,
     "rejected": ...}
A plain-text prompt is one user turn and a plain-text response one assistant turn. Each pair is
rendered with the chat template as two conversations that differ only in their last assistant
turn, which alone is trained (its tokens are the completion whose log-probability DPO uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import model_validator
from tokenizers import Tokenizer

from helox.chat.masks import EncodedConversation, encode_conversation
from helox.chat.messages import Conversation, Message, read_records
from helox.chat.templates import ChatTemplate, TemplateRenderError
from helox.configbase import StrictModel


class Preference(StrictModel):
    prompt: str | None = None
    messages: list[Message] | None = None
    chosen: str | Message | list[Message]
    rejected: str | Message | list[Message]
    tools: list[dict[str, Any]] | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> Preference:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give the prompt as `prompt` (text) or `messages`, not both")
        for side in ("chosen", "rejected"):
            if _response(getattr(self, side)).role != "assistant":
                raise ValueError(f"the {side} response must be an assistant message")
        return self

    def conversations(self) -> tuple[Conversation, Conversation]:
        """(prompt + chosen, prompt + rejected)."""
        context = self.messages if self.messages is not None else \
            [Message(role="user", content=self.prompt)]
        return tuple(Conversation(messages=[*context, _response(side)], tools=self.tools)
                     for side in (self.chosen, self.rejected))


def _response(value: str | Message | list[Message]) -> Message:
    if isinstance(value, str):
        return Message(role="assistant", content=value)
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError("a response is one assistant message")
        return value[0]
    return value


@dataclass
class EncodedPair:
    chosen: EncodedConversation
    rejected: EncodedConversation
    """Each trained only on its response (the last assistant turn)."""


def encode_preference(preference: Preference, template: ChatTemplate,
                      tokenizer: Tokenizer) -> EncodedPair:
    chosen, rejected = (encode_conversation(conversation, template, tokenizer,
                                            "last_assistant")
                        for conversation in preference.conversations())
    return EncodedPair(chosen, rejected)


def read_preferences(path: Path) -> Iterator[tuple[int, Preference]]:
    """(line number, pair) for every non-blank line; a bad line is an error naming it."""
    return read_records(path, Preference, "a preference pair",
                        "each line needs a prompt (or messages), chosen and rejected")


def encode_preferences(path: Path, template: ChatTemplate, tokenizer: Tokenizer,
                       ) -> Iterator[tuple[int, EncodedPair]]:
    for number, preference in read_preferences(path):
        try:
            yield number, encode_preference(preference, template, tokenizer)
        except TemplateRenderError as exc:
            raise TemplateRenderError(f"{path}:{number}: {exc.message}") from None
