r"""English word splitting compatible with spaCy's tokenizer, fast through a chunk cache.

datatrove splits English words with spaCy's tokenizer (`spacy.blank("en")`), and the Gopher
ratios are per token, punctuation marks included, so how text is cut decides close calls:
"madam;--you" is one spaCy token (a `\w+|[^\w\s]` regex makes four), and with a regex 6% of
the first 2,000 corpus documents change decision. spaCy is not a dependency and tokenizes ~60
documents/s, so `WordSplitter` re-implements its algorithm for one whitespace-separated chunk
(special cases, then prefixes/suffixes peeled off, then infixes split) with its English rules
(spaCy 3.8, MIT licence; letter case of the Latin script only), and caches chunks: text repeats
its chunks, so most are dictionary hits.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from operator import itemgetter
from typing import Iterable, NamedTuple

_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = "$£€¥฿₽﷼₴₠-₿"
_LOWER = "a-zß-öø-ÿ"
_UPPER = "A-ZÀ-ÖØ-Þ"
_ALPHA = "[^\\W\\d_]"
# Characters after which a final period is split off (spaCy's list: its `PUNCT` and
# `CONCAT_QUOTES` go into a class as they are, "|" and "(?:" included).
_BEFORE_PERIOD_SUFFIX = "0-9" + _LOWER + "%²+" + _PUNCT + _QUOTES + "(?:|-"  # "-" last: literal
_UNITS = ("km|km²|km³|m|m²|m³|dm|dm²|dm³|cm|cm²|cm³|mm|mm²|mm³|ha|µm|nm|yd|in|ft|kg|g|mg|µg|t|lb|"
          "oz|m/s|km/h|kmh|mph|hPa|Pa|mbar|mb|MB|kb|KB|gb|GB|tb|TB|T|G|M|K|%")
_URL = re.compile(
    r"^(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?(?:(?:[A-Za-z0-9\u00a1-\uffff]"
    r"[A-Za-z0-9\u00a1-\uffff_-]{0,62})?[A-Za-z0-9\u00a1-\uffff]\.)+"
    rf"[{_LOWER}]{{2,63}}(?::\d{{2,5}})?(?:[/?#]\S*)?$")
_EMOTICONS = r"""
:) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (;
(-; :( :-( :(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ =| :| :-| ]= =[ :1 :P
:-P :p :-p :O :-O :o :-o :0 :-0 :() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D ;D ;-D =D xD
XD xDD XDD 8D 8-D ^_^ ^__^ ^___^ >.< >.> <.< ._. ;_; -_- -__- v.v V.V v_v V_V o_o o_O O_o O_O 0_o
o_0 0_0 o.O O.o O.O o.o 0.0 o.0 0.o @_@ <3 <33 <333 </3 (^_^) (-_-) (._.) (>_<) (*_*) (¬_¬) ಠ_ಠ
ಠ︵ಠ (ಠ_ಠ) ¯\(ツ)/¯ (╯°□°）╯︵┻━┻ ><(((*>
"""
_WHOLE_TOKENS = """
' \\") <space> '' C++ and/or w/o 'S 's ‘S ‘s 're 'd 'em 'll 'nuff em ll nuff 'Cause 'cause 'cos
'Cos 'coz 'Coz 'cuz 'Cuz 'bout ma'am Ma'am o'clock O'clock lovin' Lovin' lovin Lovin havin' Havin'
havin Havin doin' Doin' doin Doin goin' Goin' goin Goin nothin' Nothin' nothin Nothin nuthin'
Nuthin' nuthin Nuthin ol' Ol' ol Ol somethin' Somethin' somethin Somethin a.m. p.m. Adm. Bros. co.
Co. Corp. D.C. Dr. e.g. E.g. E.G. Gen. Gov. i.e. I.e. I.E. Inc. Jr. Ltd. Md. Messrs. Mo. Mont.
Mr. Mrs. Ms. Ph.D. Prof. Rep. Rev. Sen. St. vs. v.s. Mt. Ak. Ala. Apr. Ariz. Ark. Aug. Calif.
Colo. Conn. Dec. Del. Feb. Fla. Ga. Ia. Id. Ill. Ind. Jan. Jul. Jun. Kan. Kans. Ky. La. Mar. Mass.
Mich. Minn. Miss. N.C. N.D. N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. S.C.
Sep. Sept. Tenn. Va. Wash. Wis. ä. ö. ü. —
"""
# Contractions: (heads, clitics); each head + one clitic sequence is split into its parts.
_CONTRACTIONS = [
    ("i", ["'m"]),
    ("i you he she it we they", ["'ll", "'ll've", "'d", "'d've"]),
    ("i you we they", ["'ve"]),
    ("you we they", ["'re"]),
    ("he she it who what when where why how there that this", ["'s"]),
    ("who what when where why how there that this these those",
     ["'ll", "'ll've", "'d", "'d've"]),
    ("who what when where why how there these those", ["'re", "'ve"]),
    ("ca could do does did had may might must need ought sha should wo would",
     ["n't", "n't've"]),
    ("could might must should would", ["'ve"]),
    ("ai are is was were have has dare", ["n't"]),
]
_OTHER_SPLITS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                 "let's": ("let", "'s"), "y'all": ("y'", "all"), "yall": ("y", "all"),
                 "c'mon": ("c'm", "on"), "not've": ("not", "'ve"), "notve": ("not", "ve"),
                 "how'd'y": ("how", "'d", "'y")}
_NOT_CONTRACTIONS = {"ill", "its", "hell", "shell", "shed", "were", "well", "whore"}


@functools.cache
def _symbol_class() -> str:
    """Unicode "other symbols" (category So) as a regex class: spaCy's `_other_symbols`."""
    codes = [i for i in range(0x20000) if unicodedata.category(chr(i)) == "So"]
    ranges, first = [], codes[0]
    for prev, code in zip(codes, codes[1:] + [-1]):
        if code != prev + 1:
            ranges.append(re.escape(chr(first)) + ("-" + re.escape(chr(prev))
                                                   if prev > first else ""))
            first = code
    return "[" + "".join(ranges) + "]"


def _class(chars: str) -> str:
    """A regex class of `chars`, in which "a-z" stays a range."""
    return "[" + "".join("\\" + c if c in "]\\^[" else c for c in chars) + "]"


@functools.cache
def _special_cases() -> dict[str, tuple[str, ...]]:
    """spaCy's English tokenizer exceptions: chunks with a fixed split."""
    cases: dict[str, tuple[str, ...]] = {}
    for heads, clitics in _CONTRACTIONS:
        for head in heads.split():
            for clitic in clitics:
                parts = (head, *re.findall(r"n't|'[a-z]+", clitic))
                for cased in {parts, (head.title(), *parts[1:])}:
                    cases["".join(cased)] = cased
                    bare = tuple(p.replace("'", "") for p in cased)  # "dont", "Ive", "youre"
                    cases["".join(bare)] = bare
    cases.update(_OTHER_SPLITS)
    cases.update({k[0].upper() + k[1:]: (v[0][0].upper() + v[0][1:], *v[1:])
                  for k, v in _OTHER_SPLITS.items() if not k.startswith("y")})
    for hour in range(1, 13):
        for period in ("a.m.", "am", "p.m.", "pm"):
            cases[f"{hour}{period}"] = (str(hour), period)
    for orth in [*_WHOLE_TOKENS.split(), *_EMOTICONS.split(),
                 *(letter + "." for letter in "abcdefghijklmnopqrstuvwxyz")]:
        cases[orth] = (orth,)
    for unit in "cfkCFK":
        cases[f"°{unit}."] = ("°", unit, ".")
    for word in _NOT_CONTRACTIONS:
        cases.pop(word, None)
        cases.pop(word.title(), None)
    cases.update({k.replace("'", "’"): tuple(p.replace("'", "’") for p in v)
                  for k, v in cases.items() if "'" in k})
    return cases


_COUNT_BITS = 40  # per field of `Chunk.counts`: enough for any text of < 1 TB


class Chunk(NamedTuple):
    """The tokens of one whitespace-separated piece of text."""

    tokens: tuple[str, ...]
    codes: str
    """One character per token, standing for it (see `WordSplitter`)."""
    counts: int
    """Three counts in one int, so that a text's totals are one C-level sum: the words
    (tokens with a letter or digit; the others are punctuation marks and symbols), the
    characters in those words, and the tokens with a letter."""


class Words(NamedTuple):
    """The tokens of a text, as one code character each, and their counts."""

    codes: str
    num_words: int
    word_chars: int
    num_alpha_tokens: int


def _pack_counts(num_words: int, word_chars: int, num_alpha_tokens: int) -> int:
    return num_words | word_chars << _COUNT_BITS | num_alpha_tokens << 2 * _COUNT_BITS


def _unpack_counts(packed: int, n: int) -> list[int]:
    mask = (1 << _COUNT_BITS) - 1
    return [(packed >> (i * _COUNT_BITS)) & mask for i in range(n)]


class WordSplitter:
    """Split text into words and punctuation marks as spaCy's English tokenizer does.

    Each distinct token gets a code, one character, so that the tokens of a text are a string
    whose n-character substrings are its token n-grams: slicing, hashing and counting those is
    C-level work. `reserved_tokens` get the first codes, chr(0), chr(1), ..., for good. Caches
    the pieces seen; codes and cache restart past `max_cached_chunks`, so use one per step.
    """

    def __init__(self, reserved_tokens: Iterable[str] = (), max_cached_chunks: int = 200_000):
        symbols = _symbol_class()
        self.max_cached_chunks = max_cached_chunks
        self.reserved_tokens = list(dict.fromkeys(reserved_tokens))
        self.special = _special_cases()
        self.prefix = re.compile(rf"^(?:\+(?![0-9])|\.\.+|US\$|C\$|A\$|{symbols}|"
                                 rf"{_class('§%=—–' + _PUNCT + _QUOTES + _CURRENCY)})")
        self.suffix = re.compile(
            rf"(?:{_class(_PUNCT + _QUOTES)}|……|\.\.+|{symbols}|'s|'S|’s|’S|—|–|"
            rf"(?<=[0-9])\+|(?<=°[FfCcKk])\.|(?<=[0-9])(?:US\$|C\$|A\$|{_class(_CURRENCY)})|"
            rf"(?<=[0-9])(?:{_UNITS})|"
            rf"(?<={_class(_BEFORE_PERIOD_SUFFIX)})\.|"
            rf"(?<=[{_UPPER}][{_UPPER}])\.)$")
        self.infix = re.compile(
            rf"\.\.+|…|{symbols}|(?<=[0-9])[+\-*^](?=[0-9-])|"
            rf"(?<=[{_LOWER}{_QUOTES}])\.(?=[{_UPPER}{_QUOTES}])|"
            rf"(?<={_ALPHA}),(?={_ALPHA})|"
            rf"(?<=[^\W_])(?:-|–|—|--|---|——|~)(?={_ALPHA})|"
            rf"(?<=[^\W_])[:<>=/](?={_ALPHA})")
        self._restart()

    def _restart(self) -> None:
        self.chunks: dict[str, Chunk] = {}
        self.codes: dict[str, str] = {}
        self.code_chars: dict[str, int] = {}
        """Characters in the token of each code."""
        for token in self.reserved_tokens:
            self.code(token)

    def code(self, token: str) -> str:
        code = self.codes.get(token)
        if code is None:
            code = self.codes[token] = chr(len(self.codes))
            self.code_chars[code] = len(token)
        return code

    def __call__(self, text: str) -> list[str]:
        """The tokens of `text`."""
        return [token for piece in text.split()
                for token in (self.chunks.get(piece) or self.split_chunk(piece)).tokens]

    def split(self, text: str) -> Words:
        """The tokens of `text` as codes, and their counts."""
        # Past 1M tokens the codes would run out of Unicode.
        if len(self.chunks) > self.max_cached_chunks or len(self.codes) > 1_000_000:
            self._restart()
        pieces = text.split()
        # map/join/sum keep the per-piece work in C; only cache misses run Python code.
        chunks = list(map(self.chunks.get, pieces))
        if None in chunks:
            chunks = [chunk or self.split_chunk(piece) for chunk, piece in zip(chunks, pieces)]
        return Words("".join(map(itemgetter(1), chunks)),
                     *_unpack_counts(sum(map(itemgetter(2), chunks)), 3))

    def split_chunk(self, piece: str) -> Chunk:
        """The tokens of one whitespace-free piece of text, and their counts (cached)."""
        tokens = self.special.get(piece)
        if tokens is None and (piece.isalpha() or piece.isdecimal()):
            # The most common piece, and no affix or infix rule applies to it.
            chunk = Chunk((piece,), self.code(piece),
                          _pack_counts(1, len(piece), int(piece.isalpha())))
        else:
            if tokens is None:
                tokens = self._split_chunk(piece)
            words = [token for token in tokens if any(map(str.isalnum, token))]
            alpha = sum(1 for token in tokens if any(map(str.isalpha, token)))
            chunk = Chunk(tokens, "".join(map(self.code, tokens)),
                          _pack_counts(len(words), sum(map(len, words)), alpha))
        self.chunks[piece] = chunk
        return chunk

    def _split_chunk(self, chunk: str) -> tuple[str, ...]:
        """spaCy's `Tokenizer._split_affixes` then `_attach_tokens`."""
        core, last = chunk[:-1], chunk[-1]
        # The next most common shapes: a word and one punctuation mark.
        if last in ",;:!?" and core.isalpha():
            return (*self.special.get(core, (core,)), last)
        if last == "." and core.isascii() and core.isalpha():  # the suffix rules for "."
            if core[-1].islower() or core[-2:].isupper() and len(core) > 1:
                return (*self.special.get(core, (core,)), last)
            return (chunk,)
        prefixes, suffixes, core = self._peel_affixes(chunk)
        if not core:
            middle: tuple[str, ...] = ()
        elif core in self.special:
            middle = self.special[core]
        elif _URL.match(core):
            middle = (core,)
        else:
            middle = self._split_infixes(core)
        return (*prefixes, *middle, *reversed(suffixes))

    def _suffix_length(self, text: str) -> int:
        if text.endswith(".."):  # a run of periods is one suffix however long
            return len(text) - len(text.rstrip("."))
        # Every other suffix is short: search only the end (lookbehinds still see before it).
        match = self.suffix.search(text, max(0, len(text) - 8))
        return match.end() - match.start() if match else 0

    def _peel_affixes(self, text: str) -> tuple[list[str], list[str], str]:
        special, prefixes, suffixes = self.special, [], []
        last_len = -1
        while text and len(text) != last_len and text not in special:
            last_len = len(text)
            match = self.prefix.search(text)
            pre = match.end() if match else 0
            if pre and text[pre:] in special:
                return [*prefixes, text[:pre]], suffixes, text[pre:]
            suf = self._suffix_length(text[pre:])
            if suf and text[:-suf] in special:
                return prefixes, [*suffixes, text[-suf:]], text[:-suf]
            if pre and suf and pre + suf <= len(text):
                prefixes.append(text[:pre])
                suffixes.append(text[-suf:])
                text = text[pre:-suf]
            elif pre:
                prefixes.append(text[:pre])
                text = text[pre:]
            elif suf:
                suffixes.append(text[-suf:])
                text = text[:-suf]
        return prefixes, suffixes, text

    def _split_infixes(self, text: str) -> tuple[str, ...]:
        tokens, start = [], 0
        for match in self.infix.finditer(text):
            if match.start() == 0:  # spaCy ignores an infix at the very start
                continue
            if match.start() != start:
                tokens.append(text[start:match.start()])
            if match.end() != match.start():
                tokens.append(match.group())
            start = match.end()
        if start < len(text):
            tokens.append(text[start:])
        return tuple(tokens)


