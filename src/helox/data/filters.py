"""Document filters: Unicode and whitespace normalisation, and Gopher's quality rules.

`normalize` puts text in one canonical form (Unicode NFC or NFKC, `\\n` line ends, no control
characters, single spaces inside lines, no trailing spaces, at most one blank line in a row) so
that later steps (dedup, quality rules, the tokenizer) see the same bytes for the same text.

`quality` applies the heuristics of Gopher (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", appendix A, table A1): the quality rules (word count,
mean word length, symbol ratio, bullet and ellipsis lines, alphabetic words, stop words) and the
repetition rules (duplicate lines and paragraphs, top 2..4-gram and duplicated 5..10-gram
character fractions). The reference implementation is datatrove's `GopherQualityFilter` and
`GopherRepetitionFilter`: same definitions, thresholds and rule order, with the differences
listed in `QualityFilter`'s docstring; tests/data/test_filters.py runs both and compares the
reasons. It is written here rather than wrapped because datatrove is an optional extra, splits
words with spaCy (not a dependency, ~60 documents/s) and computes every rule in Python for
every document, where this step stops at the first failing rule, splits words through a cache
(`WordSplitter`) and counts n-grams only where they can repeat.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from itertools import compress
from typing import Callable, ClassVar, Iterable, Iterator, Literal

import numpy as np
from pydantic import Field, model_validator

from helox.configbase import StrictModel
from helox.data.document import Document
from helox.data.pipeline import StepStats
from helox.data.words import Words, WordSplitter

# --- normalize -----------------------------------------------------------------------------

# Every character `str.splitlines()` breaks at, so that afterwards lines are split at "\n" only.
LINE_BREAK = re.compile("\r\n|[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# C0/C1 controls and DEL, except tab and the line breaks above (those are whitespace).
CONTROL_CHAR = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]+")
REPLACEMENT_CHAR = re.compile("\ufffd+")
# Horizontal whitespace: tab and the Unicode space separators (category Zs).
_SPACE = "\t \xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
_SPACE_NOT_ASCII = "\t\xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
# A run inside a line (after the first visible character, so indentation of code survives).
INNER_SPACES = re.compile(f"(?<=\\S)(?:[{_SPACE}]{{2,}}|[{_SPACE_NOT_ASCII}])(?=\\S)")
TRAILING_SPACES = re.compile(f"[{_SPACE}]+$", re.MULTILINE)
BLANK_LINES = re.compile("\n{3,}")

Rule = Callable[[str], tuple[str, int]]


class NormalizeConfig(StrictModel):
    step: Literal["normalize"] = "normalize"
    scope: ClassVar[str] = "document"
    form: Literal["NFC", "NFKC"] | None = "NFC"
    """Unicode normal form (NFKC also folds compatibility characters: ligatures, full-width
    letters, superscripts); None keeps the text's own form."""
    line_endings: bool = True
    """Turn \\r\\n, \\r and the other line breaks of `str.splitlines` (\\v, \\f, U+2028, ...)
    into \\n."""
    remove_control_chars: bool = True
    """Delete C0/C1 control characters and DEL (tab and line breaks are kept)."""
    remove_replacement_chars: bool = False
    """Delete U+FFFD (left by failed decoding). Off by default: deleting it silently glues
    the parts of a damaged word together; the quality rules see damaged text either way."""
    collapse_spaces: bool = True
    """Replace a run of spaces/tabs inside a line by one space (leading indentation is kept,
    because it carries the structure of code and verse)."""
    strip_trailing_spaces: bool = True
    """Delete spaces and tabs at the end of every line."""
    collapse_blank_lines: bool = True
    """Replace three or more newlines in a row by two (at most one blank line)."""
    strip_document: bool = True
    """Delete whitespace at the start and the end of the document."""

    def build(self) -> Normalize:
        return Normalize(self)


