"""A bounded load test of `helox serve` over HTTP, for tests/serve/test_load.py and
bench/serve.py: N concurrent clients send completions for T seconds (or until a request budget
is spent) while a chaos task, at set times, swaps LoRA adapters and shifts the canary.

- **Clients.** One asyncio task per client, each with its own `openai.AsyncOpenAI` (retries
  off, so that a failure is seen, not retried away) and its own `user` id, so the canary's
  sticky split applies to it. Greedy requests (temperature 0: an answer can be checked against
  a reference) of a fixed `max_tokens`, every other one streamed with
  `stream_options.include_usage`; the first `adapter_clients` clients name the current adapter
  once one is loaded, the others the served model. Every request is recorded: ok or its error,
  latency, time to first token (streams), completion tokens, which version answered (the
  `x-helox-model-version` header and the `system_fingerprint`), the model id asked, its text.
- **Adapter swaps without failed requests.** A request naming an adapter that is being
  unloaded is refused with a 404 by design, so a swap never unloads a name a client may still
  send: it loads the new adapter under a NEW name, moves the adapter clients to it, waits until
  no request naming the old one is in flight (the clients count them), and only then unloads
  the old one. The first swap is a plain load.
- **Canary shifts** are `POST /admin/canary {percent}`.
After each chaos step the ids `/v1/models` lists are recorded, so a test can check the swap
happened. Needs the `openai` package (the test extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Sequence

import httpx
import numpy as np
import openai

from helox.serve.app import VERSION_HEADER

DEFAULT_PROMPTS = (
    "The history of the city begins",
    "In the morning the market",
    "Scientists have long wondered why",
    "The recipe calls for two cups of",
    "Once upon a time, in a small village near the river,",
    "The committee met on Tuesday to discuss",
)


@dataclass(frozen=True)
class LoadConfig:
    clients: int = 8
    """Concurrent clients, each with its own connection pool and user id."""
    duration_s: float = 20.0
    """No request is sent after this many seconds (those in flight finish)."""
    max_requests: int | None = None
    """A budget of requests over all clients; None: only the duration bounds the run."""
    max_tokens: int = 32
    """Every request's max_tokens."""
    adapter_clients: int = 2
    """How many clients name the current adapter (once one is loaded)."""
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    """Client i's k-th request sends prompt (i + k) mod len(prompts)."""
    request_timeout_s: float = 120.0
    """A request not answered in this long fails."""
    user_prefix: str = "user"
    """Client i's user id is `{user_prefix}-{i}`."""


@dataclass
class RequestRecord:
    client: int
    user: str
    model: str
    """The model id the request named (the served model or an adapter)."""
    prompt: str
    stream: bool
    started_s: float
    """Seconds since the load test started."""
    finished_s: float = 0.0
    error: str | None = None
    """None: the request succeeded."""
    ttft_s: float | None = None
    """Streams: seconds from sending to the first chunk with a choice."""
    completion_tokens: int = 0
    version: str | None = None
    """The `x-helox-model-version` header of the answer."""
    fingerprint: str | None = None
    """The answer's `system_fingerprint` (`helox-VERSION-WEIGHTS`)."""
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_s(self) -> float:
        return self.finished_s - self.started_s


@dataclass(frozen=True)
class CanaryStep:
    """At `at_s`, route `percent` of the users to the candidate."""

    at_s: float
    percent: float

    def describe(self) -> str:
        return f"canary {self.percent:g}%"


@dataclass(frozen=True)
class AdapterStep:
    """At `at_s`, load `folder` as adapter `name`, move the adapter clients to it and unload
    the adapter they named before (once no request names it)."""

    at_s: float
    name: str
    folder: Path

    def describe(self) -> str:
        return f"adapter {self.name}"


@dataclass
class ChaosEvent:
    action: str
    started_s: float
    finished_s: float = 0.0
    error: str | None = None
    models: tuple[str, ...] = ()
    """The ids /v1/models listed once the step was done."""
    unloaded: str | None = None
    """The adapter an adapter step unloaded."""


@dataclass(frozen=True)
class Summary:
    requests: int
    failed: int
    failures: list[str]
    """Each failed request and chaos step, with its error."""
    seconds: float
    """From the start to the last answer."""
    requests_per_s: float
    tokens_per_s: float
    """Generated (completion) tokens per second, over all answers."""
    latency_s: dict[str, float]
    """p50, p95, p99 of the successful requests' latencies."""
    ttft_s: dict[str, float]
    """p50, p95 of the successful streams' times to first token."""
    by_version: dict[str, int]
    """Successful answers per system_fingerprint (the version and its weights)."""
    by_model: dict[str, int]
    """Successful answers per model id asked (the served model, each adapter)."""


