"""Synthetic long-range tasks: documents whose predictable signal lies beyond a local window.

A model trained only on natural text rarely has to look far back: most of what is predictable
about the next token is in the last few dozen tokens. These generators write documents where it
is not: random values are planted in a haystack of noise and asked for much later, so the tokens
that a model *can* predict are predictable only from far away.

Tasks (`noise` stands for random pseudo-words, at least `local_window_tokens` words of it lie
between the last fact and the first query):

- `passkey`: `num_passkeys` needles " key 48213907" at random depths; at the end one query
  " key?" followed by every passkey in the order they appeared.
      ba tuko key 48213907 nime ... key 90215533 ... rafo key? 48213907 90215533
- `kv_recall`: `num_pairs` pairs " bamelo = 48213907" at random depths; at the end `num_queries`
  of the keys, in random order, each written like its pair and followed by its value.
      ... bamelo = 48213907 ... tukare = 11023399 ... rafo tukare = 11023399 bamelo = 48213907
- `variable_tracking` (RULER-style, the "which variables hold this value" form): `num_chains`
  chains of `chain_length` assignments " QZKRTA = 48213", " MXPLAB = QZKRTA", ... interleaved at
  random depths; at the end, for every chain in random order, its value, "?" and the names of
  the chain's variables in the order they were assigned.
      ... QZKRTA = 48213 ... MXPLAB = QZKRTA ... NBVCXC = MXPLAB ... 48213? QZKRTA MXPLAB NBVCXC

Noise words are built from syllables drawn from the document's generator, so no context helps
to predict them; values are random digit strings, variable names random capitals; keys are
pseudo-words. Cue text (" key", "?", " =") is one frequent token each, so that most of the
predictable signal is in the answers: with the defaults (values of 10 digits, 6 passkeys, 24
pairs all asked, 3 chains of 5 six-letter names, 400 noise words) about 85% of it lies beyond a
64-token window under a 1024-token byte-level BPE; the cue tokens are the rest.

Every document is a pure function of (seed, task, split, index): numpy's `default_rng` seeded
with those numbers (the task and split through crc32, stable across runs), so the same seed
gives the same text byte for byte.

Segments. Each document carries segments that tile its text: `noise` (fresh randomness),
`cue` (template text; counted as predictable from local context, even the needle markers whose
position is random — that only lowers the fraction measured beyond), `fact` (a random value
written for the first time) and `answer` (a repeat of an earlier fact, `source` its index;
its text equals the fact's text, leading space included). Which key or chain a query asks about
is a random choice and is written as `noise`: the bits of it that earlier context could predict
are left out of the measure, which again can only lower the fraction beyond.

Signal measurement (`measure_signal`). The predictable signal of a token is the number of bits
a predictor that sees the context saves over a context-free one. For tokens determined by their
context (`cue` and `answer` tokens) it is the token's surprisal under the unigram distribution
of all tokens of the measured documents, -log2 p(token); `noise` and `fact` tokens carry none.
A token belongs to the segment that holds its first character. An `answer` token's signal lies
*beyond* the local window when the last token of its source fact ends more than
`local_window_tokens` tokens before it (a predictor that sees the previous `local_window_tokens`
tokens cannot see the fact); otherwise, and for every `cue` token, it lies *within*.
`fraction_beyond` = beyond / (beyond + within).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator
from tokenizers import Tokenizer

from helox.configbase import StrictModel

Task = Literal["passkey", "kv_recall", "variable_tracking"]
Kind = Literal["noise", "cue", "fact", "answer"]
Split = Literal["train", "val"]

KINDS: tuple[Kind, ...] = ("noise", "cue", "fact", "answer")
SPLIT_CODES = {"train": 0, "val": 1, "probe": 2}
"""Mixed into every document's seed, so the splits (and probes) never share a random stream."""
ONSETS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = tuple(onset + vowel for onset in ONSETS for vowel in VOWELS)
"""70 consonant-vowel syllables; no cue word (" key") can be spelled with them."""
NOISE_SYLLABLES_PER_WORD = (1, 3)
KEY_SYLLABLES = 3
NAME_LETTERS = 6
CAPITALS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PASSKEY_CUE, PASSKEY_QUERY_CUE = " key", " key?"
ASSIGN_CUE, CHAIN_QUERY_CUE = " =", "?"
TASK_KNOBS: dict[str, tuple[str, ...]] = {
    "passkey": ("num_passkeys",),
    "kv_recall": ("num_pairs", "num_queries"),
    "variable_tracking": ("num_chains", "chain_length"),
}
"""The config fields that only one task reads; setting one for another task is an error."""


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True, slots=True)
class Segment:
    """Characters [start_char, end_char) of a document, of one kind (see the module docstring)."""

    start_char: int
    end_char: int
    kind: Kind
    source: int | None = None
    """For an `answer`: the index (in the document's segments) of the fact it repeats."""


