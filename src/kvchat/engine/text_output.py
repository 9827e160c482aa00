"""`TextOutput`: turns generated token bytes into safe text deltas.

Two things make streaming text harder than joining token pieces:

- one UTF-8 character may be split across tokens (emoji, CJK), so bytes are held
  until the character is complete;
- a stop string may arrive split across tokens, so text that could still turn
  out to be the start of a stop string is held back until it cannot.

Pure logic, no llama.cpp: tested on its own.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TextDelta:
    """Text that is safe to show now, and whether a stop string ended the output."""

    text: str
    stopped: bool = False


class TextOutput:
    """Incremental decoder of one generation's bytes, with stop-string detection.

    Each stop string has a Knuth-Morris-Pratt matcher that reads every character
    once, so a token's text costs work linear in its length and the number of stop
    strings, however long they are: no text is scanned twice. The output ends before
    the first stop string to end in the text (of two ending on the same character,
    before the longer); that does not depend on how the text was split into tokens.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(StopMatcher(s) for s in stop if s)
        self._held = ""  # decoded text not yet released
        self._stopped = False

    def push(self, data: bytes) -> TextDelta:
        """Add the bytes of one token; return what can be released now."""
        if self._stopped:
            return TextDelta("", stopped=True)
        return self._release(self._decoder.decode(data), final=False)

    def finish(self) -> TextDelta:
        """End of generation: release everything still held (incomplete bytes become U+FFFD)."""
        if self._stopped:
            return TextDelta("", stopped=True)
        return self._release(self._decoder.decode(b"", final=True), final=True)

    def _release(self, new: str, *, final: bool) -> TextDelta:
        if not self._stops:
            return TextDelta(new)
        start = len(self._held)
        self._held += new
        for index in range(start, len(self._held)):
            char = self._held[index]
            ended = [len(stop.text) for stop in self._stops if stop.feed(char)]
            if ended:
                text = self._held[: index + 1 - max(ended)]
                self._held = ""
                self._stopped = True
                return TextDelta(text, stopped=True)
        keep = 0 if final else max(stop.matched for stop in self._stops)
        split = len(self._held) - keep
        text, self._held = self._held[:split], self._held[split:]
        return TextDelta(text)


class StopMatcher:
    """One stop string's Knuth-Morris-Pratt state: how much of it the text ends with."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.matched = 0
        """Length of the longest prefix of the stop string that the text read so far ends with."""
        self._fallback = _prefix_function(text)

    def feed(self, char: str) -> bool:
        """Read one character; True if the stop string now ends the text."""
        matched = self.matched
        while matched and self.text[matched] != char:
            matched = self._fallback[matched - 1]
        if self.text[matched] == char:
            matched += 1
        if matched == len(self.text):
            self.matched = self._fallback[matched - 1]
            return True
        self.matched = matched
        return False


def _prefix_function(text: str) -> list[int]:
    """For each prefix of `text`, the length of its longest proper suffix that is also a prefix."""
    fallback = [0] * len(text)
    matched = 0
    for index in range(1, len(text)):
        while matched and text[index] != text[matched]:
            matched = fallback[matched - 1]
        if text[index] == text[matched]:
            matched += 1
        fallback[index] = matched
    return fallback
