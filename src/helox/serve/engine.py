"""The inference engine behind `helox serve`: many concurrent requests on one model, batched.

**Scheduler.** One background thread owns the model and runs, per iteration, under
`torch.inference_mode()`: (1) the adapter loads and unloads queued since the last iteration,
so no forward ever sees a half-loaded adapter; (2) it drops cancelled requests; (3) it admits
waiting requests, first come first served, while the batch has free rows (`max_batch_size`),
and prefills each prompt into its own cache row (prompts of equal length, sorted together, in
one forward) and samples its first token; (4) it runs ONE forward of one token for every
active sequence together, (B, 1), each row at its own position with its own key mask
(`Llama.decode`), and samples each row's next token; (5) it frees the rows of finished
sequences at once, so that waiting requests join at the next iteration (continuous batching,
as Orca and vLLM schedule, at token granularity without preemption: a request is admitted
only when its prompt and max_tokens fit the context, so a row never runs out of room).

**Cache.** One preallocated `BatchKVCache` (L, B_max, K, T_max, E), T_max = the model's
max_seq_len, with a length per row. The active sequences are rows 0..n-1: when a row in the
middle finishes, the last row's keys and values are copied into it (one row, once), so each
decode attends over a view of the first n rows up to the longest, with no gather, and the
mask hides what is past each row's length.

**Adapters.** A loaded adapter (PEFT folder, as `helox export RUN --format peft` writes) is
added to the model's `LoraLinear` layers under its name and never made `active`: each
forward instead tells every LoraLinear which batch rows use which adapter
(`per_row_adapters`), and the layer adds scaling · B A x to those rows only (the rows of one
adapter in one matmul: the punica / S-LoRA grouping, written simply), so one batch mixes the
base and several adapters. Loading checks the fingerprint the adapter records against the
served model's and runs between iterations; the caller waits for it. Unloading refuses new
requests naming the adapter at once ("unknown model") and lets the requests already accepted
for it, running or queued, finish with it; its weights go at the first iteration with none
left, and the caller waits for that.

**Naive mode** (`naive=True`, the benchmark's baseline): the same API, one request at a time,
the whole context recomputed for every token, no cache; the same greedy outputs.

Why hand-written: vLLM and SGLang are GPU-first servers built around their own model code,
not dependencies of Helox, whose Llama, LoRA layers and checkpoints are its own; what is
needed here (a batched cache, per-row RoPE and masks, per-row adapters) is a few hundred
lines over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tokenizers import Tokenizer

from helox.checkpoint import load_trained_model
from helox.checkpoint.fingerprint import model_fingerprint
from helox.checkpoint.reader import resolve_checkpoint
from helox.chat.templates import ChatTemplate
from helox.errors import HeloxError
from helox.export.importing import load_transformers_llama
from helox.finetune.lora import (load_adapter, lora_layers, per_row_adapters,
                                 read_adapter_config, remove_adapter, set_active)
from helox.model.hf import from_hf_config, from_hf_state_dict
from helox.model.llama import BatchKVCache, Llama
from helox.serve.chat import ChatSetup, chat_setup, turn_end
from helox.serve.errors import (ContextLengthError, EngineClosedError, RequestError,
                                UnknownModelError)
from helox.serve.handle import Output, RequestHandle, StreamEnd, Usage
from helox.serve.sampling import SamplingParams, request_generator, sample_token
from helox.serve.text import TextStream

DEFAULT_MAX_BATCH_SIZE = 8


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine started, and its state now (what a server exports)."""

    requests_total: int
    """Requests accepted."""
    requests_finished: int
    """Requests that finished (stop or length); cancelled and failed ones are not counted."""
    requests_running: int
    """Requests in the batch now."""
    requests_waiting: int
    """Requests queued for a batch row."""
    prompt_tokens_total: int
    generated_tokens_total: int
    batch_size: int
    """Rows of the last decode forward."""
    iterations_total: int
    adapters: tuple[str, ...]
    """Loaded adapters (those being unloaded included)."""