def _regex_rule(pattern: re.Pattern, replacement: str, might_apply: Callable[[str], bool]
                ) -> Rule:
    """Replace `pattern`; `might_apply` is a quick C-level test (str methods) that skips the
    slower regex scan for the text it cannot change, which is most text."""
    def rule(text: str) -> tuple[str, int]:
        return pattern.subn(replacement, text) if might_apply(text) else (text, 0)
    return rule


def _has_line_breaks(text: str) -> bool:
    return any(char in text for char in "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def _has_control_chars(text: str) -> bool:
    # Not printable: controls, but also format characters and non-ASCII spaces (then the
    # regex decides).
    return not text.replace("\n", "").replace("\t", "").isprintable()


def _has_inner_spaces(text: str) -> bool:
    return "  " in text or "\t" in text or not text.isascii()


def _has_trailing_spaces(text: str) -> bool:
    return (" \n" in text or "\t\n" in text or text.endswith((" ", "\t"))
            or not text.isascii())


def _has_replacement_chars(text: str) -> bool:
    return "\ufffd" in text


def _has_blank_lines(text: str) -> bool:
    return "\n\n\n" in text


def _unicode_rule(form: str) -> Rule:
    def rule(text: str) -> tuple[str, int]:
        # is_normalized is a quick C-level check: most text is already NFC.
        if unicodedata.is_normalized(form, text):
            return text, 0
        normal = unicodedata.normalize(form, text)
        return normal, int(normal != text)
    return rule


def _strip_rule(text: str) -> tuple[str, int]:
    stripped = text.strip()
    return stripped, int(len(stripped) != len(text))


class Normalize:
    """Rewrite each document in canonical form; drop the ones left empty (reason "empty").

    Edits are counted per rule in `stats.changed` under the rule's name ("unicode_form",
    "line_endings", "control_chars", "replacement_chars", "spaces", "trailing_spaces",
    "blank_lines", "document_ends"): the number of places replaced (runs count once), and for
    "unicode_form" and "document_ends" the number of documents changed.
    """

    name = "normalize"
    scope = "document"

    def __init__(self, config: NormalizeConfig):
        self.config = config
        c = config
        candidates: list[tuple[str, Rule | None]] = [
            ("unicode_form", _unicode_rule(c.form) if c.form else None),
            ("line_endings", _regex_rule(LINE_BREAK, "\n", _has_line_breaks)
             if c.line_endings else None),
            ("control_chars", _regex_rule(CONTROL_CHAR, "", _has_control_chars)
             if c.remove_control_chars else None),
            ("replacement_chars", _regex_rule(REPLACEMENT_CHAR, "", _has_replacement_chars)
             if c.remove_replacement_chars else None),
            ("spaces", _regex_rule(INNER_SPACES, " ", _has_inner_spaces)
             if c.collapse_spaces else None),
            ("trailing_spaces", _regex_rule(TRAILING_SPACES, "", _has_trailing_spaces)
             if c.strip_trailing_spaces else None),
            ("blank_lines", _regex_rule(BLANK_LINES, "\n\n", _has_blank_lines)
             if c.collapse_blank_lines else None),
            ("document_ends", _strip_rule if c.strip_document else None),
        ]
        self.rules = [(reason, rule) for reason, rule in candidates if rule is not None]

    def normalize(self, text: str) -> tuple[str, list[tuple[str, int]]]:
        """The normalised text and the (rule, count) of every rule that changed it."""
        edits = []
        for reason, rule in self.rules:
            text, count = rule(text)
            if count:
                edits.append((reason, count))
        return text, edits

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            text, edits = self.normalize(doc.text)
            if not text:
                stats.drop(doc, "empty")
                continue
            for reason, count in edits:
                stats.change(reason, count)
            yield dataclasses.replace(doc, text=text) if edits else doc


# --- quality -------------------------------------------------------------------------------

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
ELLIPSES = ("...", "…")
BULLETS = ("•", "-")
TOP_NGRAM_SIZES = (2, 3, 4)  # Gopher's; the config has a field for each
DUP_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)

