"""Why a request is refused, typed so that a server maps each to its OpenAI error body
(`{"error": {"message", "type", "param", "code"}}`) and HTTP status."""

from __future__ import annotations

from helox.errors import HeloxError


class RequestError(HeloxError):
    """A request the engine refuses at submit: a bad parameter (HTTP 400)."""

    http_status = 400
    type = "invalid_request_error"
    code = "invalid_value"

    def __init__(self, message: str, param: str | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.param = param
        """The request field at fault (OpenAI's `param`), e.g. "temperature"."""


class ContextLengthError(RequestError):
    """The prompt plus max_tokens do not fit the model's context (max_seq_len)."""

    code = "context_length_exceeded"


class UnknownModelError(RequestError):
    """`model` names neither the served model nor a loaded adapter (or one being unloaded)."""

    http_status = 404
    code = "model_not_found"


class EngineClosedError(RequestError):
    """The engine was closed before or while serving the request."""

    http_status = 503
    type = "server_error"
    code = "engine_closed"
