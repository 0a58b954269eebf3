"""Token ids to text while they stream: incremental detokenizing and text stop sequences."""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """Turns new token ids into new text, never splitting a multi-byte character and never
    emitting special tokens.

    Each new piece is the decoding of a short window of recent ids minus that of the window
    without the newest ones (as vLLM and TGI do): decoding ids one by one would lose the spaces
    and merges some tokenizers apply between tokens, and decoding everything each step costs
    O(n^2). Text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until it completes.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add one id; return the text that is now complete (possibly "")."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back (at the end of generation), even if incomplete."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :] if len(text) > len(before) else ""


class StopMatcher:
    """Finds OpenAI text stop sequences in generated text.

    `feed` returns the text that may be sent now and whether a stop sequence was hit (the text
    is then cut just before it). Without a hit it holds back the longest tail of the text that
    begins a stop sequence, so a streamed answer never shows text that a later token turns into
    a stop.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.hit = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.hit:
            return "", True
        start = max(0, len(self.text) - self.hold)  # a stop may begin in text already seen
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text, self.hit = self.text[: min(found)], True
            return self._release(len(self.text)), True
        return self._release(len(self.text) - self._held()), False

    def _held(self) -> int:
        """Length of the longest tail of the text that is the start of a stop sequence."""
        for k in range(min(self.hold, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """Everything not sent yet (generation ended without a stop)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out
