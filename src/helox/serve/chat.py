"""The chat template of a served checkpoint and the tokens that end an assistant turn.

A chat-SFT run's EOS is the separator between packed conversations (`<|endoftext|>`), which
the model never writes at the end of a reply: it writes the template's turn end
(`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3), so a chat request must stop on both."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from tokenizers import Tokenizer

from helox.chat.messages import Conversation, Message
from helox.chat.templates import TEMPLATE_FILE, ChatTemplate, TemplateRenderError
from helox.checkpoint import TrainedModel
from helox.checkpoint.layout import TOKENIZER_FILE, run_dir_of
from helox.data.chat import ChatDataConfig, resolve_template
from helox.errors import HeloxError

CHAT_FORMATS = ("chat", "preference")
_SENTINEL = "\x00helox-reply\x00"


@dataclass(frozen=True)
class ChatSetup:
    """How the served model chats: render a conversation with `template` (generation prompt
    on), and stop on `stop_token_ids` (the EOS and the turn end) and `stop` strings (a turn
    end that is not one token of the vocabulary)."""

    template: ChatTemplate
    stop_token_ids: frozenset[int]
    stop: tuple[str, ...] = ()


def chat_setup(trained: TrainedModel, template: str | None = None) -> ChatSetup | None:
    """The template a checkpoint chats with and its stops, or None when it has none.
    `template` (a built-in name, "tokenizer" or a chat_template.json path) overrides; else a
    chat-trained run's own `data.chat.template`; else the chat_template.json that
    `helox import-hf` saved beside the tokenizer (of this run, or of a LoRA run's base)."""
    resolved = served_template(trained, template)
    if resolved is None:
        return None
    turn_ids, turn_strings = turn_end(resolved, trained.tokenizer)
    return ChatSetup(resolved, frozenset({trained.eos_id, *turn_ids}), turn_strings)


def served_template(trained: TrainedModel, template: str | None = None) -> ChatTemplate | None:
    raw = trained.config
    beside = _template_folder(trained)
    tokenizer_path = None if beside is None else beside / TOKENIZER_FILE
    if template is None and _trained_on_chat(raw):
        template = ((raw.get("data") or {}).get("chat") or {}).get("template", "tokenizer")
    if template is None:
        template = "tokenizer" if beside is not None else None
    if template is None:
        return None
    try:
        config = ChatDataConfig(template=template)
    except ValidationError as exc:
        raise HeloxError(f"chat template {template!r}: {exc.errors()[0]['msg']}",
                         hint="name a built-in (chatml, llama3, alpaca), 'tokenizer', or an "
                              "existing chat_template.json") from None
    return resolve_template(config, tokenizer_path, trained.eos_token)


def _trained_on_chat(raw: dict) -> bool:
    data = raw.get("data") or {}
    sources = [*(data.get("train") or []), *(data.get("val") or [])]
    return any(isinstance(s, dict) and s.get("format") in CHAT_FORMATS for s in sources)


def _template_folder(trained: TrainedModel) -> Path | None:
    """The first folder holding a chat_template.json: the tokenizer's (its config's
    tokenizer.path), the checkpoint's run folder, the checkpoint, a LoRA run's base's."""
    tokenizer_path = (trained.config.get("tokenizer") or {}).get("path")
    candidates = [Path(tokenizer_path).parent if tokenizer_path else None,
                  trained.run_dir, trained.checkpoint]
    if trained.adapter is not None:
        candidates += [run_dir_of(trained.adapter.base_checkpoint),
                       trained.adapter.base_checkpoint]
    return next((folder for folder in candidates
                 if folder is not None and (Path(folder) / TEMPLATE_FILE).is_file()), None)


def turn_end(template: ChatTemplate, tokenizer: Tokenizer) -> tuple[set[int], tuple[str, ...]]:
    """What the template writes after an assistant reply (found by rendering one): its id
    when the vocabulary has it as one token, else the text as a stop string; nothing when the
    template writes nothing there or cannot render a plain exchange."""
    conversation = Conversation(messages=[Message(role="user", content="Hi"),
                                          Message(role="assistant", content=_SENTINEL)])
    try:
        rendered = template.render(conversation)
    except TemplateRenderError:
        return set(), ()
    _, found, after = rendered.partition(_SENTINEL)
    end = after.strip()
    if not found or not end:
        return set(), ()
    token_id = tokenizer.token_to_id(end)
    return ({token_id}, ()) if token_id is not None else (set(), (end,))