@dataclass(frozen=True)
class SyntheticDocument:
    """A generated text and the segments that tile it; checked on construction."""

    text: str
    segments: tuple[Segment, ...]

    def __post_init__(self):
        problems = _segment_problems(self.text, self.segments)
        if problems:
            raise ValueError("invalid SyntheticDocument: " + "; ".join(problems))

    def segment_text(self, index: int) -> str:
        segment = self.segments[index]
        return self.text[segment.start_char:segment.end_char]


def _segment_problems(text: str, segments: Sequence[Segment]) -> list[str]:
    """Why `segments` do not tile `text` with valid kinds and sources (empty when they do)."""
    problems = []
    position = 0
    for i, segment in enumerate(segments):
        if segment.start_char != position or segment.end_char <= segment.start_char:
            problems.append(f"segment {i} spans [{segment.start_char}, {segment.end_char}), "
                            f"expected a non-empty span from {position}")
        position = segment.end_char
        if segment.kind not in KINDS:
            problems.append(f"segment {i} has unknown kind {segment.kind!r}")
        elif segment.kind == "answer":
            source = segment.source
            if source is None or not 0 <= source < i or segments[source].kind != "fact":
                problems.append(f"answer segment {i} has source {source}, not an earlier fact")
        elif segment.source is not None:
            problems.append(f"{segment.kind} segment {i} has a source; only answers have one")
    if position != len(text):
        problems.append(f"segments end at {position}, the text at {len(text)}")
    return problems


class _Builder:
    """Appends pieces of text with their kind; adjacent noise (or cue) pieces share a segment."""

    def __init__(self):
        self.pieces: list[str] = []
        self.spans: list[list] = []  # [start, end, kind, source]
        self.length = 0

    def add(self, text: str, kind: Kind, source: int | None = None) -> int:
        """Append `text`; returns the index of the segment that holds it."""
        end = self.length + len(text)
        if kind in ("noise", "cue") and self.spans and self.spans[-1][2] == kind:
            self.spans[-1][1] = end
        else:
            self.spans.append([self.length, end, kind, source])
        self.pieces.append(text)
        self.length = end
        return len(self.spans) - 1

    def noise(self, words: Sequence[str]) -> None:
        if words:
            self.add("".join(" " + word for word in words), "noise")

    def build(self) -> SyntheticDocument:
        """The document, without the leading space of its first noise word.

        Every piece starts with a space; only noise loses it, so a fact or cue at the very start
        (never written by the generators, which start with noise) would keep its exact text.
        """
        text = "".join(self.pieces)
        shift = 1 if self.spans and self.spans[0][2] == "noise" else 0
        segments = tuple(Segment(max(start - shift, 0), end - shift, kind, source)
                         for start, end, kind, source in self.spans)
        return SyntheticDocument(text[shift:], segments)


# --------------------------------------------------------------------------- random parts


def _noise_words(rng: np.random.Generator, num_words: int) -> list[str]:
    """`num_words` pseudo-words of 1-3 random syllables: unpredictable from any context."""
    low, high = NOISE_SYLLABLES_PER_WORD
    lengths = rng.integers(low, high + 1, size=num_words)
    syllables = rng.integers(0, len(SYLLABLES), size=int(lengths.sum()))
    ends = np.cumsum(lengths)
    return ["".join(SYLLABLES[s] for s in syllables[end - n:end])
            for n, end in zip(lengths.tolist(), ends.tolist())]


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    """`count` distinct results of `draw` (the config guarantees enough possible values)."""
    values: list[str] = []
    seen: set[str] = set()
    while len(values) < count:
        value = draw()
        if value not in seen:
            seen.add(value)
            values.append(value)
    return values