class _Sequence:
    """An accepted request as the scheduler tracks it."""

    def __init__(self, handle: RequestHandle, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, stop_ids: frozenset[int], adapter: str | None,
                 generator: torch.Generator | None, tokenizer: Tokenizer):
        self.handle, self.prompt_ids, self.params = handle, prompt_ids, params
        self.max_tokens, self.stop_ids, self.adapter = max_tokens, stop_ids, adapter
        self.generator = generator
        self.text = TextStream(tokenizer, params.stop)
        self.completion_ids: list[int] = []
        self.num_generated = 0
        """Tokens sampled, a stop token included."""
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.handle.cancelled

    def accept(self, token_id: int) -> Output:
        """Take the sampled token: the output to deliver, final on a stop or at max_tokens."""
        self.num_generated += 1
        if token_id in self.stop_ids:
            return self._finish("stop", self.text.finish(), ())
        self.completion_ids.append(token_id)
        delta = self.text.push(token_id)
        if self.text.stopped:
            return self._finish("stop", delta, (token_id,))
        if self.num_generated >= self.max_tokens:
            return self._finish("length", delta + self.text.finish(), (token_id,))
        return Output(delta, (token_id,))

    def _finish(self, reason: str, delta: str, token_ids: tuple[int, ...]) -> Output:
        self.finish_reason = reason
        usage = Usage(len(self.prompt_ids), self.num_generated)
        return Output(delta, token_ids, reason, usage)


