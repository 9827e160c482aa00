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
    """Incremental decoder of one generation's bytes, with stop-string detection."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded text not yet released
        self._stopped = False

    def push(self, data: bytes) -> TextDelta:
        """Add the bytes of one token; return what can be released now."""
        if self._stopped:
            return TextDelta("", stopped=True)
        self._held += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> TextDelta:
        """End of generation: release everything still held (incomplete bytes become U+FFFD)."""
        if self._stopped:
            return TextDelta("", stopped=True)
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> TextDelta:
        if not self._stop:
            text, self._held = self._held, ""
            return TextDelta(text)
        cut = _first_stop_index(self._held, self._stop)
        if cut is not None:
            text = self._held[:cut]
            self._held = ""
            self._stopped = True
            return TextDelta(text, stopped=True)
        keep = 0 if final else _longest_partial_stop(self._held, self._stop)
        split = len(self._held) - keep
        text, self._held = self._held[:split], self._held[split:]
        return TextDelta(text)


def _first_stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _longest_partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