@dataclass
class LoadResult:
    records: list[RequestRecord]
    events: list[ChaosEvent]
    summary: Summary


Step = CanaryStep | AdapterStep


def chaos_plan(duration_s: float, adapters: Sequence[tuple[str, Path]],
               percents: Sequence[float]) -> list[Step]:
    """Adapter and canary steps alternated (adapter first), evenly spaced over the first 80%
    of the run, so that traffic flows before, between and after them."""
    ordered = [step for pair in itertools.zip_longest(adapters, percents)
               for step in pair if step is not None]
    spacing = 0.8 * duration_s / (len(ordered) + 1)
    return [AdapterStep((i + 1) * spacing, *step) if isinstance(step, tuple)
            else CanaryStep((i + 1) * spacing, step) for i, step in enumerate(ordered)]


def run_load(url: str, model: str, config: LoadConfig = LoadConfig(),
             plan: Sequence[Step] = ()) -> LoadResult:
    """Load the server at `url` (the served model's id is `model`) as `config` says, with the
    chaos `plan`; returns every request, every chaos step and the summary."""
    return asyncio.run(_run(url, model, config, list(plan)))


async def _run(url: str, model: str, config: LoadConfig, plan: list[Step]) -> LoadResult:
    started = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - started

    slot, budget = AdapterSlot(), _Budget(config.max_requests)
    records: list[RequestRecord] = []
    events: list[ChaosEvent] = []
    clients = [_client(i, url, model, config, slot, budget, clock, records)
               for i in range(config.clients)]
    await asyncio.gather(_chaos(url, plan, slot, clock, events), *clients)
    return LoadResult(records, events, summarize(records, events, clock()))


# ---------------------------------------------------------------------------------------------
# Clients


class AdapterSlot:
    """The adapter the adapter clients name now, and how many requests in flight name each
    adapter: what lets a swap unload the old adapter only once no request can name it."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.in_flight: Counter[str] = Counter()
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[str | None]:
        """The adapter to name (None: none loaded yet), counted in flight until the block
        ends. Reading and counting happen with no await between, so a swap sees them."""
        name = self.current
        if name is not None:
            self.in_flight[name] += 1
        try:
            yield name
        finally:
            if name is not None:
                self.in_flight[name] -= 1
                async with self._changed:
                    self._changed.notify_all()

    async def drained(self, name: str) -> None:
        """Once no request in flight names `name` (call after moving `current` off it)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight[name] == 0)


class _Budget:
    def __init__(self, limit: int | None) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left is None:
            return True
        self.left -= 1
        return self.left >= 0


async def _client(index: int, url: str, model: str, config: LoadConfig, slot: AdapterSlot,
                  budget: _Budget, clock: Callable[[], float],
                  records: list[RequestRecord]) -> None:
    """One user sending requests back to back until the duration or the budget is spent."""
    user = f"{config.user_prefix}-{index}"
    uses_adapter = index < config.adapter_clients
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0,
                                  timeout=config.request_timeout_s) as client:
        for k in itertools.count():
            if clock() >= config.duration_s or not budget.take():
                return
            prompt = config.prompts[(index + k) % len(config.prompts)]
            async with _adapter_of(slot, uses_adapter) as adapter:
                record = RequestRecord(index, user, adapter or model, prompt,
                                       stream=(index + k) % 2 == 0, started_s=clock())
                await _send(client, record, config.max_tokens, clock)
            records.append(record)


def _adapter_of(slot: AdapterSlot, uses_adapter: bool):
    return slot.use() if uses_adapter else contextlib.nullcontext(None)


async def _send(client: openai.AsyncOpenAI, record: RequestRecord, max_tokens: int,
                clock: Callable[[], float]) -> None:
    """Send the request and fill in `record`; any exception is the request's failure (the
    load test counts failures, whatever raised them)."""
    request = dict(model=record.model, prompt=record.prompt, max_tokens=max_tokens,
                   temperature=0, user=record.user)
    try:
        if record.stream:
            await _streamed(client, record, request, clock)
        else:
            await _whole(client, record, request)
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    record.finished_s = clock()


