"""Conversations as a dataset: chat sources read, cleaned per message, rendered with a chat
template, and packed into rows with a per-token loss mask.

A `format: chat` source is JSON Lines, one record per line, either a conversation
    {"messages": [...], "tools": [...]}
or a prompt and its completion (TRL's shape; text or messages)
    {"prompt": "text" | [messages], "completion": "text" | message | [messages]}
A `format: preference` source holds preference pairs (chat/preferences.py), read as the prompt's
messages followed by the chosen and the rejected response. A record that is not JSON or not a
conversation is counted and skipped, like any bad line of a source; its id is `file:line`, so a
conversation the template later cannot render is an error naming its line.

Cleaning: the steps that rewrite text (normalize, pii, secrets) run on every message content and
every tool call's arguments on their own, so a replacement (`<EMAIL>`, ...) never spans two
messages and the structure survives; the steps that judge a whole document (quality, dedup,
contamination, domain tags) see the conversation's text, its contents joined by blank lines.

Packing (`pack_conversations`): a conversation and its end-of-document token go whole into a row
of `row_tokens` tokens; when the next does not fit, the row is filled with end-of-document
tokens and a new one starts. A conversation longer than a row is cut to fit (and counted). A
preference pair takes a row of its own (`pack_pairs`). The
shards hold the rows back to back, then one more end-of-document token, so block k of the loader
(tokens [kL, kL + L + 1)) is row k and its targets; beside each shard a mask file says, per
token, whether it is trained as a target (the separators and padding never are).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from tokenizers import Tokenizer

from helox.chat.masks import TrainOn, encode_conversation
from helox.chat.messages import Conversation, Message
from helox.chat.preferences import Preference
from helox.chat.templates import BUILTIN, TEMPLATE_FILE, ChatTemplate, TemplateRenderError
from helox.configbase import StrictModel, resolve_input_path
from helox.data.document import Document
from helox.data.pipeline import Step, StepConfig, StepStats
from helox.errors import HeloxError

CONVERSATION_KEY = "conversation"
"""Where a chat document keeps its conversation (Document.metadata)."""
REWRITING_STEPS = frozenset({"normalize", "pii", "secrets"})
"""Steps that edit text: run per message content, never across the conversation's JSON."""


class ChatDataConfig(StrictModel):
    template: str = "tokenizer"
    """The chat template: `tokenizer` (the tokenizer's own, the chat_template.json that
    `helox import-hf` writes beside tokenizer.json), a built-in (chatml, llama3, alpaca), or
    the path of a chat_template.json."""
    train_on: TrainOn = "assistant"
    """Tokens the loss is taken on: every assistant turn (content, tool calls, end token),
    the last assistant turn only, or all tokens."""
    row_tokens: int | None = Field(default=None, gt=1)
    """Tokens per packed row; None takes train.seq_len (they must be equal to train)."""

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str, info: ValidationInfo) -> str:
        if value in ("tokenizer", *BUILTIN):
            return value
        if value.endswith(".json"):  # a file: relative to the recipe, like any input path
            return str(resolve_input_path(Path(value), info))
        raise ValueError(f"unknown chat template {value!r}: use 'tokenizer', one of "
                         f"{', '.join(BUILTIN)}, or the path of a chat_template.json")


def resolve_template(config: ChatDataConfig, tokenizer_path: Path | None,
                     eos_token: str) -> ChatTemplate:
    """The template `config` names. A built-in gets the special tokens of the tokenizer's own
    template file when there is one (an imported model's), else `eos_token` and no BOS."""
    beside = None if tokenizer_path is None else Path(tokenizer_path).parent / TEMPLATE_FILE
    if config.template in BUILTIN:
        special = {"bos_token": "", "eos_token": eos_token}
        if beside is not None and beside.is_file():
            special = dict(ChatTemplate.from_file(beside).special_tokens)
        return ChatTemplate.builtin(config.template, special)
    if config.template != "tokenizer":
        return ChatTemplate.from_file(Path(config.template))
    if beside is None or not beside.is_file():
        raise HeloxError(f"data.chat.template is 'tokenizer' but "
                         f"{beside or 'the trained BPE'} has no chat template",
                         hint=f"set data.chat.template to one of {', '.join(BUILTIN)}, or set "
                              "tokenizer.path to a tokenizer imported with `helox import-hf`")
    return ChatTemplate.from_file(beside)


# ---------------------------------------------------------------------------------------------
# Reading


class CompletionRecord(StrictModel):
    """TRL's prompt/completion shape."""

    prompt: str | list[Message]
    completion: str | Message | list[Message]
    tools: list[dict[str, Any]] | None = None
    id: str | None = None

    def conversation(self) -> Conversation:
        prompt = ([Message(role="user", content=self.prompt)] if isinstance(self.prompt, str)
                  else self.prompt)
        completion = self.completion
        if isinstance(completion, str):
            completion = [Message(role="assistant", content=completion)]
        elif isinstance(completion, Message):
            completion = [completion]
        return Conversation(messages=[*prompt, *completion], tools=self.tools, id=self.id)