Failure = tuple[str, str] | None
"""(reason, detail) of the first rule a document fails, or None if it passes them all."""


def _fraction(value: float | None) -> float | None:
    return Field(value, ge=0.0, le=1.0)


class QualityConfig(StrictModel):
    step: Literal["quality"] = "quality"
    scope: ClassVar[str] = "document"
    min_chars: int | None = Field(None, ge=0)
    """Drop documents shorter than this many characters."""
    max_chars: int | None = Field(1_000_000, ge=1)
    """Drop documents longer than this (checked first, so a huge document costs nothing)."""
    min_words: int | None = Field(50, ge=0)
    """Drop documents with fewer words (tokens with a letter or digit)."""
    max_words: int | None = Field(100_000, ge=1)
    """Drop documents with more words."""
    min_mean_word_chars: float | None = Field(3.0, ge=0)
    """Drop documents whose mean word length is below this (in characters)."""
    max_mean_word_chars: float | None = Field(10.0, ge=0)
    """Drop documents whose mean word length is above this (in characters)."""
    max_symbol_word_ratio: float | None = Field(0.1, ge=0)
    """Drop documents with more '#', or more ellipses ('...', '…'), than this per token."""
    max_bullet_line_fraction: float | None = _fraction(0.9)
    """Drop documents in which more than this fraction of lines start with '•' or '-'."""
    max_ellipsis_line_fraction: float | None = _fraction(0.3)
    """Drop documents in which more than this fraction of lines end with an ellipsis."""
    min_alpha_word_fraction: float | None = _fraction(0.8)
    """Drop documents in which fewer than this fraction of tokens contain a letter."""
    min_stop_words: int | None = Field(2, ge=0)
    """Drop documents containing fewer than this many distinct `stop_words`."""
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS
    """The words `min_stop_words` counts (case-sensitive; Gopher's English list)."""
    max_dup_line_fraction: float | None = _fraction(0.30)
    """Drop documents in which more than this fraction of lines repeat an earlier line."""
    max_dup_paragraph_fraction: float | None = _fraction(0.30)
    """Drop documents in which more than this fraction of paragraphs repeat an earlier one."""
    max_dup_line_char_fraction: float | None = _fraction(0.20)
    """Drop documents in which repeated lines hold more than this fraction of the characters."""
    max_dup_paragraph_char_fraction: float | None = _fraction(0.20)
    """Drop documents in which repeated paragraphs hold more than this fraction of characters."""
    max_top_2gram_char_fraction: float | None = _fraction(0.20)
    """Drop documents in which the most frequent word 2-gram covers more than this fraction."""
    max_top_3gram_char_fraction: float | None = _fraction(0.18)
    """Same for the most frequent word 3-gram."""
    max_top_4gram_char_fraction: float | None = _fraction(0.16)
    """Same for the most frequent word 4-gram."""
    max_dup_5gram_char_fraction: float | None = _fraction(0.15)
    """Drop documents in which repeated word 5-grams cover more than this fraction of chars."""
    max_dup_6gram_char_fraction: float | None = _fraction(0.14)
    """Same for repeated word 6-grams."""
    max_dup_7gram_char_fraction: float | None = _fraction(0.13)
    """Same for repeated word 7-grams."""
    max_dup_8gram_char_fraction: float | None = _fraction(0.12)
    """Same for repeated word 8-grams."""
    max_dup_9gram_char_fraction: float | None = _fraction(0.11)
    """Same for repeated word 9-grams."""
    max_dup_10gram_char_fraction: float | None = _fraction(0.10)
    """Same for repeated word 10-grams."""

    @model_validator(mode="after")
    def _check_ranges(self) -> QualityConfig:
        problems = []
        for low, high in [("min_chars", "max_chars"), ("min_words", "max_words"),
                          ("min_mean_word_chars", "max_mean_word_chars")]:
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value is not None and high_value is not None and low_value > high_value:
                problems.append(f"{low} ({low_value}) is above {high} ({high_value})")
        if self.min_stop_words is not None and self.min_stop_words > len(set(self.stop_words)):
            problems.append(f"min_stop_words ({self.min_stop_words}) is more than the "
                            f"{len(set(self.stop_words))} distinct stop_words: every document "
                            "would be dropped; lower it or add stop words")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def build(self) -> QualityFilter:
        return QualityFilter(self)


