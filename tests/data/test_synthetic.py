"""Synthetic long-range tasks: determinism, segment tiling, the window guarantee, the signal
measure (against a hand computation) and the needle-in-a-haystack probes."""

import math
import re
from collections import Counter

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers

from helox.data.synthetic import (Segment, SyntheticDocument, SyntheticTaskConfig, make_probe,
                                  measure_signal)
from helox.data.tokenizer import train_bpe

TASKS = ["passkey", "kv_recall", "variable_tracking"]
NUM_DOCUMENTS = 120  # enough for a stable BPE and unigram estimate, small enough to be fast


def segment_text(document, segment):
    return document.text[segment.start_char:segment.end_char]


@pytest.fixture(scope="module", params=TASKS)
def generated(request):
    """Documents of one task with default knobs, and a byte-level BPE trained on them."""
    config = SyntheticTaskConfig(task=request.param, train_documents=NUM_DOCUMENTS)
    documents = config.documents("train")
    tokenizer = train_bpe([d.text for d in documents], vocab_size=1024, min_frequency=2,
                          eos_token="<|endoftext|>")
    return config, documents, tokenizer


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_documents_other_seed_other_documents(task):
    config = SyntheticTaskConfig(task=task, train_documents=5, val_documents=5, seed=7)
    again = SyntheticTaskConfig(task=task, train_documents=5, val_documents=5, seed=7)
    other = SyntheticTaskConfig(task=task, train_documents=5, val_documents=5, seed=8)
    assert config.documents("train") == again.documents("train")
    texts = [d.text for d in config.documents("train")]
    assert not set(texts) & {d.text for d in other.documents("train")}
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("task", TASKS)
def test_train_and_val_are_disjoint(task):
    config = SyntheticTaskConfig(task=task, train_documents=20, val_documents=20)
    train = {d.text for d in config.documents("train")}
    val = {d.text for d in config.documents("val")}
    assert len(train) == 20 and len(val) == 20
    assert not train & val
    # and no value (the digits a model is trained to recall) is shared between the splits
    train_values = {v for t in train for v in re.findall(r"\d+", t)}
    assert not train_values & {v for t in val for v in re.findall(r"\d+", t)}


def test_tasks_draw_from_different_streams():
    noise = [SyntheticTaskConfig(task=task, train_documents=1).documents("train")[0].text[:40]
             for task in TASKS]
    assert noise[0] != noise[1] != noise[2] != noise[0]


# --------------------------------------------------------------------------- segments


def test_segments_tile_and_answers_repeat_their_facts(generated):
    config, documents, _ = generated
    kinds = Counter()
    for document in documents:
        position = 0
        for i, segment in enumerate(document.segments):
            assert segment.start_char == position < segment.end_char
            position = segment.end_char
            kinds[segment.kind] += 1
            if segment.kind == "answer":
                source = document.segments[segment.source]
                assert segment.source < i and source.kind == "fact"
                assert segment_text(document, segment) == segment_text(document, source)
            else:
                assert segment.source is None
        assert position == len(document.text)
        assert "".join(segment_text(document, s) for s in document.segments) == document.text
        noise = " ".join(segment_text(document, s) for s in document.segments
                         if s.kind == "noise").split()
        assert len(noise) >= config.context_words  # queried keys/values come on top
    assert set(kinds) == {"noise", "cue", "fact", "answer"}


def test_noise_is_pseudo_words_and_values_have_the_configured_digits(generated):
    config, documents, _ = generated
    document = documents[0]
    for segment in document.segments:
        text = segment_text(document, segment)
        if segment.kind == "noise" and config.task == "passkey":
            assert re.fullmatch(r"( ?[a-z]+)+", text)
        if segment.kind == "answer" and config.task != "variable_tracking":
            assert re.fullmatch(rf" \d{{{config.value_digits}}}", text)


@pytest.mark.parametrize("task", TASKS)
def test_every_fact_is_a_window_of_noise_words_before_its_answer(task):
    config = SyntheticTaskConfig(task=task, train_documents=10, context_words=150,
                                 local_window_tokens=120)
    for document in config.documents("train"):
        segments = document.segments
        for i, segment in enumerate(segments):
            if segment.kind != "answer":
                continue
            between = segments[segment.source + 1:i]
            noise_words = sum(len(segment_text(document, s).split())
                              for s in between if s.kind == "noise")
            assert noise_words >= config.local_window_tokens


