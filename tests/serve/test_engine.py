"""The engine against `generate()` run on each prompt alone: concurrent greedy requests in one
batch, requests joining mid-flight and leaving early, naive mode, seeded sampling, stops,
refusals at submit, async iteration, cancellation and close."""

import asyncio

import pytest
import torch

from helox.model.generate import generate
from helox.serve.engine import Engine
from helox.serve.errors import (ContextLengthError, EngineClosedError, RequestError,
                                UnknownModelError)
from helox.serve.handle import RequestCancelled
from helox.serve.sampling import SamplingParams

PROMPTS = [[5, 6, 7], [100, 200, 40, 50, 60], [9], list(range(30, 41)), [7, 8], [28, 251, 79]]
EOS_ID = 0


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


def alone(model, prompt, max_tokens):
    """What generate() gives for the prompt by itself (stopping at the EOS, as the engine)."""
    return generate(model, prompt, max_tokens, 0, None, stop_id=EOS_ID)


@pytest.fixture
def engine(model, tokenizer):
    with Engine(model, tokenizer, EOS_ID, max_batch_size=8) as served:
        yield served


def test_concurrent_greedy_requests_equal_each_prompt_decoded_alone(engine, model, tokenizer):
    handles = [engine.submit(prompt, greedy(24)) for prompt in PROMPTS]
    results = [handle.result() for handle in handles]
    for prompt, result in zip(PROMPTS, results):
        expected = alone(model, prompt, 24)
        assert list(result.token_ids) == expected
        assert result.text == tokenizer.decode(expected)
        assert result.finish_reason == ("length" if len(expected) == 24 else "stop")
    stats = engine.stats()
    # Decoded together: about one iteration per token of the longest, not one per token.
    assert stats.generated_tokens_total == sum(r.usage.completion_tokens for r in results)
    assert stats.iterations_total < stats.generated_tokens_total / 3
    assert (stats.requests_running, stats.requests_waiting) == (0, 0)


def test_requests_joining_mid_flight_and_leaving_early_do_not_disturb_the_others(
        model, tokenizer):
    references = [alone(model, prompt, 40) for prompt in PROMPTS]
    stop_id = references[2][5]
    with Engine(model, tokenizer, EOS_ID, max_batch_size=3) as engine:  # some must queue
        long = engine.submit(PROMPTS[0], greedy(40))
        short = engine.submit(PROMPTS[1], greedy(3))
        stopped = engine.submit(PROMPTS[2], greedy(40, stop_token_ids={stop_id, EOS_ID}))
        stream = iter(long)
        first = [next(stream) for _ in range(6)]
        joiners = [engine.submit(prompt, greedy(40)) for prompt in PROMPTS[3:]]
        rest = list(stream)
        assert [t for o in first + rest for t in o.token_ids] == references[0]
        assert list(short.result().token_ids) == references[1][:3]
        assert list(stopped.result().token_ids) == references[2][:references[2].index(stop_id)]
        for handle, expected in zip(joiners, references[3:]):
            assert list(handle.result().token_ids) == expected


def test_naive_mode_gives_the_same_greedy_outputs(model, tokenizer):
    with Engine(model, tokenizer, EOS_ID, naive=True) as engine:
        handles = [engine.submit(prompt, greedy(16)) for prompt in PROMPTS]
        for prompt, handle in zip(PROMPTS, handles):
            assert list(handle.result().token_ids) == alone(model, prompt, 16)
        assert engine.stats().batch_size == 1 and engine.cache is None


def test_a_seeded_request_samples_the_same_tokens_whatever_else_is_in_the_batch(engine, model):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=123)
    by_itself = engine.submit(PROMPTS[0], params).result().token_ids
    others = [engine.submit(p, SamplingParams(max_tokens=20, temperature=1.2, top_p=0.8))
              for p in PROMPTS[1:4]]
    others.append(engine.submit(PROMPTS[4], greedy(20)))
    in_a_batch = engine.submit(PROMPTS[0], params)
    assert in_a_batch.result().token_ids == by_itself
    [other.result() for other in others]
    # The engine draws what generate() draws with a generator seeded alike.
    expected = generate(model, PROMPTS[0], 20, 0.9, 40, stop_id=EOS_ID,
                        generator=torch.Generator().manual_seed(123))
    assert list(by_itself) == expected
    reseeded = SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=124)
    assert engine.submit(PROMPTS[0], reseeded).result().token_ids != by_itself


def _stop_string(text: str) -> tuple[str, int]:
    """A 3-character piece of `text` (no U+FFFD) whose first occurrence is past its start."""
    for start in range(4, len(text) - 3):
        piece = text[start:start + 3]
        if "\ufffd" not in piece and text.find(piece) == start:
            return piece, start
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_end_the_text_before_them_and_are_never_streamed(engine, tokenizer):
    full = engine.submit(PROMPTS[3], greedy(40)).result()
    stop, cut = _stop_string(full.text)
    handle = engine.submit(PROMPTS[3], greedy(40, stop=["never appears", stop]))
    outputs = list(handle)
    streamed = "".join(o.text for o in outputs)
    assert streamed == full.text[:cut] and stop not in streamed
    assert outputs[-1].finish_reason == "stop"
    # The stream stopped at the token that completed the stop string, not later.
    ids = [t for o in outputs for t in o.token_ids]
    assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])
    assert outputs[-1].usage.completion_tokens == len(ids)


