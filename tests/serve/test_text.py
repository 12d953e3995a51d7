"""Incremental detokenization (characters split across tokens, stop strings held back) and the
sampling filters."""

import torch

from helox.serve.sampling import SamplingParams, sample_token
from helox.serve.text import TextStream

SPLIT = "héllo 日本語 ok ✓ done"
"""Every non-ASCII character here is several one-byte tokens of the ASCII-trained BPE."""


def stream(tokenizer, text, stop=()):
    """(deltas, the TextStream) after pushing `text`'s tokens one at a time."""
    texts = TextStream(tokenizer, tuple(stop))
    deltas = []
    for token_id in tokenizer.encode(text, add_special_tokens=False).ids:
        deltas.append(texts.push(token_id))
        if texts.stopped:
            return deltas, texts
    deltas.append(texts.finish())
    return deltas, texts


def test_characters_split_across_tokens_are_emitted_whole(tokenizer):
    ids = tokenizer.encode(SPLIT, add_special_tokens=False).ids
    assert len(ids) > len(SPLIT.split())  # the check below is about split characters
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(len(ids)))
    deltas, texts = stream(tokenizer, SPLIT)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == SPLIT == texts.text


def test_an_unfinished_character_is_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("ok 日", add_special_tokens=False).ids
    texts = TextStream(tokenizer)
    deltas = [texts.push(token_id) for token_id in ids[:-1]]
    assert "".join(deltas) == "ok "
    assert texts.finish() == "\ufffd"  # the completion ended mid-character


def test_a_possible_stop_string_is_held_back_until_decided(tokenizer):
    deltas, texts = stream(tokenizer, "the dog sat on the log", stop=("dog x", "log"))
    # "dog" could start "dog x": held back, then released when " s" shows it is not.
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert not emitted.endswith(("d", "do", "dog", "dog ", "l", "lo"))
    assert texts.stopped and texts.text == "the dog sat on the "


def test_a_stop_string_inside_a_split_character_stream(tokenizer):
    deltas, texts = stream(tokenizer, SPLIT, stop=("本語",))
    assert texts.stopped and "".join(deltas) == "héllo 日"


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.0, -0.5]).log_softmax(-1)
    probs = logits_V.exp()
    assert probs[0] < 0.6 < probs[0] + probs[1]  # top_p 0.6 keeps exactly tokens 0 and 1
    generator = torch.Generator().manual_seed(0)

    def draws(**kwargs):
        params = SamplingParams(temperature=1.0, **kwargs)
        return {sample_token(logits_V, params, generator) for _ in range(300)}

    assert draws(top_p=0.6) == {0, 1}
    assert draws(top_k=3) == {0, 1, 2}
    assert draws(top_k=3, top_p=0.01) == {0}
    assert draws() == {0, 1, 2, 3, 4}
    assert sample_token(logits_V, SamplingParams(temperature=0), None) == 0