def test_invalid_documents_are_refused():
    with pytest.raises(ValueError, match="expected a non-empty span"):
        SyntheticDocument("ab cd", (Segment(0, 2, "noise"), Segment(3, 5, "noise")))
    with pytest.raises(ValueError, match="segments end at 2"):
        SyntheticDocument("ab cd", (Segment(0, 2, "noise"),))
    with pytest.raises(ValueError, match="not an earlier fact"):
        SyntheticDocument("ab cd", (Segment(0, 2, "noise"), Segment(2, 5, "answer", 0)))
    with pytest.raises(ValueError, match="unknown kind"):
        SyntheticDocument("ab", (Segment(0, 2, "filler"),))


# --------------------------------------------------------------------------- signal


def test_most_signal_lies_beyond_the_window_and_none_beyond_a_huge_one(generated):
    config, documents, tokenizer = generated
    report = measure_signal(documents, tokenizer, local_window_tokens=64)
    assert report.fraction_beyond > 0.8, report.summary()
    assert report.num_documents == NUM_DOCUMENTS
    assert report.num_tokens > NUM_DOCUMENTS * config.context_words
    # a window longer than any document sees every fact: all signal is within
    huge = measure_signal(documents, tokenizer, local_window_tokens=10 * config.context_words)
    assert huge.fraction_beyond == 0.0 and huge.beyond_bits == 0.0
    assert huge.within_bits == pytest.approx(report.beyond_bits + report.within_bits)


