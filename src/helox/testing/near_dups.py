"""Planted duplicates with known similarity, for the dedup tests and the data benchmark.

Everything is drawn from a `random.Random`, so a seed gives the same corpus. The ground truth
uses its own reference shingling (Python sets of word tuples, no hashing, no MinHash), kept
apart from `helox.data.dedup` so that a test measures the dedup against something independent.
It shares only the definition of a shingle: `ngram_words` consecutive words, words being the
`\\w+` runs of the casefolded text.
"""

from __future__ import annotations

import json
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from random import Random

from helox.data.document import Document
from helox.testing.tiny import CORPUS

WORD_RE = re.compile(r"\w+")
SPACE_SPLIT_RE = re.compile(r"(\s+)")
SENTENCE_END_RE = re.compile(r"(?<=[.;:!?])\s+")
BLANK_LINE_RE = re.compile(r"\n\s*\n")
MUTATION_TRIES = 6
PARAPHRASE_MAX_JACCARD = 0.5
"""A rewrite sharing more word 5-grams than this is a near duplicate, not a paraphrase."""
# Replacement and insertion words for mutations: common, so they read as a plausible edit.
FILLER_WORDS = ("also", "then", "indeed", "very", "only", "still", "again", "perhaps", "now",
                "here", "there", "quite", "even", "just", "often", "soon", "surely", "much")
# Meaning-preserving substitutions for the corpus's frequent words (archaic to modern, plain
# synonyms for the technical docstrings). A paraphrase changes enough words that few word
# 5-grams survive, while a sentence embedding still sees the same content.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "unto": ("to",), "thee": ("you",), "thou": ("you",), "thy": ("your",), "thine": ("yours",),
    "ye": ("you",), "hast": ("have",), "dost": ("do",), "wilt": ("will",), "hath": ("has",),
    "doth": ("does",), "saith": ("says",), "art": ("are",),
    "shall": ("will",), "shalt": ("will",), "spake": ("spoke",), "said": ("spoke", "answered"),
    "behold": ("look", "see"), "upon": ("on",), "came": ("arrived", "went"), "and": ("and so",),
    "people": ("folk", "nation"), "house": ("home", "household"), "king": ("monarch", "ruler"),
    "lord": ("master",), "man": ("person",), "men": ("people",), "but": ("yet",),
    "which": ("that",), "when": ("whenever",), "all": ("every one of",), "went": ("travelled",),
    "you": ("ye",), "sir": ("master",), "good": ("fine",), "now": ("presently",),
    "let": ("allow",), "here": ("hither",), "well": ("fine",), "o": ("oh",), "my": ("mine",),
    "return": ("give back",), "returns": ("gives back",), "object": ("instance",),
    "function": ("routine",), "string": ("text",), "value": ("item",), "if": ("in case",),
    "used": ("employed",), "given": ("supplied",), "default": ("fallback",),
    "method": ("member function",), "argument": ("parameter",),
    "list": ("sequence",), "data": ("information",), "use": ("utilise",), "can": ("may",),
    "module": ("library",), "message": ("note",), "type": ("kind",), "file": ("file object",),
    "number": ("count",), "other": ("different",), "instance": ("object",),
}


def shingle_set(text: str, ngram_words: int = 5) -> set[tuple[str, ...]]:
    """Reference shingles: word n-grams of the casefolded text; a shorter text is one shingle."""
    words = WORD_RE.findall(text.casefold())
    if len(words) <= ngram_words:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + ngram_words]) for i in range(len(words) - ngram_words + 1)}


def jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def text_jaccard(a: str, b: str, ngram_words: int = 5) -> float:
    return jaccard(shingle_set(a, ngram_words), shingle_set(b, ngram_words))


def mutate_words(text: str, rng: Random, num_changes: int) -> str:
    """A near duplicate: `num_changes` words replaced, inserted or deleted at random places.

    The layout (line breaks) is kept; a word is a whitespace-separated token here.
    """
    parts = SPACE_SPLIT_RE.split(text)  # tokens at even positions, separators at odd ones
    positions = [i for i in range(0, len(parts), 2) if parts[i]]
    for _ in range(num_changes):
        if not positions:
            break
        i = rng.choice(positions)
        action = rng.choice(("replace", "insert", "delete"))
        if action == "replace":
            parts[i] = rng.choice(FILLER_WORDS)
        elif action == "insert":
            parts[i] = f"{parts[i]} {rng.choice(FILLER_WORDS)}"
        else:
            parts[i] = ""
            positions.remove(i)
    return "".join(parts)


def mutate_to_jaccard(text: str, rng: Random, low: float, high: float,
                      ngram_words: int = 5) -> tuple[str, float] | None:
    """A mutation of `text` whose true Jaccard with it lies in [low, high), or None.

    Greedy towards a target drawn uniformly from [low, high): each step tries a few single
    changes (a change near either end touches fewer shingles than one in the middle) and
    applies the one that lowers the Jaccard most without passing the target; the last step
    takes the closest one in [low, target). None when no change stays at or above `low`.
    """
    original = shingle_set(text, ngram_words)
    target = rng.uniform(low, high)
    current, similarity = text, 1.0
    for _ in range(len(original) + 1):
        tries = [mutate_words(current, rng, 1) for _ in range(MUTATION_TRIES)]
        scored = [(jaccard(original, shingle_set(t, ngram_words)), t) for t in tries]
        above = [s for s in scored if target <= s[0] < similarity]
        if above:
            similarity, current = min(above, key=lambda s: s[0])
            continue
        below = [s for s in scored if low <= s[0] < target]
        if below:
            similarity, current = max(below, key=lambda s: s[0])
        break
    return (current, similarity) if low <= similarity < high else None


