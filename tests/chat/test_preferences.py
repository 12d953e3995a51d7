"""Preference pairs in TRL's two shapes become two renderings that share the prompt and differ
in the response, the only trained tokens; bad lines are named."""

import json

import pytest

from helox.chat.preferences import encode_preferences, read_preferences
from helox.chat.templates import ChatTemplate
from helox.errors import HeloxError

PAIRS = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "Colour of the sky?"}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": {"role": "assistant", "content": "Green."}},
]


def test_each_pair_shares_its_prompt_and_trains_only_its_response(smollm2, tmp_path):
    hf, tokenizer = smollm2
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    template = ChatTemplate.builtin("chatml", hf.special_tokens_map)
    encoded = dict(encode_preferences(path, template, tokenizer))
    assert list(encoded) == [1, 2]
    for pair, (chosen, rejected) in zip(PAIRS, [(e.chosen, e.rejected) for e in encoded.values()]):
        for side, enc in (("chosen", chosen), ("rejected", rejected)):
            (span,) = enc.trained_spans()
            text = pair[side] if isinstance(pair[side], str) else \
                (pair[side][0] if isinstance(pair[side], list) else pair[side])["content"]
            assert tokenizer.decode(enc.ids[slice(*span)], skip_special_tokens=False) == \
                text + "<|im_end|>"
        prompt = chosen.trained_spans()[0][0]
        assert chosen.ids[:prompt] == rejected.ids[:prompt]  # the same prompt tokens


def test_bad_pairs_are_named(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n"
                    + json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    with pytest.raises(HeloxError, match=r"prefs.jsonl:2: not a preference pair: rejected"):
        list(read_preferences(path))
    path.write_text(json.dumps({**PAIRS[0], "messages": PAIRS[1]["messages"]}) + "\n")
    with pytest.raises(HeloxError, match="prefs.jsonl:1: .*not both"):
        list(read_preferences(path))
    path.write_text(json.dumps({**PAIRS[0], "chosen": {"role": "user", "content": "x"}}) + "\n")
    with pytest.raises(HeloxError, match="chosen response must be an assistant message"):
        list(read_preferences(path))