def _digits(rng: np.random.Generator, count: int, num_digits: int) -> list[str]:
    return _distinct(lambda: "".join(map(str, rng.integers(0, 10, size=num_digits))), count)


def _keys(rng: np.random.Generator, count: int) -> list[str]:
    return _distinct(lambda: "".join(SYLLABLES[s] for s in
                                     rng.integers(0, len(SYLLABLES), size=KEY_SYLLABLES)), count)


def _names(rng: np.random.Generator, count: int) -> list[str]:
    return _distinct(lambda: "".join(CAPITALS[c] for c in
                                     rng.integers(0, len(CAPITALS), size=NAME_LETTERS)), count)


def _scatter(builder: _Builder, words: Sequence[str],
             events: Sequence[tuple[int, Callable[[], None]]]) -> None:
    """Write `words` as noise, calling each event's function just before word number `slot`.

    Events at the same slot run in the order given (a stable sort), so callers control ties.
    """
    done = 0
    for slot, emit in sorted(events, key=lambda event: event[0]):
        builder.noise(words[done:slot])
        done = max(done, slot)
        emit()
    builder.noise(words[done:])


def _fact_slots(rng: np.random.Generator, count: int, num_words: int,
                window_words: int) -> list[int]:
    """Random word positions for facts, after the first noise word (a document starts with
    noise) and at least `window_words` noise words before the end.

    The queries follow the last noise word, so every fact is at least `window_words` words of
    noise before its answer. A space-separated word is at least one byte-level BPE token (the
    pre-tokenizer starts a new token at every " word"), so that is also at least
    `window_words` tokens, plus the query's cue token: the answer lies beyond a window of
    `window_words` tokens.
    """
    return rng.integers(1, num_words - window_words + 1, size=count).tolist()


# --------------------------------------------------------------------------- the three tasks


def _passkey_document(rng: np.random.Generator, words: Sequence[str], needle_slots: Sequence[int],
                      value_digits: int) -> SyntheticDocument:
    """Needles " key <digits>" at `needle_slots`; one query lists them all in order."""
    builder = _Builder()
    values = _digits(rng, len(needle_slots), value_digits)
    facts: list[tuple[int, str]] = []

    def needle(value: str) -> Callable[[], None]:
        def emit() -> None:
            builder.add(PASSKEY_CUE, "cue")
            facts.append((builder.add(" " + value, "fact"), value))
        return emit

    _scatter(builder, words, [(slot, needle(value)) for slot, value in zip(needle_slots, values)])
    builder.add(PASSKEY_QUERY_CUE, "cue")
    for fact, value in facts:
        builder.add(" " + value, "answer", fact)
    return builder.build()


def _kv_document(rng: np.random.Generator, words: Sequence[str], pair_slots: Sequence[int],
                 queried: Sequence[int], value_digits: int) -> SyntheticDocument:
    """Pairs " <key> = <digits>" at `pair_slots`; then the pairs numbered `queried` again."""
    builder = _Builder()
    keys = _keys(rng, len(pair_slots))
    values = _digits(rng, len(pair_slots), value_digits)
    value_facts: dict[int, int] = {}

    def pair(i: int) -> Callable[[], None]:
        def emit() -> None:
            builder.add(" " + keys[i], "fact")
            builder.add(ASSIGN_CUE, "cue")
            value_facts[i] = builder.add(" " + values[i], "fact")
        return emit

    _scatter(builder, words, [(slot, pair(i)) for i, slot in enumerate(pair_slots)])
    for i in queried:
        builder.add(" " + keys[i], "noise")  # which key is asked is a random choice
        builder.add(ASSIGN_CUE, "cue")
        builder.add(" " + values[i], "answer", value_facts[i])
    return builder.build()


