r"""English word splitting compatible with spaCy's tokenizer, fast through a chunk cache.

datatrove splits English words with spaCy's tokenizer (`spacy.blank("en")`), and the Gopher
ratios are per token, punctuation marks included, so how text is cut decides close calls:
"madam;--you" is one spaCy token (a `\w+|[^\w\s]` regex makes four), and with a regex 6% of
the first 2,000 corpus documents change decision. spaCy is not a dependency and tokenizes ~60
documents/s, so `WordSplitter` re-implements its algorithm for one whitespace-separated chunk
(special cases, then prefixes/suffixes peeled off, then infixes split) with its English rules
(spaCy 3.8, MIT licence; letter case of the Latin script only), and caches chunks: text repeats
its chunks, so most are dictionary hits. A chunk seen for the first time mostly has a common
shape (a word with punctuation around it), which `_split_fast` cuts with character look-ups
instead of the regex rules; the tests check it against them (`_split_full`).
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
    """Unicode "other symbols" (category So) as a regex: spaCy's `_other_symbols`.

    One class for the Basic Multilingual Plane and one, behind a one-range guard, for the
    planes above: `re` looks a BMP character up in a bitmap, but walks a class's ranges above
    the BMP one by one, and with those in the same class every character the affix and infix
    rules test (most are not symbols) cost ~100 range comparisons.
    """
    codes = [i for i in range(0x20000) if unicodedata.category(chr(i)) == "So"]

    def ranges(codes: list[int]) -> str:
        out, first = [], codes[0]
        for prev, code in zip(codes, codes[1:] + [-1]):
            if code != prev + 1:
                out.append(re.escape(chr(first)) + ("-" + re.escape(chr(prev))
                                                    if prev > first else ""))
                first = code
        return "".join(out)

    bmp = [code for code in codes if code < 0x10000]
    above = [code for code in codes if code >= 0x10000]
    return f"(?:[{ranges(bmp)}]|(?=[\\U00010000-\\U0010ffff])[{ranges(above)}])"


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


# Characters for the fast path (`WordSplitter._split_fast`), each a whole affix wherever it is:
# the prefix rule cuts exactly one `_LEAD` character off the start of a text whatever follows it
# (the prefixes longer than one character start with "+", "." or a letter), and the suffix rule
# one `_TRAIL` character off its end whatever precedes it ("…" is left out: "……" is a suffix).
_LEAD = frozenset("§%=—–$£€¥" + _PUNCT + _QUOTES)
_TRAIL = frozenset(_PUNCT + _QUOTES) - {"…"}
_LOWER_CHARS = frozenset(map(chr, [*range(ord("a"), ord("z") + 1), *range(0xDF, 0xF7),
                                   *range(0xF8, 0x100)]))
_UPPER_CHARS = frozenset(map(chr, [*range(ord("A"), ord("Z") + 1), *range(0xC0, 0xD7),
                                   *range(0xD8, 0xDF)]))
_BEFORE_PERIOD_CHARS = _LOWER_CHARS | frozenset("0123456789%²+(?:|-" + _PUNCT + _QUOTES)
_POSSESSIVES = frozenset(["'s", "'S", "’s", "’S"])
# The ASCII characters some infix rule needs (no ASCII character is a symbol, category So).
_ASCII_INFIX_CHARS = frozenset(".+-*^,~:<>=/")
_DIGITS = frozenset("0123456789")
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
        self.token_info: dict[str, tuple[str, int]] = {}
        """The code and the packed counts (see `Chunk.counts`) of each token."""
        for token in self.reserved_tokens:
            self.code(token)

    def code(self, token: str) -> str:
        code = self.codes.get(token)
        if code is None:
            code = self.codes[token] = chr(len(self.codes))
            self.code_chars[code] = len(token)
        return code

    def _token_info(self, token: str) -> tuple[str, int]:
        info = self.token_info.get(token)
        if info is None:
            is_word = any(map(str.isalnum, token))
            info = self.token_info[token] = (self.code(token), _pack_counts(
                is_word, len(token) if is_word else 0, any(map(str.isalpha, token))))
        return info

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
        get = self.chunks.get
        chunks = list(map(get, pieces))
        if None in chunks:  # look again before splitting: a piece may repeat in the text
            chunks = [chunk or get(piece) or self.split_chunk(piece)
                      for chunk, piece in zip(chunks, pieces)]
        return Words("".join(map(itemgetter(1), chunks)),
                     *_unpack_counts(sum(map(itemgetter(2), chunks)), 3))

    def split_chunk(self, piece: str) -> Chunk:
        """The tokens of one whitespace-free piece of text, and their counts (cached)."""
        tokens = self._split_fast(piece) or self._split_full(piece)
        if len(tokens) == 1:
            code, counts = self.token_info.get(tokens[0]) or self._token_info(tokens[0])
            chunk = Chunk(tokens, code, counts)
        else:
            get = self.token_info.get
            infos = [get(token) or self._token_info(token) for token in tokens]
            chunk = Chunk(tokens, "".join([info[0] for info in infos]),
                          sum([info[1] for info in infos]))
        self.chunks[piece] = chunk
        return chunk

    def _split_fast(self, piece: str) -> tuple[str, ...] | None:
        """`_split_full(piece)` with affixes cut by character look-ups, or None if unsure.

        Handles a word with single-character prefixes from `_LEAD` before it and suffixes
        after it: `_TRAIL` characters, possessives ("'s") and periods where the suffix rule
        splits them. Each of these affixes is then one cut wherever it is; the word starts
        with a letter or digit and gets no affix (checked with the regexes, or evident for
        letters only and digits only), so `_peel_affixes` reduces to the special-case
        look-ups it makes between cuts, which this repeats in the same order.
        """
        special = self.special
        tokens = special.get(piece)
        if tokens is not None:
            return tokens
        if piece.isalpha() or piece.isdecimal():
            return (piece,)
        core, last = piece[:-1], piece[-1]
        # The next most common shapes: a word and one punctuation mark.
        if last in ",;:!?" and core.isalpha():
            return (*special.get(core, (core,)), last)
        if last == "." and core.isascii() and core.isalpha():  # the suffix rules for "."
            if core[-1].islower() or core[-2:].isupper() and len(core) > 1:
                return (*special.get(core, (core,)), last)
            return (piece,)
        n, start = len(piece), 0
        while start < n and piece[start] in _LEAD:
            start += 1
        cuts = [n]  # ends of the text as the suffixes come off, outermost first
        end = n
        while end > start + 1:  # leave at least one character to the word
            last = piece[end - 1]
            if last in _TRAIL:
                end -= 1
            elif last == ".":  # the suffix rule's lookbehinds: `_BEFORE_PERIOD_SUFFIX`, "AB."
                before = piece[end - 2]
                if not (before in _BEFORE_PERIOD_CHARS or before in _UPPER_CHARS
                        and end - 3 >= start and piece[end - 3] in _UPPER_CHARS):
                    return None
                end -= 1
            elif piece[end - 2:end] in _POSSESSIVES and end - 2 > start:
                end -= 2
            else:
                break
            cuts.append(end)
        word = piece[start:end]
        if start and piece[start - 1:end] in _POSSESSIVES:  # "'s" is a suffix after all
            return None
        plain = word.isalpha() or word.isdecimal()
        # A word starting with a letter or digit gets the same affixes alone as after prefixes.
        if not plain and (not word[:1].isalnum() or self.prefix.match(word) or not (
                # Ending with a letter, only "'s" or a unit after a digit is a suffix.
                word[-1].isalpha() and word[-2:] not in _POSSESSIVES
                and _DIGITS.isdisjoint(word[-5:])) and self._suffix_length(word)):
            return None
        # `_peel_affixes`: text = piece[pre:cuts[suf]] after `pre` prefixes and `suf` suffixes.
        pre = suf = 0
        last_suf = len(cuts) - 1
        while True:
            if piece[pre:cuts[suf]] in special:
                break
            if pre < start and piece[pre + 1:cuts[suf]] in special:
                pre += 1
                break
            if suf < last_suf and piece[pre:cuts[suf + 1]] in special:
                suf += 1
                break
            if pre == start and suf == last_suf:
                break
            pre += pre < start
            suf += suf < last_suf
        core = piece[pre:cuts[suf]]
        middle = special.get(core)
        if middle is None:  # `_split_full`'s rules, skipped where they cannot apply
            if plain or core.isascii() and _ASCII_INFIX_CHARS.isdisjoint(core):
                middle = (core,)  # no infix, and not a URL (which needs a ".")
            elif "." in core and _URL.match(core):
                middle = (core,)
            else:
                middle = self._split_infixes(core)
        return (*piece[:pre], *middle,
                *[piece[cuts[i + 1]:cuts[i]] for i in range(suf - 1, -1, -1)])

    def _split_full(self, chunk: str) -> tuple[str, ...]:
        """spaCy's `Tokenizer._split_affixes` then `_attach_tokens`."""
        if chunk in self.special:
            return self.special[chunk]
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