def word_tokenizer(words):
    vocab = {word: i for i, word in enumerate(sorted(set(words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=min(vocab)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def hand_built_documents():
    # one token per word: noise "ba", cue "key", fact "12", noise "du fo", cue "ask", answer "12"
    first = SyntheticDocument("ba key 12 du fo ask 12", (
        Segment(0, 2, "noise"), Segment(2, 6, "cue"), Segment(6, 9, "fact"),
        Segment(9, 15, "noise"), Segment(15, 19, "cue"), Segment(19, 22, "answer", 2)))
    # cue "key", fact "7", answer "7" right after it, noise "ba"
    second = SyntheticDocument("key 7 7 ba", (
        Segment(0, 3, "cue"), Segment(3, 5, "fact"), Segment(5, 7, "answer", 1),
        Segment(7, 10, "noise")))
    return [first, second]


def test_measure_signal_matches_a_hand_computation():
    documents = hand_built_documents()
    words = [w for d in documents for w in d.text.split()]
    tokenizer = word_tokenizer(words)
    counts, total = Counter(words), len(words)  # 11 tokens: key x3, 12 x2, 7 x2, ba x2, ...

    def bits(word):
        return -math.log2(counts[word] / total)

    # first document: the answer "12" (token 6) is 4 tokens after its fact (token 2);
    # second: the answer "7" (token 2) is 1 token after its fact (token 1)
    cues = bits("key") + bits("ask") + bits("key")
    for window, beyond in [(3, bits("12")), (4, 0.0), (0, bits("12") + bits("7"))]:
        report = measure_signal(documents, tokenizer, local_window_tokens=window)
        answers = bits("12") + bits("7")
        assert report.beyond_bits == pytest.approx(beyond)
        assert report.within_bits == pytest.approx(cues + answers - beyond)
        assert report.fraction_beyond == pytest.approx(beyond / (cues + answers))
        assert (report.num_documents, report.num_tokens) == (2, 11)
        assert f"beyond {window} tokens" in report.summary()


def test_measure_signal_assigns_a_token_by_its_first_character():
    # "12ask" is one token that starts in the fact: it is fact (no signal), not cue
    document = SyntheticDocument("key 12ask 12", (
        Segment(0, 3, "cue"), Segment(3, 6, "fact"), Segment(6, 9, "cue"),
        Segment(9, 12, "answer", 1)))
    tokenizer = word_tokenizer(["key", "12ask", "12"])
    report = measure_signal([document], tokenizer, local_window_tokens=0)
    assert report.within_bits == pytest.approx(math.log2(3))  # "key" only
    assert report.beyond_bits == pytest.approx(math.log2(3))  # "12", one token after the fact


# --------------------------------------------------------------------------- probes


def probe_fact_position(task, probe):
    """Character offset in the prompt of the fact the probe asks for."""
    if task == "variable_tracking":
        first_name = probe.answer.split()[0]
        return probe.prompt.index(f" {first_name} =")
    return probe.prompt.index(probe.answer)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth_fraction", [0.0, 0.3, 0.7, 1.0])
def test_probe_places_the_fact_at_the_requested_depth(task, depth_fraction):
    probe = make_probe(task, seed=3, context_words=600, depth_fraction=depth_fraction)
    depth = probe_fact_position(task, probe) / len(probe.prompt)
    assert depth == pytest.approx(depth_fraction, abs=0.1)


@pytest.mark.parametrize("task", TASKS)
def test_probe_prompt_holds_the_answer_only_in_its_fact(task):
    probe = make_probe(task, seed=5, context_words=300, depth_fraction=0.5)
    assert probe == make_probe(task, seed=5, context_words=300, depth_fraction=0.5)
    assert probe != make_probe(task, seed=6, context_words=300, depth_fraction=0.5)
    if task == "variable_tracking":
        names = probe.answer.split()
        assert len(names) == SyntheticTaskConfig.model_fields["chain_length"].default
        for name in names:  # each variable is assigned once, before the query
            assert probe.prompt.count(f" {name} =") == 1
        value = probe.prompt.removesuffix("?").split()[-1]  # asked once, assigned once
        assert re.fullmatch(r"\d+", value) and probe.prompt.count(value) == 2
    else:
        value = probe.answer.strip()
        assert re.fullmatch(r"\d+", value) and probe.answer == " " + value
        assert probe.prompt.count(value) == 1
    cue = {"passkey": " key?", "kv_recall": " =", "variable_tracking": "?"}[task]
    assert probe.prompt.endswith(cue)


def test_probe_refuses_bad_arguments():
    with pytest.raises(ValueError, match="depth_fraction"):
        make_probe("passkey", seed=0, context_words=100, depth_fraction=1.5)
    with pytest.raises(ValueError, match="unknown task"):
        make_probe("haystack", seed=0, context_words=100, depth_fraction=0.5)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_domain():
    config = SyntheticTaskConfig(task="kv_recall")
    assert config.domain_name == "synthetic_kv_recall"
    assert SyntheticTaskConfig(task="passkey", domain="long.passkey").domain_name == "long.passkey"
    with pytest.raises(ValidationError, match="pattern"):
        SyntheticTaskConfig(task="passkey", domain="has space")
    with pytest.raises(ValueError, match="unknown split"):
        config.documents("test")


@pytest.mark.parametrize("fields, message", [
    ({"task": "passkey", "needles": 3}, "Extra inputs are not permitted"),
    ({"task": "haystack"}, "passkey"),
    ({"task": "passkey", "context_words": 64, "local_window_tokens": 64},
     r"context_words \(64\) must be more than local_window_tokens \(64\)"),
    ({"task": "kv_recall", "num_pairs": 4, "num_queries": 5}, r"num_queries \(5\) is more"),
    ({"task": "kv_recall", "num_pairs": 20, "value_digits": 1}, "value_digits"),
    ({"task": "passkey", "num_pairs": 8}, "num_pairs applies to task kv_recall, not passkey"),
    ({"task": "variable_tracking", "local_window_tokens": 0}, "greater than 0"),
])
def test_config_refuses_unknown_keys_and_impossible_parameters(fields, message):
    with pytest.raises(ValidationError, match=message):
        SyntheticTaskConfig(**fields)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValidationError) as error:
        SyntheticTaskConfig(task="kv_recall", num_pairs=30, num_queries=40, value_digits=1,
                            num_chains=2)
    text = str(error.value)
    assert "num_chains applies" in text and "num_queries (40)" in text and "value_digits" in text