def _chain_document(rng: np.random.Generator, words: Sequence[str],
                    assignments: Sequence[tuple[int, int]], queried: Sequence[int],
                    chain_length: int, value_digits: int) -> SyntheticDocument:
    """Variable chains; `assignments` are (slot, chain) in order, `chain_length` per chain.

    The k-th assignment of a chain writes " NAME = <value>" (k = 0) or " NAME = PREVIOUS";
    each query writes " <value>?" and the chain's names in assignment order.
    """
    num_chains = max(chain for _, chain in assignments) + 1
    builder = _Builder()
    values = _digits(rng, num_chains, value_digits)
    names = _names(rng, num_chains * chain_length)
    name_facts: list[list[tuple[int, str]]] = [[] for _ in range(num_chains)]

    def assign(chain: int) -> Callable[[], None]:
        def emit() -> None:
            written = name_facts[chain]
            name = names[chain * chain_length + len(written)]
            fact = builder.add(" " + name, "fact")
            builder.add(ASSIGN_CUE, "cue")
            if written:  # which variable is copied is a random choice (the chain's order)
                builder.add(" " + written[-1][1], "noise")
            else:
                builder.add(" " + values[chain], "fact")
            written.append((fact, name))
        return emit

    _scatter(builder, words, [(slot, assign(chain)) for slot, chain in assignments])
    for chain in queried:
        builder.add(" " + values[chain], "noise")  # which chain is asked is a random choice
        builder.add(CHAIN_QUERY_CUE, "cue")
        for fact, name in name_facts[chain]:
            builder.add(" " + name, "answer", fact)
    return builder.build()


# --------------------------------------------------------------------------- config


def _task_seed(task: str, split: str) -> int:
    """A stable number for (task, split): Python's hash() of a str changes between runs."""
    return zlib.crc32(f"{task}/{split}".encode())


