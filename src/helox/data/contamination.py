"""Train/eval contamination: word n-gram overlap of training documents with named eval sets.

The test follows GPT-3's decontamination (Brown et al. 2020, appendix C): lower-cased word
13-grams; a training document that shares at least `min_overlap_ngrams` of them with an eval
set is contaminated for that set. With `policy: drop` it is removed (reason
`contaminated_<set>`), with `report` it is kept and only counted. Eval sets are read with the same
readers as training sources, so any txt/JSONL/Parquet file (or folder) works.

Sets of n-grams are Python sets of word tuples: membership is a C-level hash lookup, faster
here than hashing each n-gram to bytes first, and exact (no false matches from hash collisions).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Literal

from pydantic import Field, field_validator

from helox.configbase import StrictModel, resolve_input_path
from helox.data.document import Document
from helox.data.pipeline import StepStats
from helox.data.sources import SourceConfig, read_documents

WORD = re.compile(r"\w+")


class EvalSetConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    """Name of the eval set in the report (letters, digits, underscores)."""
    path: Path
    """File or folder of the eval set's documents (txt, JSONL or Parquet)."""
    text_field: str = "text"
    """JSONL key or Parquet column holding the eval item's text."""

    _check_path = field_validator("path")(resolve_input_path)


class ContaminationConfig(StrictModel):
    step: Literal["contamination"] = "contamination"
    scope: ClassVar[str] = "document"
    train_only: ClassVar[bool] = True  # it checks training data; an eval split may be an eval set
    eval_sets: list[EvalSetConfig] = Field(min_length=1)
    """The eval sets no training document may overlap with."""
    ngram_words: int = Field(default=13, ge=3)
    """Length of the word n-grams compared (13 as in GPT-3)."""
    min_overlap_ngrams: int = Field(default=1, ge=1)
    """A document sharing this many distinct n-grams with an eval set is contaminated."""
    policy: Literal["drop", "report"] = "drop"
    """Remove contaminated documents, or keep them and only count them."""

    def build(self) -> Contamination:
        return Contamination(self)


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = WORD.findall(text.lower())
    return set(zip(*(words[i:] for i in range(n))))


class Contamination:
    name = "contamination"
    scope = "document"

    def __init__(self, config: ContaminationConfig):
        self.config = config
        self.eval_ngrams = {s.name: self._eval_ngrams(s) for s in config.eval_sets}

    def _eval_ngrams(self, eval_set: EvalSetConfig) -> set[tuple[str, ...]]:
        ngrams: set[tuple[str, ...]] = set()
        source = SourceConfig(path=eval_set.path, text_field=eval_set.text_field)
        for doc in read_documents(source):
            ngrams |= word_ngrams(doc.text, self.config.ngram_words)
        return ngrams

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        n, needed = self.config.ngram_words, self.config.min_overlap_ngrams
        for doc in docs:
            ngrams = word_ngrams(doc.text, n)
            hits = {name: len(ngrams & evals) for name, evals in self.eval_ngrams.items()}
            hits = {name: count for name, count in hits.items() if count >= needed}
            if hits and self.config.policy == "report":
                for name in hits:
                    stats.change(f"contaminated_{name}")
            if hits and self.config.policy == "drop":
                first = next(iter(hits))
                detail = ", ".join(f"{name}: {count} shared {n}-grams"
                                   for name, count in hits.items())
                stats.drop(doc, f"contaminated_{first}", detail)
                continue
            yield doc
