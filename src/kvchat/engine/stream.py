"""`Stream`: what `Engine.submit` returns; iterable from sync and async code.

The worker thread pushes chunks; the caller iterates. A stream always ends with a
chunk that carries `usage` (and so a finish reason), or with an exception raised
from the iteration: it never just stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Usage:
    """Token accounting and timing of one finished request.

    `cached_tokens` of the prompt were reused from the KV cache,
    `evaluated_tokens` were run through the model; for a request that was not
    cancelled, `prompt_tokens == cached_tokens + evaluated_tokens`.
    `completion_tokens` counts the generated tokens returned to the caller (an
    end-of-generation token is not counted). `time_to_first_token` is seconds from
    `submit` to the first sampled token (None if none was sampled).
    `draft_tokens` were proposed by speculative decoding (the caller's
    `prediction`, the request's own history, or the engine's n-gram cache) and
    verified; `accepted_draft_tokens` of them matched what the model generated
    (they are part of `completion_tokens`; the rest were discarded).
    `forced_tokens` of the completion tokens were forced by the request's grammar
    (the only tokens it allowed there) and appended without a sampling step.
    """

    prompt_tokens: int
    cached_tokens: int
    evaluated_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    finish_reason: FinishReason
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    forced_tokens: int = 0

    @property
    def rejected_draft_tokens(self) -> int:
        """Drafted tokens that did not match the output (OpenAI's `rejected_prediction_tokens`)."""
        return self.draft_tokens - self.accepted_draft_tokens


@dataclass(frozen=True)
class Chunk:
    """One step of output: a text delta and the token ids behind it.

    The last chunk of a stream has `usage` set; its text may be empty.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    usage: Usage | None = None

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why generation ended, on the last chunk; None before."""
        return None if self.usage is None else self.usage.finish_reason


@dataclass(frozen=True)
class Completion:
    """A whole stream gathered: all text, all token ids and the usage."""

    text: str
    token_ids: tuple[int, ...]
    usage: Usage


class Stream:
    """The output of one request.

    Iterate it (``for chunk in stream`` or ``async for chunk in stream``) for
    :class:`Chunk` objects, or call :meth:`collect` / :meth:`acollect`. Stopping an
    async iteration early (``break``, task cancellation) cancels the request; from
    sync code call :meth:`cancel`. A failed request raises its typed error from the
    iteration. A stream can be iterated once.
    """

    def __init__(self, request_id: int, on_cancel: Callable[[], None]) -> None:
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._items: queue.SimpleQueue[Chunk | BaseException] = queue.SimpleQueue()
        self._waker_lock = threading.Lock()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._consumed = False
        self._done = False
        self.usage: Usage | None = None
        """The final usage, once the last chunk has been read."""

    # -- producer side (the engine's worker thread) ------------------------------------

    def _push(self, item: Chunk | BaseException) -> None:
        self._items.put(item)
        with self._waker_lock:
            waker = self._waker
        if waker is not None:
            loop, event = waker
            with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody to wake
                loop.call_soon_threadsafe(event.set)

    # -- consumer side -------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the engine to stop this request; it ends within one step with
        finish reason ``cancelled`` (no effect once finished)."""
        if not self._done:
            self._on_cancel()

    @property
    def done(self) -> bool:
        """True once the final chunk or error has been read."""
        return self._done

    def _take(self, item: Chunk | BaseException) -> Chunk:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.usage is not None:
            self._done = True
            self.usage = item.usage
        return item

    def _claim(self) -> None:
        if self._consumed:
            raise RuntimeError("a stream can be iterated only once")
        self._consumed = True

    def __iter__(self) -> Iterator[Chunk]:
        self._claim()
        try:
            while not self._done:
                yield self._take(self._items.get())
        finally:
            if not self._done:
                self.cancel()

    async def _aiter(self) -> AsyncIterator[Chunk]:
        event = asyncio.Event()
        with self._waker_lock:
            self._waker = (asyncio.get_running_loop(), event)
        try:
            while not self._done:
                try:
                    item = self._items.get_nowait()
                except queue.Empty:
                    event.clear()
                    try:  # an item may have landed between the first look and clear()
                        item = self._items.get_nowait()
                    except queue.Empty:
                        await event.wait()
                        continue
                yield self._take(item)
        finally:
            with self._waker_lock:
                self._waker = None
            if not self._done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        self._claim()
        return self._aiter()

    def collect(self) -> Completion:
        """Read the whole stream (blocking) and return text, token ids and usage."""
        return _gather(iter(self))

    async def acollect(self) -> Completion:
        """Read the whole stream from asyncio code."""
        texts: list[str] = []
        tokens: list[int] = []
        async for chunk in self:
            texts.append(chunk.text)
            tokens.extend(chunk.token_ids)
        assert self.usage is not None  # the loop only ends on the final chunk
        return Completion("".join(texts), tuple(tokens), self.usage)

    def text(self) -> str:
        """Read the whole stream (blocking) and return only its text."""
        return self.collect().text


def _gather(chunks: Iterator[Chunk]) -> Completion:
    texts: list[str] = []
    tokens: list[int] = []
    usage: Usage | None = None
    for chunk in chunks:
        texts.append(chunk.text)
        tokens.extend(chunk.token_ids)
        usage = chunk.usage or usage
    assert usage is not None  # iteration only ends on the final chunk or raises
    return Completion("".join(texts), tuple(tokens), usage)
