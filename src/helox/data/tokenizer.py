"""Byte-level BPE tokenizers, trained and run by Hugging Face `tokenizers`."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from helox.errors import HeloxError


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int,
              eos_token: str) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE: every byte is in the alphabet, so nothing is unknown."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise HeloxError(f"{path}: not a loadable tokenizer.json ({exc})",
                         hint="point tokenizer.path at a Hugging Face tokenizer.json") from None


def eos_id(tokenizer: Tokenizer, eos_token: str, path: Path | str = "tokenizer") -> int:
    token_id = tokenizer.token_to_id(eos_token)
    if token_id is None:
        raise HeloxError(f"{path}: has no end-of-document token '{eos_token}'",
                         hint="set tokenizer.eos_token to a special token this tokenizer has")
    return token_id