class QualityFilter:
    """Drop documents that fail a Gopher rule; the reason is the first rule failed.

    Rules run in datatrove's order, which is also cheapest first: characters, word counts,
    lines, word kinds, duplicate paragraphs and lines, n-grams. Definitions follow datatrove
    0.10.1: tokens include punctuation marks (so the '#' ratio, ellipsis ratio and alphabetic
    fraction are per token, and text rich in punctuation, like verse, scores lower), n-gram
    characters include the spaces between words for top n-grams but not for duplicated ones,
    and every character fraction is over the whole text. Differences from datatrove:
    - tokens come from `WordSplitter`, a re-implementation of spaCy's English tokenizer, not
      from spaCy itself, and a word is a token with a letter or digit (datatrove: a token with
      a character outside its punctuation list, which leaves out '•', '§' and emoji);
    - a top n-gram that occurs only once counts as 0: datatrove then takes the text's first
      n-gram, and drops e.g. a short docstring whose one long signature line is a 4-gram
      holding 16% of its characters, for "repetition";
    - n-grams are compared token by token, not as tokens joined without a separator (in
      datatrove "ab c" and "a bc" are the same duplicated n-gram).
    """

    name = "quality"
    scope = "document"

    def __init__(self, config: QualityConfig):
        self.config = config
        self.split_words = WordSplitter(reserved_tokens=config.stop_words)
        self.stop_word_codes = frozenset(map(self.split_words.code, config.stop_words))
        self.top_ngram_limits = {n: getattr(config, f"max_top_{n}gram_char_fraction")
                                 for n in TOP_NGRAM_SIZES}
        self.dup_ngram_limits = {n: getattr(config, f"max_dup_{n}gram_char_fraction")
                                 for n in DUP_NGRAM_SIZES}
        enabled = [n for n, limit in {**self.top_ngram_limits, **self.dup_ngram_limits}.items()
                   if limit is not None]
        self.max_ngram_size = max(enabled, default=0)

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            failure = self.check(doc.text)
            if failure is None:
                yield doc
            else:
                stats.drop(doc, *failure)

    def check(self, text: str) -> Failure:
        """The first rule `text` fails as (reason, detail), or None if it passes."""
        failure = self._check_chars(text)
        if failure or not text:
            return failure or ("empty", "")
        words = self.split_words.split(text)
        # datatrove's order (its quality filter, then its repetition filter), so that the
        # reason is the same one.
        return (self._check_word_counts(text, words) or self._check_lines(text)
                or self._check_word_kinds(words) or self._check_repeated_parts(text)
                or self._check_ngrams(text, words.codes))

    def _check_chars(self, text: str) -> Failure:
        c = self.config
        if c.max_chars is not None and len(text) > c.max_chars:
            return "too_many_chars", str(len(text))
        if c.min_chars is not None and len(text) < c.min_chars:
            return "too_few_chars", str(len(text))
        return None

    def _check_word_counts(self, text: str, words: Words) -> Failure:
        c = self.config
        if c.min_words is not None and words.num_words < c.min_words:
            return "too_few_words", str(words.num_words)
        if c.max_words is not None and words.num_words > c.max_words:
            return "too_many_words", str(words.num_words)
        if words.num_words:  # the mean of no words is undefined: the rule does not apply
            mean_chars = words.word_chars / words.num_words
            if c.min_mean_word_chars is not None and mean_chars < c.min_mean_word_chars:
                return "mean_word_too_short", f"{mean_chars:.2f}"
            if c.max_mean_word_chars is not None and mean_chars > c.max_mean_word_chars:
                return "mean_word_too_long", f"{mean_chars:.2f}"
        num_tokens = max(len(words.codes), 1)
        if c.max_symbol_word_ratio is not None:
            for symbol, count in [("#", text.count("#")),
                                  ("ellipsis", text.count("...") + text.count("…"))]:
                if count / num_tokens > c.max_symbol_word_ratio:
                    return "symbol_word_ratio", f"{symbol} {count / num_tokens:.3f}"
        return None

    def _check_word_kinds(self, words: Words) -> Failure:
        c = self.config
        alpha = words.num_alpha_tokens / max(len(words.codes), 1)
        if c.min_alpha_word_fraction is not None and alpha < c.min_alpha_word_fraction:
            return "alpha_word_fraction", f"{alpha:.3f}"
        if c.min_stop_words is not None:
            found = len(self.stop_word_codes.intersection(words.codes))
            if found < c.min_stop_words:
                return "too_few_stop_words", str(found)
        return None

    def _check_lines(self, text: str) -> Failure:
        c = self.config
        lines = text.splitlines() or [""]
        if c.max_bullet_line_fraction is not None:
            bullets = sum(1 for line in lines if line.lstrip().startswith(BULLETS))
            if bullets / len(lines) > c.max_bullet_line_fraction:
                return "bullet_line_fraction", f"{bullets / len(lines):.3f}"
        if c.max_ellipsis_line_fraction is not None:
            ellipses = sum(1 for line in lines if line.rstrip().endswith(ELLIPSES))
            if ellipses / len(lines) > c.max_ellipsis_line_fraction:
                return "ellipsis_line_fraction", f"{ellipses / len(lines):.3f}"
        return None

    def _check_repeated_parts(self, text: str) -> Failure:
        c = self.config
        for part, parts, max_fraction, max_char_fraction in [
                ("paragraph", _paragraphs(text), c.max_dup_paragraph_fraction,
                 c.max_dup_paragraph_char_fraction),
                ("line", _lines(text), c.max_dup_line_fraction, c.max_dup_line_char_fraction)]:
            repeats, repeated_chars = _repeats(parts)
            if max_fraction is not None and repeats / len(parts) > max_fraction:
                return f"dup_{part}_fraction", f"{repeats / len(parts):.3f}"
            if max_char_fraction is not None and repeated_chars / len(text) > max_char_fraction:
                return f"dup_{part}_char_fraction", f"{repeated_chars / len(text):.3f}"
        return None

    def _check_ngrams(self, text: str, codes: str) -> Failure:
        """Top 2..4-gram and duplicated 5..10-gram rules, from the n-grams that repeat.

        `codes` has one character per token, so token n-grams are its substrings. Only repeated
        n-grams matter to either rule, and an n-gram can only repeat where the (n-1)-gram at
        the same position repeats; so after counting all 2-grams (numpy), each size looks only
        where the previous one repeated (a few positions, in text worth keeping), and the rules
        stop at the first size that does not repeat at all.
        """
        if self.max_ngram_size < 2:
            return None
        starts, top_count, top_start = _repeated_2grams(codes)
        for n in range(2, self.max_ngram_size + 1):
            if n > 2:
                if starts[-1] > len(codes) - n:  # no n-gram starts there
                    starts = starts[:-1]
                grams = [codes[i:i + n] for i in starts]
                counts = Counter(grams)
                starts = list(compress(starts, map((1).__lt__, map(counts.__getitem__, grams))))
                if starts:
                    gram, top_count = counts.most_common(1)[0]  # ties: the first in the text
                    top_start = codes.find(gram)
            if not starts:  # nothing repeats, at this size or above
                return None
            failure = (self._check_top_ngram(text, codes[top_start:top_start + n], top_count)
                       or self._check_dup_ngrams(text, codes, starts, n))
            if failure:
                return failure
        return None

    def _check_top_ngram(self, text: str, gram: str, count: int) -> Failure:
        limit = self.top_ngram_limits.get(len(gram))
        if limit is None:
            return None
        # Characters of the n-gram written with single spaces, times its occurrences.
        chars = sum(map(self.split_words.code_chars.__getitem__, gram)) + len(gram) - 1
        fraction = chars * count / len(text)
        if fraction > limit:
            return f"top_{len(gram)}gram_char_fraction", f"{fraction:.3f}"
        return None

    def _check_dup_ngrams(self, text: str, codes: str, starts: list[int], n: int) -> Failure:
        """datatrove's duplicated n-gram characters: scan the n-grams left to right; one seen
        before adds its characters (without spaces) and the scan jumps past it, so overlapping
        copies count once. Only repeated n-grams (at `starts`) can have been seen before, so
        the scan visits only those; the others would just advance it by one."""
        limit = self.dup_ngram_limits.get(n)
        if limit is None:
            return None
        code_chars, stop_above = self.split_words.code_chars.__getitem__, limit * len(text)
        seen: set[str] = set()
        chars, resume = 0, 0
        for i in starts:
            if i < resume:  # inside a copy the scan jumped over
                continue
            gram = codes[i:i + n]
            if gram in seen:
                chars += sum(map(code_chars, gram))
                resume = i + n
                if chars > stop_above:
                    return f"dup_{n}gram_char_fraction", f"{chars / len(text):.3f}"
            else:
                seen.add(gram)
        return None