async def _whole(client: openai.AsyncOpenAI, record: RequestRecord, request: dict) -> None:
    raw = await client.completions.with_raw_response.create(**request)
    completion = raw.parse()
    record.version = raw.headers.get(VERSION_HEADER)
    record.fingerprint = completion.system_fingerprint
    record.text = completion.choices[0].text
    record.completion_tokens = completion.usage.completion_tokens


async def _streamed(client: openai.AsyncOpenAI, record: RequestRecord, request: dict,
                    clock: Callable[[], float]) -> None:
    """A stream counts as answered only once its usage chunk came (a cut stream fails)."""
    usage, parts = None, []
    async with client.completions.with_streaming_response.create(
            **request, stream=True, stream_options={"include_usage": True}) as response:
        record.version = response.headers.get(VERSION_HEADER)
        async for chunk in await response.parse():
            record.fingerprint = chunk.system_fingerprint
            if chunk.choices:
                if record.ttft_s is None:
                    record.ttft_s = clock() - record.started_s
                parts.append(chunk.choices[0].text)
            usage = chunk.usage or usage
    if usage is None:
        raise RuntimeError("the stream ended without its usage chunk")
    record.text = "".join(parts)
    record.completion_tokens = usage.completion_tokens


# ---------------------------------------------------------------------------------------------
# Chaos


async def _chaos(url: str, plan: list[Step], slot: AdapterSlot, clock: Callable[[], float],
                 events: list[ChaosEvent]) -> None:
    """Run each step at its time; a failed step is recorded and the plan goes on."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as admin:
        for step in sorted(plan, key=lambda s: s.at_s):
            await asyncio.sleep(max(0.0, step.at_s - clock()))
            event = ChaosEvent(step.describe(), clock())
            try:
                if isinstance(step, CanaryStep):
                    await _shift_canary(admin, step.percent)
                else:
                    event.unloaded = await _swap_adapter(admin, slot, step.name, step.folder)
                models = (await _checked(admin.get("/v1/models"))).json()["data"]
                event.models = tuple(card["id"] for card in models)
            except Exception as exc:
                event.error = f"{type(exc).__name__}: {exc}"
            event.finished_s = clock()
            events.append(event)


async def _shift_canary(admin: httpx.AsyncClient, percent: float) -> None:
    answer = (await _checked(admin.post("/admin/canary", json={"percent": percent}))).json()
    if answer["percent"] != percent:
        raise RuntimeError(f"asked for a {percent}% split, the server says {answer['percent']}%")


async def _swap_adapter(admin: httpx.AsyncClient, slot: AdapterSlot, name: str,
                        folder: Path) -> str | None:
    """Load `name`, move the clients to it, unload the old adapter once no request names it;
    returns the old adapter's name (None on the first load)."""
    await _checked(admin.post("/v1/load_lora_adapter",
                              json={"lora_name": name, "lora_path": str(folder)}))
    old, slot.current = slot.current, name
    if old is not None:
        await slot.drained(old)
        await _checked(admin.post("/v1/unload_lora_adapter", json={"lora_name": old}))
    return old


async def _checked(pending: Awaitable[httpx.Response]) -> httpx.Response:
    response = await pending
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text}")
    return response


# ---------------------------------------------------------------------------------------------
# Summary


def summarize(records: list[RequestRecord], events: list[ChaosEvent], seconds: float
              ) -> Summary:
    ok = [r for r in records if r.ok]
    failures = [f"{r.model} for {r.user} at {r.started_s:.2f} s: {r.error}"
                for r in records if not r.ok]
    failures += [f"chaos step {e.action} at {e.started_s:.2f} s: {e.error}"
                 for e in events if e.error is not None]
    return Summary(
        requests=len(records), failed=len(records) - len(ok), failures=failures,
        seconds=seconds, requests_per_s=len(ok) / seconds,
        tokens_per_s=sum(r.completion_tokens for r in ok) / seconds,
        latency_s=_percentiles([r.latency_s for r in ok], (50, 95, 99)),
        ttft_s=_percentiles([r.ttft_s for r in ok if r.ttft_s is not None], (50, 95)),
        by_version=dict(Counter(r.fingerprint for r in ok)),
        by_model=dict(Counter(r.model for r in ok)))


def _percentiles(values: list[float], percents: Sequence[int]) -> dict[str, float]:
    """{"p50": …}; NaN when there is nothing to take them of."""
    if not values:
        return {f"p{p}": float("nan") for p in percents}
    return {f"p{p}": float(q) for p, q in zip(percents, np.percentile(values, percents))}