class SyntheticTaskConfig(StrictModel):
    task: Task
    """Which long-range task the documents pose (see helox.data.synthetic)."""
    domain: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Domain of the generated documents; None means `synthetic_<task>`."""
    train_documents: int = Field(default=1000, ge=0)
    """Documents generated for the training split."""
    val_documents: int = Field(default=50, ge=0)
    """Documents generated for the validation split (a different random stream)."""
    seed: int = Field(default=0, ge=0)
    """Every document is a pure function of (seed, task, split, index)."""
    local_window_tokens: int = Field(default=64, gt=0)
    """Facts lie at least this many noise words (so tokens) before their answers."""
    context_words: int = Field(default=400, gt=0)
    """Noise words per document (exact; facts, cues and queries come on top)."""
    value_digits: int = Field(default=10, ge=1, le=64)
    """Digits of each random value (passkeys, kv values, variable values)."""
    num_passkeys: int = Field(default=6, ge=1, le=1000)
    """passkey: needles per document, all recalled by the one query at the end."""
    num_pairs: int = Field(default=24, ge=1, le=1000)
    """kv_recall: key-value pairs per document."""
    num_queries: int = Field(default=24, ge=1, le=1000)
    """kv_recall: distinct keys asked at the end (at most num_pairs)."""
    num_chains: int = Field(default=3, ge=1, le=100)
    """variable_tracking: chains per document, each asked at the end."""
    chain_length: int = Field(default=5, ge=1, le=100)
    """variable_tracking: variables per chain (one gets the value, the others copy it)."""

    @model_validator(mode="after")
    def _check_combinations(self) -> SyntheticTaskConfig:
        # A knob at its default is harmless (saved configs write every field out).
        problems = [f"{knob} applies to task {task}, not {self.task}; remove it"
                    for task, knobs in TASK_KNOBS.items() if task != self.task
                    for knob in knobs
                    if getattr(self, knob) != type(self).model_fields[knob].default]
        if self.context_words <= self.local_window_tokens:
            problems.append(f"context_words ({self.context_words}) must be more than "
                            f"local_window_tokens ({self.local_window_tokens}): a document starts "
                            "with a noise word and at least local_window_tokens noise words lie "
                            "between the last fact and the first query; raise context_words or "
                            "lower local_window_tokens")
        num_values = {"passkey": self.num_passkeys, "kv_recall": self.num_pairs,
                      "variable_tracking": self.num_chains}[self.task]
        if 10 ** self.value_digits < num_values:
            problems.append(f"value_digits ({self.value_digits}) allows fewer than the "
                            f"{num_values} distinct values a document needs; raise value_digits")
        if self.task == "kv_recall" and self.num_queries > self.num_pairs:
            problems.append(f"num_queries ({self.num_queries}) is more than num_pairs "
                            f"({self.num_pairs}): only distinct keys are asked; lower num_queries")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def domain_name(self) -> str:
        return self.domain or f"synthetic_{self.task}"

    def documents(self, split: Split) -> list[SyntheticDocument]:
        """The split's documents; train and val draw from different seeds, so never overlap."""
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        count = self.train_documents if split == "train" else self.val_documents
        base = [self.seed, _task_seed(self.task, split), SPLIT_CODES[split]]
        return [self._document(np.random.default_rng(base + [index])) for index in range(count)]

    def _document(self, rng: np.random.Generator) -> SyntheticDocument:
        words = _noise_words(rng, self.context_words)
        window = self.local_window_tokens
        if self.task == "passkey":
            slots = _fact_slots(rng, self.num_passkeys, self.context_words, window)
            return _passkey_document(rng, words, slots, self.value_digits)
        if self.task == "kv_recall":
            slots = _fact_slots(rng, self.num_pairs, self.context_words, window)
            queried = rng.permutation(self.num_pairs)[:self.num_queries].tolist()
            return _kv_document(rng, words, slots, queried, self.value_digits)
        num_assignments = self.num_chains * self.chain_length
        slots = _fact_slots(rng, num_assignments, self.context_words, window)
        chains = rng.permutation(np.repeat(np.arange(self.num_chains), self.chain_length))
        # sorted slots, shuffled chains: each chain's assignments come in slot order
        assignments = list(zip(sorted(slots), chains.tolist()))
        queried = rng.permutation(self.num_chains).tolist()
        return _chain_document(rng, words, assignments, queried, self.chain_length,
                               self.value_digits)


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """A prompt that ends right before `answer`; prompt + answer is a whole document."""

    prompt: str
    answer: str


def make_probe(task: Task, seed: int, context_words: int, depth_fraction: float) -> Probe:
    """A needle-in-a-haystack probe: one asked fact at `depth_fraction` (0 = start, 1 = end).

    The other knobs take SyntheticTaskConfig's defaults: passkey has a single needle; kv_recall
    has num_pairs pairs, the asked one at the depth and the rest at random depths; in
    variable_tracking the asked chain's assignments sit together at the depth and the other
    chains are spread at random. Unlike training documents, no window is kept between fact
    and query: at depth 1 the fact is right before the query.
    """
    if task not in TASK_KNOBS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASK_KNOBS)}")
    if not 0.0 <= depth_fraction <= 1.0:
        raise ValueError(f"depth_fraction ({depth_fraction}) must be within [0, 1]")
    if context_words < 1 or seed < 0:
        raise ValueError(f"context_words ({context_words}) must be positive and seed ({seed}) "
                         "non-negative")
    rng = np.random.default_rng([seed, _task_seed(task, "probe"), SPLIT_CODES["probe"]])
    words = _noise_words(rng, context_words)
    depth_slot = max(1, round(depth_fraction * context_words))  # a document starts with noise
    digits = _default("value_digits")
    if task == "passkey":
        document = _passkey_document(rng, words, [depth_slot], digits)
    elif task == "kv_recall":
        others = rng.integers(0, context_words + 1, size=_default("num_pairs") - 1).tolist()
        document = _kv_document(rng, words, [depth_slot] + others, [0], digits)
    else:
        length = _default("chain_length")
        others = rng.integers(0, context_words + 1, size=(_default("num_chains") - 1) * length)
        chains = rng.permutation(np.repeat(np.arange(1, _default("num_chains")), length))
        assignments = [(depth_slot, 0)] * length + list(zip(sorted(others.tolist()),
                                                            chains.tolist()))
        document = _chain_document(rng, words, assignments, [0], length, digits)
    first_answer = next(s for s in document.segments if s.kind == "answer")
    return Probe(document.text[:first_answer.start_char], document.text[first_answer.start_char:])


