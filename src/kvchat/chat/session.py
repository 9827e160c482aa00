"""`ChatSession`: a message-level chat you can edit, with stateful speed.

The session only keeps messages. Every call renders the whole history through
its chat runtime (:meth:`kvchat.chat.ChatRuntime.complete`), and the engine's
prefix cache finds the longest resident prefix, so each operation costs only
the tokens after the first change: an edit of message 1 re-evaluates from message 1 on, `regenerate`
evaluates only the generation prompt's last token, `undo` then `send` only the
new message. No second cache, no session-held KV: nothing breaks when the
history is changed.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvchat.atomic_file import write_atomically
from kvchat.chat.fit import OverflowPolicy
from kvchat.chat.runtime import ChatRuntime, runtime_for
from kvchat.chat.stream import ChatCompletion, ChatDelta, ChatStream
from kvchat.engine import Engine, SamplingParams
from kvchat.errors import InvalidRequestError

_FORMAT = "kvchat-chat-session/1"

MAX_SESSION_FILE_BYTES = 16 * 1024 * 1024
"""Largest chat session file :meth:`ChatSession.load` reads (a long chat is well under 1 MiB)."""

MAX_SESSION_FILE_DEPTH = 32
"""Deepest nesting of lists and objects in a chat session file (a message with tool calls needs 6)."""


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
    `chat_runtime` (a :class:`ChatRuntime` on `engine`; default: the engine's
    shared one) holds the chat tokenizer and generated-token memory the session
    uses; its forks share it.
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
        chat_runtime: ChatRuntime | None = None,
    ) -> None:
        self.engine = engine
        self.chat_runtime = runtime_for(engine, chat_runtime)
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

        `prediction`: the reply's text as you expect it (see :meth:`ChatRuntime.complete`):
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
            chat_runtime=self.chat_runtime,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the messages to a JSON file atomically: it appears whole or not at
        all, and a file already at `path` is replaced only by a whole new one.

        A `path` that cannot be written (a directory, a folder without write
        permission, a full disk) raises `InvalidRequestError` (field ``path``)
        and leaves no file, no temporary file and the session unchanged.
        """
        target = Path(path)
        if target.is_dir():
            raise InvalidRequestError(f"cannot save the chat to {path}: it is a directory", field="path")
        data = json.dumps({"format": _FORMAT, "messages": self.messages}, ensure_ascii=False, indent=1)
        try:
            write_atomically(target, data.encode("utf-8"))
        except OSError as exc:
            raise InvalidRequestError(f"cannot save the chat to {path}: {_reason(exc)}", field="path") from exc

    @classmethod
    def load(
        cls,
        engine: Engine,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = MAX_SESSION_FILE_BYTES,
        **options: Any,
    ) -> ChatSession:
        """A session with the messages saved by :meth:`save` (the KV comes back from
        the cache, or is recomputed once); `options` as for the constructor.

        A file that is missing, a directory or not a regular file, larger than
        `max_bytes`, not UTF-8 JSON, nested deeper than
        :data:`MAX_SESSION_FILE_DEPTH`, or not a chat session (an object with
        this format's name and a list of messages, each an object with a string
        ``role`` and a string, null or list ``content``) raises
        `InvalidRequestError` (field ``path``) saying which; nothing else changes.
        """
        return cls(engine, messages=_read_session_file(path, max_bytes), **options)

    def _message(self, index: int) -> dict[str, Any]:
        try:
            return self.messages[index]
        except (IndexError, TypeError) as exc:
            raise InvalidRequestError(f"no message at index {index!r}", field="index") from exc

    def _reply(self, sampling: SamplingParams | None, prediction: str | None) -> SessionReply:
        stream = self.chat_runtime.complete(
            self.messages,
            tools=self.tools,
            sampling=sampling or self.sampling,
            overflow=self.overflow,
            cache_key=self.cache_key,
            prediction=prediction,
        )
        return SessionReply(self, stream)


def _read_session_file(path: str | os.PathLike[str], max_bytes: int) -> list[dict[str, Any]]:
    """The messages of a chat session file, checked (see :meth:`ChatSession.load`)."""

    def refuse(reason: str) -> InvalidRequestError:
        return InvalidRequestError(f"cannot load a chat session from {path}: {reason}", field="path")

    file = Path(path)
    try:
        info = file.stat()
        if stat.S_ISDIR(info.st_mode):
            raise refuse("it is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise refuse("it is not a regular file")
        if info.st_size > max_bytes:
            raise refuse(
                f"the file has {info.st_size} bytes, more than the {max_bytes} bytes a chat session file may have"
            )
        with file.open("rb") as f:
            raw = f.read(max_bytes + 1)  # the file may have grown since
    except OSError as exc:
        raise refuse(_reason(exc)) from exc
    if len(raw) > max_bytes:
        raise refuse(f"the file has more than the {max_bytes} bytes a chat session file may have")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise refuse("it is not UTF-8 text") from exc
    except RecursionError as exc:
        raise refuse(f"its JSON is nested more than {MAX_SESSION_FILE_DEPTH} levels deep") from exc
    except ValueError as exc:
        raise refuse(f"it is not valid JSON ({exc})") from exc
    if _nested_deeper_than(data, MAX_SESSION_FILE_DEPTH):
        raise refuse(f"its JSON is nested more than {MAX_SESSION_FILE_DEPTH} levels deep")
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("messages"), list):
        raise refuse(f"it is not a kvchat chat session file (format {_FORMAT!r})")
    messages: list[dict[str, Any]] = data["messages"]
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise refuse(f"message {number} is not an object with a string 'role'")
        if not isinstance(message.get("content"), (str, list, type(None))):
            raise refuse(f"message {number}'s 'content' is not a string, a list or null")
    return messages


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """True if `value` has lists or dicts nested more than `limit` levels (without recursion)."""
    level: list[Any] = [value]  # the containers at depth 1, then 2, ...: after `limit` rounds, deeper than it
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, (list, dict))
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (list, dict))
        ]
        if not level:
            return False
    return True


def _reason(exc: OSError) -> str:
    """An OS error's reason without the repeated path: "No such file or directory"."""
    return exc.strerror or str(exc)
