"""The OpenAI API's request and response bodies that `helox serve` speaks, as pydantic models.

Requests refuse unknown fields (OpenAI answers 400 "Unrecognized request argument" too), and
fields OpenAI has but Helox does not implement are refused when set to anything but their
neutral value, naming the field, rather than silently ignored. `top_k` and `stop_token_ids`
are extensions, as vLLM has them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from helox.chat.messages import Message


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields accepted at their neutral value only (see `_unsupported`):
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> Request:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by helox serve; leave it at 0")
        for name in ("logit_bias", "logprobs", "top_logprobs"):
            if getattr(self, name) not in (None, False, {}):
                raise ValueError(f"{name} is not supported by helox serve; leave it unset")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(Request):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_only(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported by helox serve")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported by helox serve; use n")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    max_completion_tokens: int | None = None
    parallel_tool_calls: bool | None = None

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()


class AdapterLoad(BaseModel):
    """vLLM's `/v1/load_lora_adapter` body."""

    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:/@-]+$")
    lora_path: str = Field(min_length=1)
    """A PEFT adapter folder (`helox export RUN --format peft`), or a registered adapter
    (`models:/NAME/VERSION`, `models:/NAME@ALIAS`)."""


class AdapterUnload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None
    """vLLM's; ignored (adapters are named)."""


class CanaryUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    percent: float = Field(ge=0, le=100)
    """Share of users routed to the candidate."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage_body(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}
