"""A conversation as training data: its token ids (the rendered text, tokenized without added
special tokens, as `apply_chat_template(tokenize=True)` does) and, per token, whether the loss
is taken on it.

What is trained (`ChatConfig.train_on`, after axolotl's `roles_to_train` / `train_on_eos` and
torchtune's `masking_strategy`):
  assistant       every assistant turn: its content, its tool calls and its end token
  last_assistant  only the last assistant turn
  all             every token
System, user and tool-result tokens, and the assistant headers, are never trained otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from tokenizers import Tokenizer

from helox.chat.messages import Conversation, read_conversations
from helox.chat.templates import ChatTemplate, TemplateRenderError

TrainOn = Literal["assistant", "last_assistant", "all"]


@dataclass
class EncodedConversation:
    ids: list[int]
    trained: list[bool]
    """Per token: whether the loss is taken on it (as a target)."""
    text: str
    """The rendered conversation the ids tokenize."""

    def trained_spans(self) -> list[tuple[int, int]]:
        """(first, end) token indices of each run of trained tokens."""
        spans, start = [], None
        for index, flag in enumerate([*self.trained, False]):
            if flag and start is None:
                start = index
            elif not flag and start is not None:
                spans.append((start, index))
                start = None
        return spans


def encode_conversation(conversation: Conversation, template: ChatTemplate,
                        tokenizer: Tokenizer, train_on: TrainOn = "assistant",
                        ) -> EncodedConversation:
    """The ids of the rendered conversation and the tokens trained under `train_on`; a token
    that straddles the start or end of a trained turn counts as trained (as transformers'
    assistant mask counts it)."""
    text = template.render(conversation)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    if train_on == "all":
        return EncodedConversation(encoding.ids, [True] * len(encoding.ids), text)
    spans = [(start, end) for _, start, end in template.assistant_spans(conversation)]
    if train_on == "last_assistant":
        spans = spans[-1:]
    trained = [any(a < end and b > start for start, end in spans) for a, b in encoding.offsets]
    return EncodedConversation(encoding.ids, trained, text)


def encode_file(path: Path, template: ChatTemplate, tokenizer: Tokenizer,
                train_on: TrainOn = "assistant") -> Iterator[tuple[int, EncodedConversation]]:
    """(line number, encoded conversation) for every conversation of a JSONL file; one the
    template cannot render is an error naming its line."""
    for number, conversation in read_conversations(path):
        try:
            yield number, encode_conversation(conversation, template, tokenizer, train_on)
        except TemplateRenderError as exc:
            raise TemplateRenderError(f"{path}:{number}: {exc.message}") from None