def parse_preference_record(record: dict) -> Conversation:
    """A preference pair ({prompt | messages, chosen, rejected}, TRL's shapes) as one
    conversation: the prompt's messages, then the chosen and the rejected response (the
    form the cleaning steps see; `split_preference` takes it apart again)."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    try:
        preference = Preference.model_validate(record)
        chosen, rejected = preference.conversations()
    except ValidationError as exc:
        raise ValueError(_first_problem(exc)) from None
    return Conversation(messages=[*chosen.messages, rejected.messages[-1]], tools=chosen.tools,
                        id=preference.id)


def split_preference(conversation: Conversation) -> tuple[Conversation, Conversation]:
    """(prompt + chosen, prompt + rejected) of a conversation `parse_preference_record` made."""
    *prompt, chosen, rejected = conversation.messages
    return (Conversation(messages=[*prompt, chosen], tools=conversation.tools),
            Conversation(messages=[*prompt, rejected], tools=conversation.tools))


def parse_chat_record(record: dict) -> Conversation:
    """A conversation or prompt/completion record; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    try:
        if "messages" in record:
            return Conversation.model_validate(record)
        if "prompt" in record:
            return CompletionRecord.model_validate(record).conversation()
    except ValidationError as exc:
        raise ValueError(_first_problem(exc)) from None
    raise ValueError("expected `messages`, or `prompt` and `completion`")


def _first_problem(exc: ValidationError) -> str:
    """What is wrong with a record, for the `read` step's removal list (one line)."""
    first = exc.errors()[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def chat_document(conversation: Conversation, doc_id: str, domain: str, source: str,
                  ) -> Document:
    data = conversation.model_dump(exclude_none=True)
    return Document(id=doc_id, text=conversation_text(data),
                    domain=domain, source=source, metadata={CONVERSATION_KEY: data})


def conversation_text(data: dict) -> str:
    """What the whole-document steps judge: the contents and call arguments, blank-line
    separated."""
    return "\n\n".join(text for _, text in _slots(data))


def _slots(data: dict) -> Iterator[tuple[tuple, str]]:
    """(where, text) of every rewritable string: message contents, tool call arguments."""
    for m, message in enumerate(data["messages"]):
        if message.get("content"):
            yield (m, "content"), message["content"]
        for c, call in enumerate(message.get("tool_calls") or []):
            yield (m, "tool_calls", c), call["function"]["arguments"]


def _with_slots(data: dict, texts: dict[tuple, str]) -> dict:
    out = json.loads(json.dumps(data))
    for where, text in texts.items():
        message = out["messages"][where[0]]
        if where[1] == "content":
            message["content"] = text
        else:
            message["tool_calls"][where[2]]["function"]["arguments"] = text
    return out


# ---------------------------------------------------------------------------------------------
# Cleaning


class PerMessageStep:
    """A rewriting step applied to each message of a conversation on its own. When it drops
    one message (a `policy: drop` PII or secrets step), the conversation is dropped."""

    def __init__(self, inner: Step):
        self.inner, self.name, self.scope = inner, inner.name, inner.scope

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            data = doc.metadata[CONVERSATION_KEY]
            slots = dict(_slots(data))
            pieces = [Document(f"{doc.id}#{i}", text, doc.domain, doc.source)
                      for i, text in enumerate(slots.values())]
            inner_stats = StepStats(self.name)
            kept = {piece.id: piece.text for piece in self.inner.run(pieces, inner_stats)}
            stats.changed.update(inner_stats.changed)
            if len(kept) < len(pieces):
                removal = inner_stats.removals[0]
                stats.drop(doc, removal.reason, f"a message: {removal.detail}".rstrip(": "))
                continue
            edited = _with_slots(data, {where: kept[piece.id]
                                        for where, piece in zip(slots, pieces)})
            try:
                conversation = Conversation.model_validate(edited)
            except ValidationError as exc:  # e.g. arguments no longer a JSON object
                stats.drop(doc, "invalid_after_edit", str(exc.errors()[0]["msg"]))
                continue
            yield chat_document(conversation, doc.id, doc.domain, doc.source)


@dataclass(frozen=True)
class PerMessageStepConfig:
    """Builds a step's PerMessageStep (picklable: the pipeline's worker pool builds it)."""

    inner: Any

    @property
    def step(self) -> str:
        return self.inner.step

    @property
    def scope(self) -> str:
        return getattr(self.inner, "scope", "document")

    def build(self) -> PerMessageStep:
        return PerMessageStep(self.inner.build())


def chat_pipeline(configs: list[StepConfig]) -> list[StepConfig]:
    """The cleaning pipeline for conversations: rewriting steps per message."""
    return [PerMessageStepConfig(config) if getattr(config, "step") in REWRITING_STEPS
            else config for config in configs]


# ---------------------------------------------------------------------------------------------
# Encoding and packing


@dataclass
class PackStats:
    conversations: int = 0
    truncated: int = 0
    """Conversations longer than a row, cut to fit (preference pairs: left out)."""
    tokens: int = 0
    trained_tokens: int = 0
    padding_tokens: int = 0
    rows: int = 0
    truncated_ids: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "truncated_ids"} | {
            "truncated_examples": self.truncated_ids[:20]}