def paraphrase(text: str, rng: Random) -> str:
    """Same meaning, few shared word 5-grams: synonyms from `SYNONYMS` and the sentences of
    each paragraph in a new order. MinHash misses it; a sentence embedding should not."""
    paragraphs = []
    for paragraph in BLANK_LINE_RE.split(text):
        sentences = SENTENCE_END_RE.split(" ".join(paragraph.split()))
        rng.shuffle(sentences)
        paragraphs.append(" ".join(sentences))

    def substitute(match: re.Match) -> str:
        word = match.group(0)
        choices = SYNONYMS.get(word.casefold())
        if choices is None:
            return word
        new = rng.choice(choices)
        return new.capitalize() if word[:1].isupper() else new

    return WORD_RE.sub(substitute, "\n\n".join(paragraphs))


def load_documents(path: Path = CORPUS / "train.jsonl.xz",
                   max_documents: int | None = None) -> list[Document]:
    """Documents of an xz JSON Lines file in the bundled corpus format."""
    docs = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            docs.append(Document(row["id"], row["text"], row["domain"], row["source"]))
            if max_documents is not None and len(docs) == max_documents:
                break
    return docs


def chunk_documents(docs: list[Document], min_words: int) -> list[Document]:
    """Split each document at line breaks into chunks of at least `min_words` words (a short
    tail joins the last chunk); chunk ids are `<id>#<k>`. Exact repeats are left out."""
    chunks, seen = [], set()
    for doc in docs:
        pieces: list[list[str]] = [[]]
        count = 0
        for line in doc.text.split("\n"):
            pieces[-1].append(line)
            count += len(line.split())
            if count >= min_words:
                pieces.append([])
                count = 0
        if len(pieces) > 1 and count < min_words:
            pieces[-2].extend(pieces.pop())
        for k, lines in enumerate(pieces):
            text = "\n".join(lines).strip()
            key = tuple(WORD_RE.findall(text.casefold()))
            if text and key not in seen:
                seen.add(key)
                chunks.append(Document(f"{doc.id}#{k}", text, doc.domain, doc.source))
    return chunks


@dataclass(frozen=True)
class PlantedPair:
    original_id: str
    duplicate_id: str
    jaccard: float
    """True Jaccard of the two word-shingle sets (reference shingling, `ngram_words`)."""
    kind: str
    """'near' (a word mutation) or 'paraphrase'."""


@dataclass(frozen=True)
class PlantedCorpus:
    docs: list[Document]
    """Base documents in their order, each planted duplicate somewhere after its original."""
    pairs: list[PlantedPair]


def planted_corpus(base: list[Document], rng: Random, num_near: int, num_far: int = 0,
                   num_paraphrases: int = 0, ngram_words: int = 5,
                   near_band: tuple[float, float] = (0.8, 1.0),
                   far_band: tuple[float, float] = (0.5, 0.75)) -> PlantedCorpus:
    """`base` plus planted duplicates of distinct base documents: `num_near` mutations with
    true Jaccard in `near_band`, `num_far` in `far_band` (similar, but not duplicates at 0.8)
    and `num_paraphrases` paraphrases. Raises ValueError if `base` cannot supply them."""
    wanted = ["near"] * num_near + ["far"] * num_far + ["paraphrase"] * num_paraphrases
    order = list(range(len(base)))
    rng.shuffle(order)
    planted: list[tuple[float, Document]] = []
    pairs: list[PlantedPair] = []
    for index in order:
        if len(pairs) == len(wanted):
            break
        kind = wanted[len(pairs)]
        original = base[index]
        made = _make_duplicate(original.text, kind, rng, ngram_words, near_band, far_band)
        if made is None:
            continue
        text, similarity = made
        duplicate = Document(f"{original.id}~{kind}", text, original.domain, original.source)
        planted.append((rng.uniform(index + 0.5, len(base)), duplicate))
        pairs.append(PlantedPair(original.id, duplicate.id, similarity,
                                 "paraphrase" if kind == "paraphrase" else "near"))
    if len(pairs) < len(wanted):
        raise ValueError(f"only {len(pairs)} of {len(wanted)} duplicates could be planted in "
                         f"{len(base)} base documents; use more or longer documents")
    keyed = [(float(i), doc) for i, doc in enumerate(base)] + planted
    keyed.sort(key=lambda item: item[0])
    return PlantedCorpus([doc for _, doc in keyed], pairs)


def _make_duplicate(text: str, kind: str, rng: Random, ngram_words: int,
                    near_band: tuple[float, float],
                    far_band: tuple[float, float]) -> tuple[str, float] | None:
    if kind == "paraphrase":
        new = paraphrase(text, rng)
        similarity = text_jaccard(text, new, ngram_words)
        return (new, similarity) if similarity < PARAPHRASE_MAX_JACCARD else None
    low, high = near_band if kind == "near" else far_band
    return mutate_to_jaccard(text, rng, low, high, ngram_words)