class Engine:
    """Serves completions of one model (and its loaded adapters) to concurrent callers; see
    the module docstring. Build it with `from_checkpoint` or `from_hf`; `close()` it (or use
    it as a context manager)."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, eos_id: int, *, name: str = "base",
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, naive: bool = False,
                 chat: ChatSetup | None = None, max_context_tokens: int | None = None):
        """`max_context_tokens` caps prompt + completion below the model's max_seq_len (the
        cache holds max_batch_size x that many tokens per layer)."""
        if max_batch_size < 1 or (max_context_tokens is not None and max_context_tokens < 2):
            raise HeloxError(f"max_batch_size must be at least 1 (got {max_batch_size}) and "
                             f"max_context_tokens at least 2 (got {max_context_tokens})",
                             hint="serve with max_batch_size >= 1, max_context_tokens >= 2")
        self.model, self.tokenizer, self.eos_id = model.eval(), tokenizer, eos_id
        self.name, self.naive, self.chat = name, naive, chat
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_seq_len = min(model.cfg.max_seq_len, max_context_tokens or model.cfg.max_seq_len)
        """The context a request's prompt and completion must fit."""
        self.max_batch_size = 1 if naive else max_batch_size
        self.cache = None if naive else BatchKVCache(model.cfg, max_batch_size, self.max_seq_len,
                                                     self.device, self.dtype)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Sequence] = deque()
        self._rows: list[_Sequence] = []
        """Row i of the cache (scheduler thread only)."""
        self._outbox: list[tuple[RequestHandle, Output | type[StreamEnd]]] = []
        """Outputs sampled, delivered once finished rows are freed (scheduler thread)."""
        self._commands: list[tuple[Callable[[], None], Future]] = []
        self._adapters: dict[str, Path] = {}
        self._loading: set[str] = set()
        self._draining: dict[str, Future] = {}
        self._base_fingerprint: str | None = None
        self._closed = False
        self._counters = dict.fromkeys(("requests_total", "requests_finished",
                                        "prompt_tokens_total", "generated_tokens_total",
                                        "batch_size", "iterations_total"), 0)
        self._thread = threading.Thread(target=self._run, name="helox-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------
    # Building

    @classmethod
    def from_checkpoint(cls, path: Path, *, device: str | torch.device = "cpu",
                        name: str | None = None, chat_template: str | None = None,
                        ema: bool = False, **engine_kwargs) -> Engine:
        """Serve a Helox run folder (its newest valid checkpoint) or checkpoint folder, as
        `load_trained_model` reads it (a LoRA run: its merged model), on `device`, in the
        dtype it was saved in. `chat_template` overrides the checkpoint's (see `chat_setup`).
        """
        checkpoint = resolve_checkpoint(Path(path), warn=lambda message: None)
        trained = load_trained_model(checkpoint, ema=ema)
        chat = chat_setup(trained, chat_template)
        default_name = (trained.run_dir or checkpoint).name
        return cls(trained.model.to(device), trained.tokenizer, trained.eos_id,
                   name=name or default_name, chat=chat, **engine_kwargs)

    @classmethod
    def from_hf(cls, folder: Path, *, device: str | torch.device = "cpu",
                name: str | None = None, **engine_kwargs) -> Engine:
        """Serve a transformers Llama folder (an `helox export --format hf` one, say), read
        as `helox import-hf` reads it; its tokenizer's chat template, if any, for chat."""
        hf_model, hf_tokenizer = load_transformers_llama(Path(folder))
        model = Llama(from_hf_config(hf_model.config))
        model.load_state_dict(from_hf_state_dict(hf_model.state_dict(), model.cfg))
        tokenizer = hf_tokenizer.backend_tokenizer
        eos_id = hf_tokenizer.eos_token_id
        if eos_id is None:
            raise HeloxError(f"{folder}: the tokenizer names no end-of-sequence token",
                             hint="set eos_token in its tokenizer_config.json")
        chat = None
        if isinstance(hf_tokenizer.chat_template, str):
            template = ChatTemplate("tokenizer", hf_tokenizer.chat_template,
                                    tuple(sorted(hf_tokenizer.special_tokens_map.items())))
            turn_ids, turn_strings = turn_end(template, tokenizer)
            chat = ChatSetup(template, frozenset({eos_id, *turn_ids}), turn_strings)
        return cls(model.to(device), tokenizer, eos_id, name=name or Path(folder).name,
                   chat=chat, **engine_kwargs)

    # ------------------------------------------------------------------------------------------
    # Requests (any thread)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               model: str | None = None, request_id: str | None = None) -> RequestHandle:
        """Queue a completion of `prompt` (text, encoded without special tokens added, or
        token ids) by the served model or the adapter `model` names. Refuses at once, with a
        `RequestError`, what cannot be served. Called from a running asyncio loop, the
        handle is read with `async for`; otherwise with a blocking `for`."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        max_tokens = self._max_tokens(len(prompt_ids), params)
        stop_ids = self._stop_ids(params)
        handle = RequestHandle(request_id or f"cmpl-{uuid.uuid4().hex}", len(prompt_ids),
                               _running_loop(), self._notify)
        generator = request_generator(params, self.device)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            adapter = self._adapter_for(model)
            self._waiting.append(_Sequence(handle, prompt_ids, params, max_tokens, stop_ids,
                                           adapter, generator, self.tokenizer))
            self._counters["requests_total"] += 1
            self._counters["prompt_tokens_total"] += len(prompt_ids)
            self._wake.notify()
        return handle

    def document_prompt(self, text: str) -> list[int]:
        """`text` as the start of a document (after the EOS), as Helox models are trained and
        as `helox generate` prompts them."""
        return [self.eos_id, *self.tokenizer.encode(text, add_special_tokens=False).ids]

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            prompt_ids = [int(token) for token in prompt]
        if not prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        vocab_size = self.model.cfg.vocab_size
        if any(not 0 <= token < vocab_size for token in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        return prompt_ids

    def _max_tokens(self, prompt_tokens: int, params: SamplingParams) -> int:
        """The request's max_tokens, refused when the prompt and it exceed the context."""
        wanted = params.max_tokens or 1
        if prompt_tokens + wanted > self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                f"you requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the "
                f"prompt, {wanted} for the completion). Please reduce the prompt or the "
                f"completion length.", param="max_tokens" if params.max_tokens else "prompt")
        return params.max_tokens or self.max_seq_len - prompt_tokens

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        stop_ids = params.stop_token_ids if params.stop_token_ids is not None else \
            frozenset({self.eos_id})
        if any(token >= self.model.cfg.vocab_size for token in stop_ids):
            raise RequestError(f"stop_token_ids must be below the vocabulary size "
                               f"{self.model.cfg.vocab_size}", param="stop_token_ids")
        return stop_ids

    def _adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the served model). Holds the lock."""
        if model is None or model == self.name:
            return None
        if model in self._adapters and model not in self._draining:
            return model
        raise UnknownModelError(f"The model {model!r} does not exist", param="model",
                                hint=f"use one of {self._servable()}")

    def model_names(self) -> list[str]:
        """What a request's `model` may name: the served model, then the loaded adapters
        (not those being unloaded)."""
        with self._lock:
            return self._servable()

    def _servable(self) -> list[str]:
        return [self.name, *(name for name in self._adapters if name not in self._draining)]

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(**self._counters, requests_running=len(self._rows),
                               requests_waiting=len(self._waiting),
                               adapters=tuple(self._adapters))

    # ------------------------------------------------------------------------------------------
    # Adapters (any thread; the work is done by the scheduler between iterations)

    def load_adapter(self, name: str, folder: Path) -> None:
        """Load a PEFT-format adapter folder under `name` (what a request's `model` then
        names); returns once requests can use it. Refuses one trained on another base,
        naming both fingerprints."""
        folder = Path(folder)
        if not isinstance(name, str) or not name.strip():
            raise HeloxError(f"an adapter needs a name, got {name!r}",
                             hint="name it as requests will (their `model` field)")
        read_adapter_config(folder)  # refuse what is not a plain LoRA adapter before waiting
        with self._lock:
            if name == self.name or name in self._adapters or name in self._loading:
                raise HeloxError(f"a model named {name!r} is already served",
                                 hint="unload it first, or give the adapter another name")
            self._loading.add(name)
        try:
            self._command(lambda: self._load(name, folder)).result()
        finally:
            with self._lock:
                self._loading.discard(name)

    def unload_adapter(self, name: str, timeout_s: float | None = None) -> None:
        """Stop accepting requests for adapter `name` at once; the requests already accepted
        for it finish with it; returns when its weights are gone (or raises TimeoutError
        after `timeout_s`, the unload still pending)."""
        with self._lock:
            if name not in self._adapters or name in self._draining:
                raise UnknownModelError(f"no adapter named {name!r} is loaded", param="model",
                                        hint=f"loaded: {self._servable()[1:] or 'none'}")
            future: Future = Future()
            self._draining[name] = future
            self._wake.notify()
        future.result(timeout_s)

    def _command(self, work: Callable[[], None]) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            self._commands.append((work, future))
            self._wake.notify()
        return future

    def _load(self, name: str, folder: Path) -> None:
        """Scheduler thread. The fingerprint is taken once, of the model as served, before
        any adapter wraps its layers."""
        if self._base_fingerprint is None:
            self._base_fingerprint = model_fingerprint(self.model)
        try:
            load_adapter(self.model, folder, name, self._base_fingerprint)
        except BaseException:
            if any(name in layer.lora_A for layer in lora_layers(self.model).values()):
                remove_adapter(self.model, name)
            raise
        set_active(self.model, [])  # rows choose their adapter; none is active for all
        with self._lock:
            self._adapters[name] = folder

    def _reap_adapters(self) -> None:
        """Remove the adapters being unloaded that no accepted request uses any more."""
        with self._lock:
            in_use = {s.adapter for s in itertools.chain(self._rows, self._waiting)}
            done = [name for name in self._draining if name not in in_use]
        for name in done:
            remove_adapter(self.model, name)
            with self._lock:
                del self._adapters[name]
                future = self._draining.pop(name)
            future.set_result(None)

    def _row_adapters(self, sequences: list[_Sequence]):
        if not self._adapters:
            return contextlib.nullcontext()
        return per_row_adapters(self.model, [s.adapter for s in sequences])

    # ------------------------------------------------------------------------------------------
    # The scheduler thread

    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._iteration()
                except Exception as exc:  # a failed forward fails its batch, not the engine
                    self._fail_rows(exc)
        self._shutdown()

    def _wait_for_work(self) -> bool:
        with self._lock:
            while not (self._closed or self._waiting or self._rows or self._commands
                       or self._draining):
                self._wake.wait()
            return not self._closed

    def _iteration(self) -> None:
        self._run_commands()
        self._drop_cancelled()
        if self.naive:
            self._naive_step()
        else:
            self._admit()
            self._decode()
        self._reap_adapters()
        self._counters["iterations_total"] += 1

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for work, future in commands:
            try:
                work()
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [s for s in self._waiting if s.handle.cancelled]
            for sequence in cancelled:
                self._waiting.remove(sequence)
        for sequence in cancelled:
            sequence.handle.deliver(StreamEnd)
        self._retire_done()

    def _take_waiting(self, count: int) -> list[_Sequence]:
        with self._lock:
            return [self._waiting.popleft() for _ in range(min(count, len(self._waiting)))]

    def _admit(self) -> None:
        """Move waiting requests into free rows, prefill them (equal lengths together) and
        sample their first tokens."""
        newcomers = self._take_waiting(self.max_batch_size - len(self._rows))
        newcomers.sort(key=lambda s: len(s.prompt_ids))
        start = len(self._rows)
        self._rows.extend(newcomers)  # in rows before any forward: a failure fails them too
        for _, group in itertools.groupby(newcomers, key=lambda s: len(s.prompt_ids)):
            group = list(group)
            self._prefill(start, group)
            start += len(group)
        self._retire_done()

    def _prefill(self, start: int, group: list[_Sequence]) -> None:
        tokens_GT = torch.tensor([s.prompt_ids for s in group], device=self.device)
        with self._row_adapters(group):
            logits_GTV = self.model(tokens_GT, cache=self.cache.rows(start, len(group)))
        for offset, sequence in enumerate(group):
            self.cache.set_length(start + offset, len(sequence.prompt_ids))
        self._accept(group, logits_GTV[:, -1].float())

    def _decode(self) -> None:
        """One token for every active row, in one forward."""
        if not self._rows:
            return
        tokens_B1 = torch.tensor([[s.completion_ids[-1]] for s in self._rows],
                                 device=self.device)
        with self._row_adapters(self._rows):
            logits_B1V = self.model.decode(tokens_B1, self.cache)
        self._counters["batch_size"] = len(self._rows)
        self._accept(self._rows, logits_B1V[:, 0].float())
        self._retire_done()

    def _naive_step(self) -> None:
        """One request at a time, its whole context recomputed for each token."""
        if not self._rows:
            self._rows.extend(self._take_waiting(1))
            if not self._rows:
                return
        sequence = self._rows[0]
        context = torch.tensor([sequence.prompt_ids + sequence.completion_ids],
                               device=self.device)
        with self._row_adapters([sequence]):
            logits_1TV = self.model(context)
        self._counters["batch_size"] = 1
        self._accept([sequence], logits_1TV[:, -1].float())
        self._retire_done()

    def _accept(self, sequences: list[_Sequence], logits_BV: torch.Tensor) -> None:
        """Sample each row's token (greedy rows by one argmax) and deliver its output."""
        greedy_B = logits_BV.argmax(dim=-1).tolist()
        for row, sequence in enumerate(sequences):
            token_id = greedy_B[row] if sequence.params.greedy else \
                sample_token(logits_BV[row], sequence.params, sequence.generator)
            output = sequence.accept(token_id)
            self._outbox.append((sequence.handle, output))
            self._counters["generated_tokens_total"] += 1
            self._counters["requests_finished"] += output.finished

    def _retire_done(self) -> None:
        """Free the rows of finished and cancelled sequences (the last row moves into a freed
        one, so the active rows stay 0..n-1), then deliver the outputs sampled: a caller
        that sees a last output finds its row already free."""
        for row in reversed(range(len(self._rows))):
            sequence = self._rows[row]
            if not sequence.done:
                continue
            if sequence.finish_reason is None:  # cancelled while running
                self._outbox.append((sequence.handle, StreamEnd))
            last = len(self._rows) - 1
            if row != last:
                if self.cache is not None:
                    self.cache.move_row(last, row)
                self._rows[row] = self._rows[last]
            with self._lock:
                self._rows.pop()
        outbox, self._outbox = self._outbox, []
        for handle, output in outbox:
            handle.deliver(output)

    def _fail_rows(self, exc: Exception) -> None:
        self._outbox.clear()
        for sequence in self._rows:
            sequence.handle.deliver(exc)
        with self._lock:
            self._rows.clear()

    def _shutdown(self) -> None:
        closed = EngineClosedError("the engine was closed before the request finished")
        with self._lock:
            sequences = [*self._rows, *self._waiting]
            self._rows.clear()
            self._waiting.clear()
            futures = [f for _, f in self._commands] + list(self._draining.values())
            self._commands.clear()
        for sequence in sequences:
            if sequence.finish_reason is None:
                sequence.handle.deliver(closed)
        for future in futures:
            if not future.done():
                future.set_exception(closed)

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    def _notify(self) -> None:
        with self._lock:
            self._wake.notify()

    def close(self) -> None:
        """Stop the scheduler thread; requests not finished get an EngineClosedError."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