@dataclass
class ChatEncoder:
    template: ChatTemplate
    tokenizer: Tokenizer
    train_on: TrainOn
    eos_id: int
    eos_token: str

    def encode(self, doc: dict) -> tuple[list[int], list[bool]]:
        """Token ids and trained flags of one cleaned chat document (scratch JSONL record)."""
        conversation = Conversation.model_validate(doc[CONVERSATION_KEY])
        return self._encode(conversation, doc["id"], self.train_on)

    def encode_pair(self, doc: dict) -> tuple[list[int], list[bool]]:
        """A preference pair's row content: prompt + chosen, EOS, prompt + rejected, EOS;
        only each response (the last assistant turn) is trained."""
        chosen, rejected = split_preference(Conversation.model_validate(doc[CONVERSATION_KEY]))
        ids, trained = [], []
        for conversation in (chosen, rejected):
            side_ids, side_trained = self._encode(conversation, doc["id"], "last_assistant")
            ids += [*side_ids, self.eos_id]
            trained += [*side_trained, False]
        return ids, trained

    def _encode(self, conversation: Conversation, doc_id: str, train_on: TrainOn,
                ) -> tuple[list[int], list[bool]]:
        try:
            encoded = encode_conversation(conversation, self.template, self.tokenizer, train_on)
        except TemplateRenderError as exc:
            raise TemplateRenderError(f"conversation {doc_id}: {exc.message}") from None
        if self.eos_id in encoded.ids:
            raise HeloxError(f"conversation {doc_id}: the {self.template.name} template "
                             f"renders the end-of-document token {self.eos_token!r} inside it, "
                             "so conversations could not be told apart",
                             hint="set tokenizer.eos_token to a token the template never "
                                  "writes (for SmolLM2 and ChatML: <|endoftext|>)")
        return encoded.ids, encoded.trained


def pack_conversations(encoded: Iterable[tuple[str, list[int], list[bool]]], row_tokens: int,
                       eos_id: int, stats: PackStats,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Rows of `row_tokens` (ids, trained flags, conversations in the row) from (id, ids,
    trained) of each conversation, in order; see the module docstring."""
    ids: list[int] = []
    trained: list[bool] = []
    count = 0
    for doc_id, doc_ids, doc_trained in encoded:
        stats.conversations += 1
        if len(doc_ids) + 1 > row_tokens:
            stats.truncated += 1
            stats.truncated_ids.append(doc_id)
            doc_ids, doc_trained = doc_ids[:row_tokens - 1], doc_trained[:row_tokens - 1]
        if len(ids) + len(doc_ids) + 1 > row_tokens:
            yield _close_row(ids, trained, count, row_tokens, eos_id, stats)
            ids, trained, count = [], [], 0
        ids += [*doc_ids, eos_id]
        trained += [*doc_trained, False]
        count += 1
        stats.tokens += len(doc_ids)
        stats.trained_tokens += sum(doc_trained)
    if ids:
        yield _close_row(ids, trained, count, row_tokens, eos_id, stats)


def pack_pairs(encoded: Iterable[tuple[str, list[int], list[bool]]], row_tokens: int,
               eos_id: int, stats: PackStats) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """One preference pair per row (chosen, then rejected: documents 0 and 1 of the row,
    which is how DPO's loss tells them apart); a pair longer than a row is left out and
    counted (cutting one side would compare a cut response with a whole one)."""
    for doc_id, ids, trained in encoded:
        stats.conversations += 1
        if len(ids) > row_tokens:
            stats.truncated += 1
            stats.truncated_ids.append(doc_id)
            continue
        stats.tokens += len(ids)
        stats.trained_tokens += sum(trained)
        yield _close_row(list(ids), list(trained), 1, row_tokens, eos_id, stats)


def _close_row(ids: list[int], trained: list[bool], count: int, row_tokens: int, eos_id: int,
               stats: PackStats) -> tuple[np.ndarray, np.ndarray, int]:
    padding = row_tokens - len(ids)
    stats.padding_tokens += padding
    stats.rows += 1
    return (np.asarray(ids + [eos_id] * padding, dtype=np.int64),
            np.asarray(trained + [False] * padding, dtype=np.uint8), count)