def _default(field: str) -> int:
    return SyntheticTaskConfig.model_fields[field].default


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class SignalReport:
    """Where the predictable signal of a set of documents lies (module docstring: definition)."""

    beyond_bits: float
    within_bits: float
    fraction_beyond: float
    """beyond / (beyond + within); 0 when the documents have no predictable signal at all."""
    num_documents: int
    num_tokens: int
    local_window_tokens: int

    def summary(self) -> str:
        total = self.beyond_bits + self.within_bits
        return (f"{self.fraction_beyond:.1%} of the predictable signal lies beyond "
                f"{self.local_window_tokens} tokens ({self.beyond_bits:.0f} of {total:.0f} bits; "
                f"{self.num_documents} documents, {self.num_tokens} tokens)")


@dataclass(frozen=True)
class _Tokenized:
    ids: np.ndarray
    segment: np.ndarray
    """Index of the segment holding each token's first character."""
    fact_end: np.ndarray
    """For answer tokens: index of the last token of the source fact; -1 elsewhere."""


def _tokenize(document: SyntheticDocument, ids: list[int],
              offsets: list[tuple[int, int]]) -> _Tokenized:
    """Map tokens to segments; zero-width tokens (inserted specials) are left out."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    keep = spans[:, 1] > spans[:, 0]
    token_ids = np.asarray(ids, dtype=np.int64)[keep]
    token_starts = spans[keep, 0]
    segment_starts = np.asarray([s.start_char for s in document.segments], dtype=np.int64)
    segment = np.searchsorted(segment_starts, token_starts, side="right") - 1
    # the last token of a fact is the one holding its last character
    segment_last_chars = [s.end_char - 1 for s in document.segments]
    last_token = np.searchsorted(token_starts, segment_last_chars, side="right") - 1
    sources = np.asarray([-1 if s.source is None else s.source for s in document.segments])
    token_source = sources[segment]
    fact_end = np.where(token_source >= 0, last_token[np.maximum(token_source, 0)], -1)
    return _Tokenized(token_ids, segment, fact_end)


def measure_signal(documents: Iterable[SyntheticDocument], tokenizer: Tokenizer,
                   local_window_tokens: int) -> SignalReport:
    """Bits of predictable signal beyond and within `local_window_tokens` (module docstring)."""
    documents = list(documents)
    encodings = tokenizer.encode_batch([d.text for d in documents], add_special_tokens=False)
    tokenized = [_tokenize(d, e.ids, e.offsets) for d, e in zip(documents, encodings)]
    all_ids = np.concatenate([t.ids for t in tokenized]) if tokenized else np.zeros(0, np.int64)
    counts = np.bincount(all_ids, minlength=tokenizer.get_vocab_size())
    with np.errstate(divide="ignore"):
        surprisal_bits = np.log2(max(len(all_ids), 1)) - np.log2(counts)
    cue, answer = KINDS.index("cue"), KINDS.index("answer")
    beyond_bits = within_bits = 0.0
    for document, t in zip(documents, tokenized):
        kinds = np.asarray([KINDS.index(s.kind) for s in document.segments])[t.segment]
        bits = surprisal_bits[t.ids]
        distance = np.arange(len(t.ids)) - t.fact_end
        beyond = (kinds == answer) & (distance > local_window_tokens)
        within = (kinds == cue) | ((kinds == answer) & ~beyond)
        beyond_bits += float(bits[beyond].sum())
        within_bits += float(bits[within].sum())
    total = beyond_bits + within_bits
    return SignalReport(beyond_bits=beyond_bits, within_bits=within_bits,
                        fraction_beyond=beyond_bits / total if total > 0 else 0.0,
                        num_documents=len(documents), num_tokens=len(all_ids),
                        local_window_tokens=local_window_tokens)
