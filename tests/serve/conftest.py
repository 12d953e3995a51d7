"""A tiny random model and a small byte-level BPE for the engine's tests."""

import contextlib
import time

import pytest
import torch

from helox.data.tokenizer import train_bpe
from helox.model.config import ModelConfig
from helox.model.llama import Llama

TEXT = ("the quick brown fox jumps over the lazy dog while the cat sleeps in the sun and "
        "a bird sings on the old oak tree near the river bank where children play games")
EOS = "<|endoftext|>"


@pytest.fixture(scope="session")
def tokenizer():
    """Trained on ASCII only: any other character is several one-byte tokens."""
    return train_bpe([TEXT] * 20, 320, 2, EOS)


def tiny_llama(vocab_size: int, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64, init_std=0.1, tie_embeddings=False)
    return Llama(cfg).eval()


@pytest.fixture(scope="session")
def model(tokenizer):
    return tiny_llama(tokenizer.get_vocab_size())


@pytest.fixture(scope="session")
def other_model(tokenizer):
    """The same shape with other weights (another base)."""
    return tiny_llama(tokenizer.get_vocab_size(), seed=1)


@contextlib.contextmanager
def _slowed(engine, seconds_per_decode):
    """Each decode forward takes at least this long (so that the test reads faster than the
    engine generates, however busy the machine)."""
    decode = engine.model.decode

    def slow(*args):
        time.sleep(seconds_per_decode)
        return decode(*args)

    engine.model.decode = slow
    try:
        yield
    finally:
        del engine.model.decode


@pytest.fixture
def slowed():
    return _slowed
