"""The model interface of the harness: batched requests equal unbatched ones and a direct
forward, for a Helox model and for its transformers twin."""

import numpy as np
import pytest
import torch

from helox.model.config import ModelConfig
from helox.eval.lm import LanguageModel, hf_forward, helox_forward
from helox.model.generate import generate
from helox.model.llama import Llama

VOCAB = 61


class CharTokenizer:
    """Ids are characters a..z offset by 1 (0 is EOS): readable and merge-free."""

    def encode(self, text, add_special_tokens=True):  # it has no special tokens
        return type("Encoding", (), {"ids": [ord(c) - 96 for c in text if c.isalpha()]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids if 0 < i < 27)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, max_seq_len=24, init_std=0.3)).eval()


def helox_lm(model, batch_size):
    return LanguageModel(helox_forward(model), CharTokenizer(), 0, model.cfg.max_seq_len, VOCAB,
                         "v", "s", torch.device("cpu"), batch_size)


REQUESTS = [([0, 5, 6, 7], [8, 9]), ([0, 1], [2, 3, 4]), ([0] * 5, [1]),
            ([0, 3, 3, 3, 3, 3, 3, 3], [4]), (list(range(30)), [7, 8])]  # the last is cut


def direct_loglikelihood(model, context, continuation):
    ids = (context + continuation)[-(model.cfg.max_seq_len + 1):]
    with torch.no_grad():
        logprobs_TV = model(torch.tensor([ids[:-1]])).log_softmax(-1)[0]
    n = len(continuation)
    picked = logprobs_TV[len(ids) - 1 - n:].gather(-1, torch.tensor(continuation)[:, None])
    greedy = logprobs_TV[len(ids) - 1 - n:].argmax(-1).tolist() == continuation
    return float(picked.sum()), greedy


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_loglikelihood_equals_a_direct_forward_at_any_batch_size(batch_size):
    model = tiny_model()
    results = helox_lm(model, batch_size).loglikelihood(REQUESTS)
    for (context, continuation), result in zip(REQUESTS, results):
        logprob, greedy = direct_loglikelihood(model, context, continuation)
        assert result.logprob == pytest.approx(logprob, abs=1e-5)
        assert result.greedy == greedy and result.num_tokens == len(continuation)


def test_greedy_batched_equals_the_unbatched_generator():
    model = tiny_model(1)
    prompts = [[0, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 20]]
    batched = helox_lm(model, 3).greedy(prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, batched):
        ids = generate(model, prompt, 6, temperature=0, top_k=None, stop_id=0)
        assert text == CharTokenizer().decode(ids)


def test_token_logprobs_cover_long_texts_in_windows():
    model = tiny_model(2)
    ids = list(np.random.default_rng(0).integers(1, 27, size=60))
    (logprobs,) = helox_lm(model, 4).token_logprobs([ids])
    assert logprobs.shape == (59,)
    with torch.no_grad():  # the first window is one plain forward of max_seq_len tokens
        first = model(torch.tensor([ids[:24]])).log_softmax(-1)[0]
    expected = first[:-1].gather(-1, torch.tensor(ids[1:24])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(logprobs[:23], expected, atol=1e-5)


def test_the_transformers_twin_gives_the_same_answers():
    transformers = pytest.importorskip("transformers")
    from helox.model.hf import to_hf_config, to_hf_state_dict

    model = tiny_model(3)
    twin = transformers.LlamaForCausalLM(to_hf_config(model.cfg)).eval()
    missing, unexpected = twin.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg),
                                               strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)  # only the tied head
    ours = helox_lm(model, 3)
    theirs = LanguageModel(hf_forward(twin), CharTokenizer(), 0, 24, VOCAB, "t", "s",
                           torch.device("cpu"), 3)
    for a, b in zip(ours.loglikelihood(REQUESTS), theirs.loglikelihood(REQUESTS)):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.greedy == b.greedy
    prompts = [[0, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert ours.greedy(prompts, 5) == theirs.greedy(prompts, 5)
