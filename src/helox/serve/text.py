"""A completion's text as its tokens arrive: correct for characters whose bytes are split across
tokens, and cut before the first stop string without ever streaming a piece of it."""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
"""What decoding writes for an incomplete UTF-8 sequence (a character's first bytes)."""


class TextStream:
    """Decode the whole completion after each token and emit the new suffix (tokenizers decode
    context-free for byte-level BPE, so the text so far is a prefix of the text to come),
    holding back a trailing U+FFFD until the character's other bytes arrive, and any tail
    that could still be the start of a stop string until it is decided."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.token_ids: list[int] = []
        self.sent_chars = 0
        """Characters of the text emitted so far."""
        self.stopped = False
        """A stop string was found: the text is final and ends before it."""
        self.text = ""
        """The text emitted so far (the final text once finished)."""

    def push(self, token_id: int) -> str:
        """Add a token; the text that is now certain (maybe ""); sets `stopped` when the
        completion reached a stop string."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids).rstrip(REPLACEMENT)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text, max(cut, self.sent_chars))
        return self._emit(text, max(len(text) - self._undecided_tail(text), self.sent_chars))

    def finish(self) -> str:
        """The rest once the completion ended for another reason (length, stop token):
        everything held back, a trailing U+FFFD included."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.token_ids), None)

    def _emit(self, text: str, end: int | None) -> str:
        delta = text[self.sent_chars:end]
        self.text += delta
        self.sent_chars += len(delta)
        return delta

    def _first_stop(self, text: str) -> int | None:
        """Where the first stop string starts (searched from just before the emitted text:
        the held-back tail is where one can begin)."""
        start = max(0, self.sent_chars - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits, default=None)

    def _undecided_tail(self, text: str) -> int:
        """Length of the longest end of `text` that a stop string starts with."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