def _repeated_2grams(codes: str) -> tuple[list[int], int, int]:
    """Where a 2-gram of `codes` starts that occurs more than once, in order; and the count
    and start of the most frequent 2-gram (ties: the first in the text, as `Counter`).

    numpy, because this is the one count over every position: a stable sort of the 2-grams
    (as 64-bit keys) puts equal ones together, in text order.
    """
    if len(codes) < 2:
        return [], 0, 0
    # surrogatepass: codes are chr(token index), and indexes 55,296+ fall in U+D800..U+DFFF.
    raw = codes.encode("utf-32-le", "surrogatepass")
    tokens = np.frombuffer(raw, dtype=np.uint32).astype(np.uint64)
    keys = (tokens[:-1] << np.uint64(32)) | tokens[1:]
    order = keys.argsort(kind="stable")
    sorted_keys = keys[order]
    first_of_group = np.empty(len(keys), dtype=bool)
    first_of_group[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first_of_group[1:])
    group = np.cumsum(first_of_group) - 1  # group of each sorted 2-gram
    sizes = np.bincount(group)
    top_count = int(sizes.max())
    if top_count < 2:
        return [], 1, 0
    top_start = int(order[first_of_group][sizes == top_count].min())
    repeated = np.zeros(len(keys), dtype=bool)
    repeated[order[sizes[group] > 1]] = True
    return np.flatnonzero(repeated).tolist(), top_count, top_start


def _paragraphs(text: str) -> list[str]:
    """datatrove's `re.split("\\n{2,}", text.strip())`, with str methods (5x faster)."""
    parts = text.strip().split("\n\n")
    if "\n\n\n" not in text:
        return parts
    # A run of 3+ newlines leaves empty parts and parts starting with "\n": drop and strip.
    return [part.lstrip("\n") for part in parts if part.strip("\n")] or [""]


def _lines(text: str) -> list[str]:
    """datatrove's `re.split("\\n+", text)`, with str methods (5x faster)."""
    lines = text.split("\n")
    if "\n\n" not in text:
        return lines
    # A run of newlines leaves empty lines, except at either end, where re.split keeps one.
    return [lines[0], *filter(None, lines[1:-1]), lines[-1]] if len(lines) > 1 else lines


def _repeats(parts: list[str]) -> tuple[int, int]:
    """How many of `parts` repeat an earlier one, and their characters."""
    counts = Counter(parts)
    if len(counts) == len(parts):
        return 0, 0
    extra = [(count - 1, len(part)) for part, count in counts.items() if count > 1]
    return sum(k for k, _ in extra), sum(k * length for k, length in extra)
