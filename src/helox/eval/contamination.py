"""Which eval items overlap the training data of the model's dataset version.

The test is the data pipeline's contamination step turned around (helox.data.contamination:
lower-cased word n-grams): there, training documents are checked against eval sets before
training; here, each eval item is checked against the training documents the model saw, so a
suite written after the dataset, or a dataset built without the step, is still caught. An item
shorter than n words is compared as one n-gram of its own length.

Training documents are decoded from the token shards (byte-level BPE decodes exactly) one at a
time, so memory holds the items' n-grams, not the corpus's.
"""

from __future__ import annotations

from collections.abc import Callable


from helox.data.contamination import WORD, word_ngrams
from helox.data.shards import DatasetVersion


def item_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The item's word n-grams; an item of fewer than n words is one n-gram of its length."""
    grams = word_ngrams(text, n)
    if grams:
        return grams
    words = tuple(WORD.findall(text.lower()))
    return {words} if words else set()


def contaminated_items(texts: dict[str, str], dataset: DatasetVersion, tokenizer,
                       ngram_words: int, min_overlap_ngrams: int,
                       advance: Callable[[int], None] = lambda n: None,
                       ) -> dict[str, list[str]]:
    """Item key -> its n-grams found in training documents (as text, sorted), for the items
    with at least `min_overlap_ngrams` of them."""
    wanted: dict[tuple[str, ...], set[str]] = {}
    for key, text in texts.items():
        for gram in item_ngrams(text, ngram_words):
            wanted.setdefault(gram, set()).add(key)
    lengths = sorted({len(g) for g in wanted})
    found: dict[str, set[tuple[str, ...]]] = {}
    for document in training_texts(dataset, tokenizer, advance):
        for n in lengths:
            for gram in word_ngrams(document, n) & wanted.keys():
                for key in wanted[gram]:
                    found.setdefault(key, set()).add(gram)
    return {key: sorted(" ".join(g) for g in grams) for key, grams in found.items()
            if len(grams) >= min_overlap_ngrams}


def training_texts(dataset: DatasetVersion, tokenizer, advance: Callable[[int], None]):
    """Every training document's text, shard by shard."""
    for shard in dataset.shard_paths("train"):
        num_tokens = 0
        for document in dataset.shard_documents(shard):
            num_tokens += len(document) + 1  # and its EOS
            yield tokenizer.decode(document.tolist())
        advance(num_tokens)
