"""`StopScanner`: the first of a request's stop sequences in a reply's streamed text.

The Messages API reports which stop sequence ended a reply (``stop_sequence``),
which the engine's stop strings do not tell; so its route matches them in the
text itself (see :mod:`kvchat.server.routes.messages`), with the same rule as the
engine's (:class:`kvchat.engine.text_output.TextOutput`): the reply ends before the
first sequence to end in the text, and of two that end on the same character,
before the longer.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvchat.engine.text_output import StopMatcher

__all__ = ["StopScanner"]


class StopScanner:
    """Finds the first of some stop sequences in a reply's text, streamed piece by piece.

    :meth:`feed` returns the text that can be shown now: text that may be the
    start of a stop sequence is held until the next piece tells. Once a sequence
    ends in the text, `matched` is that sequence, the text before it is the last
    returned, and the rest is dropped; of two that end on the same character, the
    longer one (which starts earlier) counts, as in the engine's stop strings.
    Each sequence has a Knuth-Morris-Pratt matcher that reads every character
    once: the work is linear in the text and the number of sequences.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._matchers = [StopMatcher(stop) for stop in stops if stop]
        self._held = ""
        self.matched: str | None = None
        """The stop sequence that ended the text (None until one does)."""

    def feed(self, text: str) -> str:
        """Read the next piece of text; return what can be shown now."""
        if self.matched is not None:
            return ""
        if not self._matchers:
            return text
        start = len(self._held)
        self._held += text
        for index in range(start, len(self._held)):
            char = self._held[index]
            ended = [matcher.text for matcher in self._matchers if matcher.feed(char)]
            if ended:
                self.matched = max(ended, key=len)
                shown = self._held[: index + 1 - len(self.matched)]
                self._held = ""
                return shown
        keep = max(matcher.matched for matcher in self._matchers)
        split = len(self._held) - keep
        shown, self._held = self._held[:split], self._held[split:]
        return shown

    def flush(self) -> str:
        """The text held back; partial matches are forgotten (the text is interrupted,
        by a tool call, or has ended)."""
        shown, self._held = self._held, ""
        for matcher in self._matchers:
            matcher.matched = 0
        return shown
