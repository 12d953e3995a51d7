"""`helox serve`'s HTTP API: OpenAI's (`/v1/completions`, `/v1/chat/completions` with tool
calls and server-sent-event streaming, `/v1/models`), vLLM's adapter endpoints
(`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`), `/healthz`, `/metrics` (Prometheus)
and `/admin/canary`.

Every error is OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with a 4xx
status for what the client sent (malformed JSON, a bad field, an unknown model, a context
overflow) and 5xx for the server's own failures, which are also counted against the version
that failed (the canary's error rate). Nothing a request sends stops the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from starlette.exceptions import HTTPException as StarletteHTTPException

from helox.chat.messages import Conversation
from helox.chat.tooluse import parse_tool_calls
from helox.errors import HeloxError
from helox.events import Publisher
from helox.serve.canary import Router, UnknownModel
from helox.serve.deploy import MODELS_SCHEME, Deployment, registered_adapter_folder
from helox.serve.errors import RequestError
from helox.serve.handle import RequestHandle, Usage
from helox.serve.protocol import (AdapterLoad, AdapterUnload, CanaryUpdate, ChatRequest,
                                  CompletionRequest, error_body, new_id, now_s, usage_body)
from helox.serve.sampling import SamplingParams

log = logging.getLogger("helox.serve")
USER_HEADER = "x-user-id"
VERSION_HEADER = "x-helox-model-version"
TOOL_CALL_OPEN = "<tool_call>"


@dataclass
class ServeState:
    router: Router
    open_registry: Callable[[], object] | None = None
    """The workspace's registry (for adapters named `models:/…`); None: paths only."""
    created_s: int = field(default_factory=now_s)
    adapter_paths: dict[str, str] = field(default_factory=dict)
    publisher: Publisher | None = None
    """Where the canary's rollback is published; closed with the server."""


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    def __init__(self, state: ServeState):
        self.registry = CollectorRegistry()
        labels = ("model", "version", "role")
        self.requests = Counter("helox_serve_requests", "Requests served, by outcome",
                                (*labels, "endpoint", "status"), registry=self.registry)
        self.latency = Histogram("helox_serve_request_seconds", "Seconds per request",
                                 labels, registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tokens = Counter("helox_serve_generated_tokens", "Tokens generated", labels,
                              registry=self.registry)
        self.percent = Gauge("helox_serve_canary_percent", "Share of users routed to the "
                             "candidate", registry=self.registry)
        self.running = Gauge("helox_serve_requests_running", "Requests in the engine's batch",
                             ("model", "version"), registry=self.registry)
        self.waiting = Gauge("helox_serve_requests_waiting", "Requests queued for a batch row",
                             ("model", "version"), registry=self.registry)
        self.state = state

    def render(self) -> bytes:
        self.percent.set(self.state.router.percent)
        for _, deployment in self.state.router.deployments():
            stats = deployment.engine.stats()
            self.running.labels(deployment.name, deployment.version).set(stats.requests_running)
            self.waiting.labels(deployment.name, deployment.version).set(stats.requests_waiting)
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------
# The app


def build_app(state: ServeState) -> FastAPI:
    app = FastAPI(title="helox serve", docs_url=None, redoc_url=None)
    metrics = Metrics(state)
    app.state.helox = state
    _error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "models": [d.describe() for _, d in
                                           state.router.deployments()]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": _model_cards(state)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        role, deployment = state.router.route(body.model, _user(body.user, request))
        engine = deployment.engine
        prompts = [engine.document_prompt(p) for p in body.prompts()]
        params = _params(body, body.max_tokens, body.stop_strings(), None)
        jobs = _submit(deployment, body, prompts, params)
        call = _Call(state, metrics, role, deployment, "completions", body.model, body.n)
        echoes = [p for p in body.prompts() for _ in range(body.n)] if body.echo else None
        if body.stream:
            return _sse(call.stream_completion(jobs, body.include_usage(), echoes),
                        call.headers())
        return await call.complete_text(jobs, echoes)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        role, deployment = state.router.route(body.model, _user(body.user, request))
        setup = deployment.engine.chat
        if setup is None:
            raise RequestError(f"the model {body.model!r} has no chat template",
                               param="messages", hint="use /v1/completions")
        conversation = Conversation(messages=body.messages, tools=body.tools)
        text = setup.template.render(conversation, add_generation_prompt=True)
        prompt = deployment.engine.tokenizer.encode(text, add_special_tokens=False).ids
        stop_ids = set(setup.stop_token_ids) | set(body.stop_token_ids or ())
        params = _params(body, body.completion_limit(), body.stop_strings() + setup.stop,
                         frozenset(stop_ids))
        jobs = _submit(deployment, body, [prompt], params)
        tools = _tool_format(setup.template.source) if body.tools and \
            body.tool_choice != "none" else None
        call = _Call(state, metrics, role, deployment, "chat", body.model, body.n)
        if body.stream:
            return _sse(call.stream_chat(jobs, body.include_usage(), tools), call.headers())
        return await call.complete_chat(jobs, tools)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: AdapterLoad) -> Response:
        loaded = await asyncio.to_thread(load_adapter, state, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added "
                                 f"successfully (on {', '.join(loaded)}).")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: AdapterUnload) -> Response:
        await asyncio.to_thread(_unload_adapter, state, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 f"successfully.")

    @app.get("/admin/canary")
    async def canary() -> dict:
        return state.router.snapshot()

    @app.post("/admin/canary")
    async def set_canary(body: CanaryUpdate) -> dict:
        state.router.set_percent(body.percent)
        log.info("canary split set to %.1f%% by an operator", body.percent)
        return state.router.snapshot()

    return app


