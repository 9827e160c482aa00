"""`ChatSession`: a message-level chat you can edit, with stateful speed.

The session only keeps messages. Every call renders the whole history through
:func:`kvchat.chat.complete`, and the engine's prefix cache finds the longest
resident prefix, so each operation costs only the tokens after the first
change: an edit of message 1 re-evaluates from message 1 on, `regenerate`
evaluates only the generation prompt's last token, `undo` then `send` only the
new message. No second cache, no session-held KV: nothing breaks when the
history is changed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvchat.atomic_file import write_atomically
from kvchat.chat.complete import ChatCompletion, ChatDelta, ChatStream, OverflowPolicy, complete
from kvchat.engine import Engine, SamplingParams
from kvchat.errors import InvalidRequestError

_FORMAT = "kvchat-chat-session/1"


class SessionReply:
    """The stream of one `send` or `regenerate`; the reply joins the history when
    the stream ends (a cancelled reply keeps what was generated)."""

    def __init__(self, session: ChatSession, stream: ChatStream) -> None:
        self._session = session
        self._stream = stream
        self._content: list[str] = []
        self._calls: list[Any] = []
        self.completion: ChatCompletion | None = None
        """The whole reply, once the stream has ended."""

    def _see(self, delta: ChatDelta) -> ChatDelta:
        self._content.append(delta.content)
        self._calls.extend(delta.tool_calls)
        if delta.usage is not None and delta.finish_reason is not None:
            text = "".join(self._content)
            self.completion = ChatCompletion(
                text if text or not self._calls else None, tuple(self._calls), delta.usage, delta.finish_reason
            )
            self._session.messages.append(self.completion.to_message())
        return delta

    def cancel(self) -> None:
        """Stop generating."""
        self._stream.cancel()

    def __iter__(self) -> Iterator[ChatDelta]:
        for delta in self._stream:
            yield self._see(delta)

    async def __aiter__(self) -> AsyncIterator[ChatDelta]:
        async for delta in self._stream:
            yield self._see(delta)

    def collect(self) -> ChatCompletion:
        """Read the whole reply (blocking)."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    def text(self) -> str:
        """Read the whole reply and return its text."""
        return self.collect().content or ""


class ChatSession:
    """A chat history with edit, delete, regenerate and undo, on one engine.

    `history` is a copy of the messages (OpenAI shape). Options given here
    (`system`, `sampling`, `tools`, `overflow`, `cache_key`) apply to every call.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        system: str | None = None,
        sampling: SamplingParams | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        overflow: OverflowPolicy = "error",
        cache_key: str | None = None,
        messages: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.engine = engine
        self.sampling = sampling or SamplingParams()
        self.tools = list(tools) if tools else None
        self.overflow = overflow
        self.cache_key = cache_key
        self.messages: list[dict[str, Any]] = [dict(m) for m in messages]
        if system is not None:
            self.messages.insert(0, {"role": "system", "content": system})

    @property
    def history(self) -> list[dict[str, Any]]:
        """A copy of the messages."""
        return copy.deepcopy(self.messages)

    def send(self, text: str, *, sampling: SamplingParams | None = None, prediction: str | None = None) -> SessionReply:
        """Add a user message and stream the assistant's reply.

        `prediction`: the reply's text as you expect it (see :func:`complete`):
        drafts for speculative decoding, which make a reply that repeats it faster.
        """
        self.messages.append({"role": "user", "content": text})
        try:
            return self._reply(sampling, prediction)
        except BaseException:
            self.messages.pop()
            raise

    def regenerate(self, *, sampling: SamplingParams | None = None, prediction: str | None = None) -> SessionReply:
        """Replace the last assistant reply with a new one (`prediction` as in :meth:`send`)."""
        if not self.messages or self.messages[-1].get("role") != "assistant":
            raise InvalidRequestError("there is no assistant reply to regenerate", field="messages")
        removed = self.messages.pop()
        try:
            return self._reply(sampling, prediction)
        except BaseException:
            self.messages.append(removed)
            raise

    def respond(self, *, sampling: SamplingParams | None = None, prediction: str | None = None) -> SessionReply:
        """Stream an assistant reply to the history as it stands (after an edit, say;
        `prediction` as in :meth:`send`)."""
        return self._reply(sampling, prediction)

    def edit(self, index: int, text: str) -> None:
        """Replace the text of message `index` (later messages stay; the next call
        re-evaluates from this message on)."""
        self._message(index)["content"] = text

    def delete(self, index: int) -> None:
        """Remove message `index`."""
        self._message(index)
        del self.messages[index]

    def undo(self) -> None:
        """Remove the last exchange: the last user message and everything after it."""
        last_user = max((i for i, m in enumerate(self.messages) if m.get("role") == "user"), default=None)
        if last_user is None:
            raise InvalidRequestError("there is nothing to undo", field="messages")
        del self.messages[last_user:]

    def fork(self) -> ChatSession:
        """An independent copy of this session (the cached prefix is shared)."""
        return ChatSession(
            self.engine,
            sampling=self.sampling,
            tools=self.tools,
            overflow=self.overflow,
            cache_key=self.cache_key,
            messages=self.history,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the messages to a JSON file atomically."""
        data = json.dumps({"format": _FORMAT, "messages": self.messages}, ensure_ascii=False, indent=1)
        write_atomically(path, data.encode("utf-8"))

    @classmethod
    def load(cls, engine: Engine, path: str | os.PathLike[str], **options: Any) -> ChatSession:
        """A session with the messages saved by :meth:`save` (the KV comes back from
        the cache, or is recomputed once)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT or not isinstance(data.get("messages"), list):
                raise ValueError("not a kvchat chat session file")
        except (OSError, ValueError, AttributeError) as exc:
            raise InvalidRequestError(f"cannot load a chat session from {path}: {exc}", field="path") from exc
        return cls(engine, messages=data["messages"], **options)

    def _message(self, index: int) -> dict[str, Any]:
        try:
            return self.messages[index]
        except (IndexError, TypeError) as exc:
            raise InvalidRequestError(f"no message at index {index!r}", field="index") from exc

    def _reply(self, sampling: SamplingParams | None, prediction: str | None) -> SessionReply:
        stream = complete(
            self.engine,
            self.messages,
            tools=self.tools,
            sampling=sampling or self.sampling,
            overflow=self.overflow,
            cache_key=self.cache_key,
            prediction=prediction,
        )
        return SessionReply(self, stream)
