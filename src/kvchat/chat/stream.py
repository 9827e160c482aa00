"""The reply to a chat: :class:`ChatStream` of :class:`ChatDelta`, or a whole :class:`ChatCompletion`.

:class:`DeltaTranslator` turns the engine's chunks into chat deltas: it parses
tool calls in the model's own format and, once the reply ends without calls,
gives its exact token ids to the generated-token memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from kvchat.chat.history import GeneratedTokenMemory
from kvchat.chat.tool_calls import StreamingToolCallParser, ToolCall, ToolCallEvent
from kvchat.engine import Chunk, Stream, Usage

ChatFinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True)
class ChatDelta:
    """One piece of an assistant message: content text, or whole tool calls.

    The last delta of a stream carries `usage` and `finish_reason` (``"tool_calls"``
    when the model called tools).
    """

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage | None = None
    finish_reason: ChatFinishReason | None = None


@dataclass(frozen=True)
class ChatCompletion:
    """A whole assistant message: content (None if it only called tools), tool calls, usage.

    `usage` is the engine's, speculative decoding's counts included
    (`draft_tokens`, `accepted_draft_tokens`, `rejected_draft_tokens`).
    """

    content: str | None
    tool_calls: tuple[ToolCall, ...]
    usage: Usage
    finish_reason: ChatFinishReason

    def to_message(self) -> dict[str, Any]:
        """The assistant message in OpenAI's shape, ready to append to the history."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return message


class DeltaTranslator:
    """Engine chunks to chat deltas: tool-call parsing (with a `parser`) and
    remembering the reply's ids in `memory`, under `namespace`."""

    def __init__(
        self, parser: StreamingToolCallParser | None, memory: GeneratedTokenMemory | None, namespace: str | None
    ) -> None:
        self._parser = parser
        self._memory = memory
        self._namespace = namespace
        self._text: list[str] = []
        self._ids: list[int] = []
        self._called = False

    def translate(self, chunk: Chunk) -> list[ChatDelta]:
        """The deltas one engine chunk makes (the last one carries usage and finish reason)."""
        self._text.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        deltas = self._events(self._parser.feed(chunk.text)) if self._parser else [ChatDelta(chunk.text)]
        if chunk.usage is not None:
            if self._parser:
                deltas += self._events(self._parser.finish())
            reason: ChatFinishReason = "tool_calls" if self._called else chunk.usage.finish_reason
            if self._memory is not None and not self._called:
                self._memory.remember("".join(self._text), self._ids, namespace=self._namespace)
            deltas.append(ChatDelta(usage=chunk.usage, finish_reason=reason))
        return [d for d in deltas if d.content or d.tool_calls or d.usage]

    def _events(self, events: list) -> list[ChatDelta]:
        out = []
        for event in events:
            if isinstance(event, ToolCallEvent):
                self._called = True
                out.append(ChatDelta(tool_calls=(event.call,)))
            else:
                out.append(ChatDelta(event.text))
        return out


_CANCELLED = ChatDelta(
    usage=Usage(
        prompt_tokens=0,
        cached_tokens=0,
        evaluated_tokens=0,
        completion_tokens=0,
        time_to_first_token=None,
        finish_reason="cancelled",
    ),
    finish_reason="cancelled",
)
"""The one delta of a reply that was stopped before it was submitted."""


class ChatStream:
    """The reply to :func:`kvchat.chat.complete`: iterate it (sync or async) for
    :class:`ChatDelta`s, or :meth:`collect` it. Leaving an async iteration early,
    or :meth:`cancel`, stops generation within one engine step.

    Without an engine `stream` (a `complete()` cancelled before it submitted),
    the reply is one delta with no tokens and finish reason ``"cancelled"``.
    """

    def __init__(self, stream: Stream | None, translator: DeltaTranslator, prompt_tokens: int) -> None:
        self._stream = stream
        self._translator = translator
        self.prompt_tokens = prompt_tokens
        """Tokens of the rendered prompt (after any truncation; 0 if never submitted)."""

    @classmethod
    def cancelled(cls) -> ChatStream:
        """A reply that ended before it was submitted: no tokens, finish reason ``"cancelled"``."""
        return cls(None, DeltaTranslator(None, None, None), 0)

    def cancel(self) -> None:
        """Stop generating; the stream ends with finish reason ``cancelled``."""
        if self._stream is not None:
            self._stream.cancel()

    def __iter__(self) -> Iterator[ChatDelta]:
        if self._stream is None:
            yield _CANCELLED
            return
        for chunk in self._stream:
            yield from self._translator.translate(chunk)

    async def __aiter__(self) -> AsyncIterator[ChatDelta]:
        if self._stream is None:
            yield _CANCELLED
            return
        async for chunk in self._stream:
            for delta in self._translator.translate(chunk):
                yield delta

    def collect(self) -> ChatCompletion:
        """Read the whole reply (blocking)."""
        return _gather(iter(self))

    async def acollect(self) -> ChatCompletion:
        """Read the whole reply from asyncio code."""
        return _gather([d async for d in self])


def _gather(deltas: Iterator[ChatDelta] | list[ChatDelta]) -> ChatCompletion:
    content: list[str] = []
    calls: list[ToolCall] = []
    last = None
    for delta in deltas:
        content.append(delta.content)
        calls.extend(delta.tool_calls)
        last = delta
    assert last is not None and last.usage is not None and last.finish_reason is not None
    text = "".join(content)
    return ChatCompletion(text if text or not calls else None, tuple(calls), last.usage, last.finish_reason)