def test_stop_token_ids_end_the_completion_and_are_counted_not_returned(engine, model):
    reference = alone(model, PROMPTS[0], 30)
    stop_id = reference[7]
    position = reference.index(stop_id)
    result = engine.submit(PROMPTS[0], greedy(30, stop_token_ids=[stop_id])).result()
    assert list(result.token_ids) == reference[:position]
    assert result.finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, position + 1)


def test_max_tokens_ends_with_length_and_usage(engine):
    result = engine.submit(PROMPTS[1], greedy(5)).result()
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens,
            result.usage.total_tokens) == (5, 5, 10)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("stop", [""]), ("seed", 1.5),
    ("stop_token_ids", [-1])])
def test_bad_sampling_parameters_are_refused_naming_the_parameter(field, value):
    with pytest.raises(RequestError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field and caught.value.http_status == 400


def test_requests_that_cannot_be_served_are_refused_at_submit(engine):
    with pytest.raises(ContextLengthError, match="maximum context length is 64 tokens") as caught:
        engine.submit(list(range(1, 61)), greedy(5))
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "max_tokens"
    with pytest.raises(ContextLengthError):
        engine.submit(list(range(1, 65)))  # no room for one token
    assert len(engine.submit(list(range(1, 61)), greedy(None)).result().token_ids) <= 4
    with pytest.raises(UnknownModelError) as caught:
        engine.submit([1, 2], model="nope")
    assert caught.value.http_status == 404 and caught.value.param == "model"
    for prompt in ([], "", [1, 10_000]):
        with pytest.raises(RequestError, match="prompt") as caught:
            engine.submit(prompt)
    with pytest.raises(RequestError, match="vocabulary") as caught:
        engine.submit([1], greedy(2, stop_token_ids=[10_000]))
    assert engine.stats().requests_total == 1


def test_outputs_are_read_with_async_for_from_an_event_loop(engine, model):
    async def collect(handle):
        return [t async for output in handle for t in output.token_ids]

    async def main():
        handles = [engine.submit(prompt, greedy(12)) for prompt in PROMPTS[:3]]
        with pytest.raises(RuntimeError, match="async for"):
            next(iter(handles[0]))
        return await asyncio.gather(*(collect(h) for h in handles[:2]),
                                    handles[2].result_async())

    first, second, third = asyncio.run(main())
    assert [first, second, list(third.token_ids)] == [alone(model, p, 12) for p in PROMPTS[:3]]
    unbound = engine.submit(PROMPTS[3], greedy(12))  # submitted outside a loop
    assert asyncio.run(collect(unbound)) == alone(model, PROMPTS[3], 12)


def test_a_cancelled_request_frees_its_row_and_the_others_go_on(model, tokenizer, slowed):
    with Engine(model, tokenizer, EOS_ID, max_batch_size=2) as engine, slowed(engine, 0.01):
        leaving = engine.submit(PROMPTS[0], greedy(50))
        staying = engine.submit(PROMPTS[1], greedy(40))
        queued = engine.submit(PROMPTS[2], greedy(40))  # waits for a free row
        dropped = engine.submit(PROMPTS[3], greedy(40))
        dropped.cancel()
        for count, _ in enumerate(leaving, 1):
            if count == 2:
                break  # the client went away: leaving the loop cancels the request
        assert leaving.cancelled
        assert list(queued.result().token_ids) == alone(model, PROMPTS[2], 40)
        assert list(staying.result().token_ids) == alone(model, PROMPTS[1], 40)
        with pytest.raises(RequestCancelled):
            dropped.result()
        stats = engine.stats()
        assert (stats.requests_finished, stats.requests_running, stats.requests_waiting) == \
            (2, 0, 0)
        assert stats.generated_tokens_total < 50 + 40 + 40


def test_close_ends_the_requests_in_flight_and_refuses_new_ones(model, tokenizer):
    engine = Engine(model, tokenizer, EOS_ID, max_batch_size=1)
    handles = [engine.submit(prompt, greedy(50)) for prompt in PROMPTS]
    engine.close()
    failed = 0
    for handle in handles:
        try:
            handle.result()
        except EngineClosedError:
            failed += 1
    assert failed >= 1 and not engine._thread.is_alive()
    with pytest.raises(EngineClosedError):
        engine.submit(PROMPTS[0])
    engine.close()  # twice is fine


def test_a_failed_forward_fails_its_batch_and_the_engine_serves_on(model, tokenizer):
    with Engine(model, tokenizer, EOS_ID, max_context_tokens=32) as engine:
        decode, calls = engine.model.decode, []

        def failing_once(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("device lost")
            return decode(*args)

        engine.model.decode = failing_once
        try:
            with pytest.raises(RuntimeError, match="device lost"):
                engine.submit(PROMPTS[0], greedy(8)).result()
            handles = [engine.submit(prompt, greedy(8)) for prompt in PROMPTS[:3]]
            assert [list(h.result().token_ids) for h in handles] == \
                [alone(model, prompt, 8) for prompt in PROMPTS[:3]]
        finally:
            del engine.model.decode
        with pytest.raises(ContextLengthError, match="maximum context length is 32"):
            engine.submit(PROMPTS[0], greedy(30))
