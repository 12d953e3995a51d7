"""What a caller holds for a submitted request: its outputs, delivered from the engine's thread,
read with a blocking iterator or `async for`, and a way to cancel it."""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    """Tokens the model generated, a stop token included (it was computed, as vLLM counts)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Output:
    """One step of a request: the text and tokens it added (the text may be "" while a
    split character or a possible stop string is held back)."""

    text: str
    """The new text, to append to what came before."""
    token_ids: tuple[int, ...]
    """The new tokens (a stop token is not among them)."""
    finish_reason: str | None = None
    """On the last output: "stop" (a stop token or string) or "length" (max_tokens)."""
    usage: Usage | None = None
    """On the last output."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A whole request's result (`RequestHandle.result()`)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage


class StreamEnd:
    """Marks the end of a cancelled request's outputs."""


class RequestCancelled(Exception):
    """`result()` of a request that was cancelled before it finished."""


class RequestHandle:
    """A request's outputs, in order. Submitted from a running asyncio loop, the handle is
    bound to it: the engine's thread delivers with `loop.call_soon_threadsafe` into an
    asyncio.Queue and the caller reads with `async for`. Otherwise the engine puts into a
    thread-safe queue that a blocking `for` reads (`async for` then reads it from a worker
    thread). Leaving either loop early cancels the request."""

    def __init__(self, request_id: str, prompt_tokens: int,
                 loop: asyncio.AbstractEventLoop | None, wake: Callable[[], None]):
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self._loop, self._wake = loop, wake
        self._items: asyncio.Queue | queue.SimpleQueue = \
            asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._cancelled = threading.Event()

    # -- the engine's side

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def deliver(self, item: Output | BaseException | type[StreamEnd]) -> None:
        """Called from the engine's thread. A handle whose loop is gone is cancelled."""
        if self._loop is None:
            self._items.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody will read
            self._cancelled.set()

    # -- the caller's side

    def cancel(self) -> None:
        """Stop generating (the client went away): the engine frees the request's batch row
        at its next iteration and ends the outputs."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._wake()

    def __iter__(self) -> Iterator[Output]:
        if self._loop is not None:
            raise RuntimeError("this request was submitted from an asyncio loop: read it with "
                               "`async for`")
        finished = False
        try:
            while not finished:
                item = self._items.get()
                finished = _ends(item)
                if item is not StreamEnd:
                    yield item
        finally:
            if not finished:
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Output]:
        finished = False
        try:
            while not finished:
                item = await self._next_async()
                finished = _ends(item)
                if item is not StreamEnd:
                    yield item
        finally:
            if not finished:
                self.cancel()

    async def _next_async(self):
        if self._loop is None:
            return await asyncio.to_thread(self._items.get)
        return await self._items.get()

    def result(self) -> Completion:
        """Block until the request finishes; its whole text, tokens, finish_reason, usage."""
        return _collect(list(self))

    async def result_async(self) -> Completion:
        return _collect([output async for output in self])


def _ends(item) -> bool:
    """Whether `item` is the last thing delivered; an error is raised to the reader."""
    if isinstance(item, BaseException):
        raise item
    return item is StreamEnd or item.finished


def _collect(outputs: list[Output]) -> Completion:
    if not outputs or not outputs[-1].finished:
        raise RequestCancelled("the request was cancelled before it finished")
    return Completion("".join(o.text for o in outputs),
                      tuple(t for o in outputs for t in o.token_ids),
                      outputs[-1].finish_reason, outputs[-1].usage)
