"""Where a generating request's next tokens may already be written: the sources of
speculative drafts.

- :class:`NgramIndex`: the n-grams of a token list and what followed them. Over
  the request's own tokens it is prompt lookup (an answer that repeats part of the
  conversation, as a code edit does); over the caller's `prediction` it follows
  OpenAI's predicted outputs.
- :class:`DraftIndexes`: a request's own indexes (prediction, prompt lookup), built by
  :func:`index_request` on the caller's thread before it is queued.
- :class:`NgramCache`: continuations of earlier replies, shared by the requests of
  one cache namespace (never across namespaces), bounded in entries.

What a draft is worth, and how long it should be, is decided in
:mod:`kvchat.engine.speculation`.
"""

from __future__ import annotations

import bisect
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

LOOKUP_WINDOW = 8_192
"""Prompt lookup searches at most this many of a request's latest tokens."""

CACHE_TOKENS_PER_REPLY = 2_048
"""Most tokens of one finished reply that the n-gram cache indexes (its last ones):
indexing runs on the engine thread, in time in proportion to the tokens (measured in
docs/reliability.md), so one step never pays for a whole long reply."""


@dataclass(frozen=True)
class Draft:
    """Tokens proposed to follow a request's last token, and where they came from.

    `source` names the source (``"prediction"``, ``"lookup"``, ``"ngram_cache"``);
    `start` is the draft's position in the source's token list (for sources that
    follow a text along, so the next draft continues where this one ended).
    The last `padding` tokens no source proposed: they only lengthen the call to
    where llama.cpp's tiled attention makes it cheaper (see `speculation.padded_rows`).
    """

    tokens: tuple[int, ...]
    source: str
    start: int = 0
    padding: int = 0


class NgramIndex:
    """The n-grams (of `min_n` to `max_n` tokens) of a growing token list, each
    with the positions right after its occurrences.

    :meth:`continuation` finds the longest n-gram that ends `context` and returns
    the tokens that followed one of its occurrences: the first at or after
    `after` (a text being followed along), or else the latest.
    """

    def __init__(self, tokens: Sequence[int] = (), *, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("need 1 <= min_n <= max_n")
        self.min_n = min_n
        self.max_n = max_n
        self.tokens: list[int] = []
        self._follows: dict[tuple[int, ...], list[int]] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens; each n-gram that now has a token after it is indexed."""
        own = self.tokens
        follows = self._follows
        for token in tokens:
            own.append(token)
            end = len(own) - 1  # the n-grams ending here are followed by `token`
            for n in range(self.min_n, min(self.max_n, end) + 1):
                follows.setdefault(tuple(own[end - n : end]), []).append(end)

    def continuation(self, context: Sequence[int], limit: int, *, after: int = 0) -> tuple[int, list[int]]:
        """``(start, tokens)``: up to `limit` tokens that followed the longest indexed
        n-gram ending `context`, from position `start`; ``(0, [])`` if none does."""
        if limit < 1:
            return 0, []
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            ends = self._follows.get(tuple(context[len(context) - n :]))
            if ends:
                i = bisect.bisect_left(ends, after)
                start = ends[i] if i < len(ends) else ends[-1]
                return start, self.tokens[start : start + limit]
        return 0, []


@dataclass
class DraftIndexes:
    """A request's own draft sources: its `prediction` and its tokens (prompt lookup),
    indexed by :func:`index_request` on the caller's thread before the request is
    queued, so the engine thread only extends them by each step's tokens."""

    prediction: NgramIndex | None
    lookup: NgramIndex
    lookup_indexed: int
    """How many of the request's tokens `lookup` holds (it indexes the latest `LOOKUP_WINDOW`)."""


def index_request(prompt: Sequence[int], prediction: Sequence[int]) -> DraftIndexes:
    """Index a request's prompt (its latest `LOOKUP_WINDOW` tokens) and prediction:
    work in proportion to their lengths, done before the request is queued."""
    start = max(0, len(prompt) - LOOKUP_WINDOW)
    return DraftIndexes(
        prediction=NgramIndex(prediction, min_n=1, max_n=4) if prediction else None,
        lookup=NgramIndex(prompt[start:], min_n=2, max_n=4),
        lookup_indexed=len(prompt),
    )


class NgramCache:
    """Continuations of earlier replies, keyed by the `n` tokens before them and by
    cache namespace, at most `max_entries` in all (least recently used dropped).

    A request's accepted output is added when it finishes (:meth:`add`); a
    generating request of the same namespace looks its last `n` tokens up
    (:meth:`continuation`). Namespaces never see each other's entries.
    """

    def __init__(self, max_entries: int, *, n: int = 3, continuation_length: int = 16) -> None:
        self.max_entries = max_entries
        self.n = n
        self.continuation_length = continuation_length
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], tuple[int, ...]] = OrderedDict()
        self.bytes = 0
        """Approximate bytes held by the entries (keys, values and the dict's slots)."""

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, namespace: str | None, tokens: Sequence[int]) -> None:
        """Index the n-grams of `tokens` (the last `CACHE_TOKENS_PER_REPLY` of them) with
        the tokens that follow each."""
        if self.max_entries == 0:
            return
        n, length = self.n, self.continuation_length
        tokens = list(tokens[-(CACHE_TOKENS_PER_REPLY + n) :])
        for end in range(n, len(tokens)):
            key = (namespace, tuple(tokens[end - n : end]))
            value = tuple(tokens[end : end + length])
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= _entry_bytes(key, old)
            self._entries[key] = value
            self.bytes += _entry_bytes(key, value)
        while len(self._entries) > self.max_entries:
            key, value = self._entries.popitem(last=False)
            self.bytes -= _entry_bytes(key, value)

    def continuation(self, namespace: str | None, context: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the last `n` tokens of `context` in an
        earlier reply of `namespace` ([] if none did)."""
        if len(context) < self.n or limit < 1:
            return []
        key = (namespace, tuple(context[len(context) - self.n :]))
        value = self._entries.get(key)
        if value is None:
            return []
        self._entries.move_to_end(key)
        return list(value[:limit])


def _entry_bytes(key: tuple[str | None, tuple[int, ...]], value: tuple[int, ...]) -> int:
    # The token ints are shared with the lists they were sliced from; count the
    # containers and a dict slot (about 100 bytes in an OrderedDict).
    return sys.getsizeof(key) + sys.getsizeof(key[1]) + sys.getsizeof(value) + 100