# ---------------------------------------------------------------------------------------------
# One request's lifetime: submit, read, answer, count


def _submit(deployment: Deployment, body, prompts: list[list[int]],
            params: SamplingParams) -> list[RequestHandle]:
    """n completions of each prompt (choice i of prompt p is index p·n + i); a seeded
    request's choices take seeds seed, seed + 1, … so that they differ."""
    engine, model = deployment.engine, deployment.engine_model(body.model)
    handles = []
    try:
        for prompt in prompts:
            for i in range(body.n):
                seeded = params if params.seed is None else \
                    replace(params, seed=params.seed + i)
                handles.append(engine.submit(prompt, seeded, model=model))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


@dataclass
class _Call:
    state: ServeState
    metrics: Metrics
    role: str
    deployment: Deployment
    endpoint: str
    model: str
    n: int
    """Choices per prompt."""
    started: float = field(default_factory=time.perf_counter)
    id: str = ""

    def __post_init__(self) -> None:
        self.id = new_id("chatcmpl" if self.endpoint == "chat" else "cmpl")

    def headers(self) -> dict[str, str]:
        return {VERSION_HEADER: self.deployment.version}

    async def complete_text(self, jobs: list[RequestHandle], echoes: list[str] | None
                            ) -> Response:
        results = await self._results(jobs)
        choices = [{"index": i, "text": (echoes[i] if echoes else "") + r.text,
                    "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(results)]
        return JSONResponse(self._body("text_completion", choices,
                                       _sum([r.usage for r in results], self.n)),
                            headers=self.headers())

    async def complete_chat(self, jobs: list[RequestHandle], tools: str | None) -> Response:
        results = await self._results(jobs)
        choices = []
        for i, result in enumerate(results):
            message, reason = _assistant_message(result.text, result.finish_reason, tools)
            choices.append({"index": i, "message": message, "logprobs": None,
                            "finish_reason": reason})
        return JSONResponse(self._body("chat.completion", choices,
                                       _sum([r.usage for r in results], self.n)),
                            headers=self.headers())

    async def stream_completion(self, jobs: list[RequestHandle], include_usage: bool,
                                echoes: list[str] | None) -> AsyncIterator[dict]:
        usages = []
        async with _Counted(self, jobs, usages):
            for index, job in enumerate(jobs):
                if echoes:
                    yield self._chunk("text_completion", [{"index": index, "text": echoes[index],
                                                           "logprobs": None,
                                                           "finish_reason": None}])
                async for output in job:
                    if output.text or output.finished:
                        yield self._chunk("text_completion", [{
                            "index": index, "text": output.text, "logprobs": None,
                            "finish_reason": output.finish_reason}])
                    if output.usage:
                        usages.append(output.usage)
        if include_usage:
            yield self._chunk("text_completion", [], _sum(usages, self.n))

    async def stream_chat(self, jobs: list[RequestHandle], include_usage: bool,
                          tools: str | None) -> AsyncIterator[dict]:
        usages = []
        async with _Counted(self, jobs, usages):
            for index, job in enumerate(jobs):
                yield self._delta(index, {"role": "assistant", "content": ""})
                async for chunk in self._chat_deltas(index, job, tools, usages):
                    yield chunk
        if include_usage:
            yield self._chunk("chat.completion.chunk", [], _sum(usages, self.n))

    async def _chat_deltas(self, index: int, job: RequestHandle, tools: str | None,
                           usages: list[Usage]) -> AsyncIterator[dict]:
        """Content as it comes; from where a tool call may start, held back to the end, then
        sent as `tool_calls` (or as content, when it was no call after all)."""
        text, sent = "", 0
        async for output in job:
            text += output.text
            safe = _tool_free_prefix(text, tools)
            if safe > sent:
                yield self._delta(index, {"content": text[sent:safe]})
                sent = safe
            if output.finished:
                usages.append(output.usage)
                message, reason = _assistant_message(text, output.finish_reason, tools)
                if message.get("tool_calls"):
                    calls = [{"index": i, **call} for i, call in
                             enumerate(message["tool_calls"])]
                    yield self._delta(index, {"tool_calls": calls})
                elif len(text) > sent:
                    yield self._delta(index, {"content": text[sent:]})
                yield self._delta(index, {}, reason)

    async def _results(self, jobs: list[RequestHandle]) -> list:
        usages: list[Usage] = []
        async with _Counted(self, jobs, usages):
            results = [await job.result_async() for job in jobs]
            usages.extend(r.usage for r in results)
        return results

    def record(self, ok: bool, usages: list[Usage], status: str) -> None:
        seconds = time.perf_counter() - self.started
        tokens = sum(u.completion_tokens for u in usages)
        labels = (self.deployment.name, self.deployment.version, self.role)
        self.metrics.requests.labels(*labels, self.endpoint, status).inc()
        self.metrics.latency.labels(*labels).observe(seconds)
        self.metrics.tokens.labels(*labels).inc(tokens)
        decision = self.state.router.record(self.role, ok, seconds, tokens)
        if decision is not None:
            log.warning("canary rolled back: %s", decision.reason)

    def _body(self, kind: str, choices: list[dict], usage: Usage) -> dict:
        return {"id": self.id, "object": kind, "created": now_s(), "model": self.model,
                "system_fingerprint": self._fingerprint(), "choices": choices,
                "usage": usage_body(usage)}

    def _chunk(self, kind: str, choices: list[dict], usage: Usage | None = None) -> dict:
        chunk = {"id": self.id, "object": kind, "created": now_s(), "model": self.model,
                 "system_fingerprint": self._fingerprint(), "choices": choices}
        if usage is not None:
            chunk["usage"] = usage_body(usage)
        return chunk

    def _delta(self, index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return self._chunk("chat.completion.chunk", [{"index": index, "delta": delta,
                                                      "logprobs": None,
                                                      "finish_reason": finish_reason}])

    def _fingerprint(self) -> str:
        """Which weights answered: the version and the first digits of their fingerprint."""
        return f"helox-{self.deployment.version}-{self.deployment.fingerprint[:12]}"


class _Counted:
    """Counts a request once it ends: ok, a server error, or cancelled (the client left:
    counted as ok, the version did nothing wrong); cancels what is still running."""

    def __init__(self, call: _Call, jobs: list[RequestHandle], usages: list[Usage]):
        self.call, self.jobs, self.usages = call, jobs, usages

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind, error, traceback) -> bool:
        for job in self.jobs:
            job.cancel()  # a no-op for finished ones
        server_error = error is not None and not isinstance(
            error, (RequestError, asyncio.CancelledError, GeneratorExit))
        status = "cancelled" if isinstance(error, (asyncio.CancelledError, GeneratorExit)) \
            else "error" if error is not None else "ok"
        self.call.record(not server_error, self.usages, status)
        return False


def _sse(chunks: AsyncIterator[dict], headers: dict[str, str]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except RequestError as exc:  # refused after the stream started: say so in-band
            yield f"data: {json.dumps(_error_json(exc))}\n\n"
        except HeloxError as exc:
            log.exception("a streamed request failed")
            yield f"data: {json.dumps(error_body(exc.message, 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers})


# ---------------------------------------------------------------------------------------------
# Pieces


def _params(body, max_tokens: int | None, stop: tuple[str, ...],
            stop_token_ids: frozenset[int] | None) -> SamplingParams:
    ids = stop_token_ids if stop_token_ids is not None else (
        frozenset(body.stop_token_ids) if body.stop_token_ids else None)
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, stop=stop, stop_token_ids=ids, seed=body.seed)


def _user(field_value: str | None, request: Request) -> str | None:
    return field_value or request.headers.get(USER_HEADER)


def _sum(usages: list[Usage], n: int) -> Usage:
    """One request's usage over its choices (choice i of prompt p at p·n + i): each prompt
    counted once, as OpenAI counts n > 1 (the engine reports it with every choice)."""
    return Usage(sum(u.prompt_tokens for u in usages[::n]),
                 sum(u.completion_tokens for u in usages))


def _tool_format(template_source: str) -> str | None:
    """The tool-call format a chat template writes (helox.chat.tooluse parses both)."""
    if TOOL_CALL_OPEN in template_source:
        return "chatml"
    if "<|eot_id|>" in template_source and "tools" in template_source:
        return "llama3"
    return None


def _tool_free_prefix(text: str, tools: str | None) -> int:
    """How much of `text` is surely content, not the start of a tool call."""
    if tools is None:
        return len(text)
    if tools == "llama3":
        return 0 if not text.strip() or text.lstrip().startswith("{") else len(text)
    at = text.find(TOOL_CALL_OPEN)
    if at >= 0:
        return at
    for keep in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def _assistant_message(text: str, finish_reason: str, tools: str | None) -> tuple[dict, str]:
    """OpenAI's assistant message: tool calls in their shape when the reply makes some."""
    calls = parse_tool_calls(text, tools) if tools else None
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    content = text[:text.find(TOOL_CALL_OPEN)].strip() if tools == "chatml" else ""
    return {"role": "assistant", "content": content or None,
            "tool_calls": [{"id": new_id("call")[:29], "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}}
                           for c in calls]}, "tool_calls"


def _model_cards(state: ServeState) -> list[dict]:
    """Every name a request may use: each deployment's, its engine's base model and its
    adapters (with `parent`, as vLLM lists them)."""
    cards: dict[str, dict] = {}
    for _, deployment in state.router.deployments():
        base = deployment.engine.name
        names = [(deployment.name, base if deployment.adapter else None),
                 (base, None), *((name, base) for name in deployment.engine.model_names()[1:])]
        for name, parent in names:
            cards.setdefault(name, {"id": name, "object": "model", "created": state.created_s,
                                    "owned_by": "helox",
                                    "root": state.adapter_paths.get(name, deployment.source),
                                    "parent": parent})
    return list(cards.values())


def load_adapter(state: ServeState, name: str, lora_path: str) -> list[str]:
    """Load into every served version whose base the adapter was trained on; returns them."""
    folder = _adapter_folder(state, lora_path)
    loaded, refusals = [], []
    for _, deployment in state.router.deployments():
        try:
            deployment.engine.load_adapter(name, folder)
            loaded.append(deployment.describe())
        except HeloxError as exc:
            refusals.append(f"{deployment.describe()}: {exc.message}")
    if not loaded:
        raise RequestError("; ".join(refusals), param="lora_path")
    state.adapter_paths[name] = lora_path
    log.info("adapter %s loaded from %s on %s", name, lora_path, ", ".join(loaded))
    return loaded


def _adapter_folder(state: ServeState, lora_path: str) -> Path:
    if lora_path.startswith(MODELS_SCHEME):
        if state.open_registry is None:
            raise RequestError("this server has no registry to resolve models:/ URIs",
                               param="lora_path")
        return registered_adapter_folder(lora_path, state.open_registry())[1]
    folder = Path(lora_path)
    if not folder.is_dir():
        raise RequestError(f"no adapter folder at {lora_path}", param="lora_path",
                           hint="give a PEFT folder (helox export RUN --format peft)")
    return folder


def _unload_adapter(state: ServeState, name: str) -> None:
    holders = [d for _, d in state.router.deployments()
               if name in d.engine.model_names() and name != d.engine.name]
    if not holders:
        raise AdapterNotFound(name)
    for deployment in holders:
        deployment.engine.unload_adapter(name)
    state.adapter_paths.pop(name, None)
    log.info("adapter %s unloaded", name)


class AdapterNotFound(RequestError):
    http_status = 404
    code = "model_not_found"

    def __init__(self, name: str):
        super().__init__(f"The LoRA adapter {name!r} cannot be found", param="lora_name")


# ---------------------------------------------------------------------------------------------
# Errors


def _error_json(exc: RequestError) -> dict:
    return error_body(exc.message, exc.type, exc.code, exc.param)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(_error_json(exc), status_code=exc.http_status)

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, exc: UnknownModel) -> JSONResponse:
        return JSONResponse(error_body(f"{exc.message}; served: {', '.join(exc.known)}",
                                       "invalid_request_error", "model_not_found", "model"),
                            status_code=404)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            loc = []
        elif loc:
            message = f"{'.'.join(loc)}: {message}"
        return JSONResponse(error_body(message, "invalid_request_error",
                                       first.get("type"), ".".join(loc) or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error",
                                       str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(HeloxError)
    async def helox_error(request: Request, exc: HeloxError) -> JSONResponse:
        return JSONResponse(error_body(exc.message + (f" ({exc.hint})" if exc.hint else ""),
                                       "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}",
                                       "server_error"), status_code=500)
