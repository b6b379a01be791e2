"""Token ids -> text while generating: incremental detokenization and stop strings.

Detokenization follows the prefix/read offset scheme (as in vLLM/TGI): decode a short window
that ends at the newest token and emit only what it adds beyond the window without that token,
and wait while the text ends in U+FFFD (a multi-byte character split across tokens). The
concatenated pieces equal `tokenizer.decode(all_tokens, skip_special_tokens=True)`.

Stop strings: text that could still turn into a stop string is held back, so a client never
receives part of one; when one appears the text is cut before it.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """The text that `token` completes (possibly empty)."""
        self.tokens.append(token)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return text[len(prefix) :]


class StopStringFilter:
    """Accumulates generated text; `push` returns what is safe to send and whether a stop string hit."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0

    def push(self, piece: str) -> tuple[str, bool]:
        before = len(self.text)
        self.text += piece
        if self.stops:
            start = max(0, before - self.longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self._held_back()), False

    def finish(self, piece: str = "") -> str:
        self.text += piece
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for n in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _take(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out
