"""The objects the Responses API answers with: the response, its output items, its
usage, and the typed events of a streamed response.

:class:`OutputBuilder` turns a chat reply's deltas into output items (a
``message`` with one ``output_text`` part; a ``function_call`` per tool call)
and the stream events that announce them, so a streamed and a whole response
are made by the same code. :class:`EventCounter` numbers the events
(``sequence_number``) and names each SSE event by its ``type``, as OpenAI does.

Everything sent must be valid UTF-8. What a response echoes of its request is
checked on the way in (:mod:`kvchat.server.responses_api`); what the model
writes is text the engine decoded whole, except the arguments of a tool call,
parsed JSON whose escapes may make a lone surrogate: those arguments are written
back with that escape (``\\ud800``), not the character. An event that still cannot
be encoded raises the typed 500 of :func:`unencodable` instead of breaking the
stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvchat.chat.complete import ChatDelta
from kvchat.chat.tool_calls import ToolCall
from kvchat.engine import Usage
from kvchat.server.errors import APIError, error_body
from kvchat.server.ids import new_id
from kvchat.server.sse import Event

__all__ = ["EventCounter", "OutputBuilder", "ResponseFrame", "new_id", "response_usage", "unencodable"]


def unencodable(what: str) -> APIError:
    """The error of a response that cannot be written as JSON (`what`: which, such
    as ``response resp_...``): a 500 ``server_error``, code
    ``response_not_serializable``. Such a response is never stored."""
    return APIError(
        500,
        f"{what} cannot be written as JSON (it holds text that is not valid Unicode, "
        "or a value JSON cannot hold); it was not stored",
        type="server_error",
        code="response_not_serializable",
    )


def response_usage(usage: Usage, *, cache_writes: bool) -> dict[str, Any]:
    """A `Usage` in the Responses API's shape. ``cache_write_tokens`` are the input
    tokens evaluated (not found in the cache) and kept by the prefix cache, when
    the engine has one (`cache_writes`)."""
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.evaluated_tokens if cache_writes else 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


@dataclass(frozen=True)
class ResponseFrame:
    """What a response echoes of its request, and its identity; :meth:`body` adds the rest."""

    id: str
    model: str
    instructions: str | None
    previous_response_id: str | None
    tools: list[Any]
    tool_choice: Any
    temperature: float
    top_p: float
    max_output_tokens: int | None
    max_tool_calls: int | None
    parallel_tool_calls: bool
    store: bool
    text: dict[str, Any]
    truncation: str
    metadata: dict[str, str]
    user: str | None
    created_at: int = field(default_factory=lambda: int(time.time()))

    def body(
        self, status: str, output: Sequence[dict[str, Any]] = (), usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The response object in `status` (``in_progress``, ``completed``, ``incomplete``)."""
        finished = status in ("completed", "incomplete")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if finished else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "model": self.model,
            "output": list(output),
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": self.store,
            "temperature": self.temperature,
            "text": self.text,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_logprobs": 0,
            "top_p": self.top_p,
            "truncation": self.truncation,
            "usage": usage,
            "user": self.user,
            "metadata": self.metadata,
        }


class EventCounter:
    """Numbers a stream's events: each gets the next ``sequence_number`` and its
    ``type`` as the SSE event name."""

    def __init__(self) -> None:
        self.next = 0

    def event(self, payload: dict[str, Any]) -> Event:
        """`payload` (with a ``type``) as the stream's next event. Raises `APIError`
        (500, see :func:`unencodable`) if it cannot be sent as UTF-8 JSON; the
        sequence number is then not used."""
        body = {"type": payload["type"], "sequence_number": self.next, **payload}
        try:
            data = json.dumps(body, ensure_ascii=False, allow_nan=False)
            if not data.isascii():
                data.encode("utf-8")
        except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
            raise unencodable(f"the stream's {body['type']} event") from None
        self.next += 1
        return {"event": body["type"], "data": data}

    def error(self, error: APIError) -> Event:
        """An ``error`` event for `error`: OpenAI's fields (``code``, ``message``,
        ``param``), plus the ``error`` object that the chat streams send, which
        makes the official client raise it."""
        body = error_body(error.message, type=error.type, param=error.param, code=error.code)
        fields = {key: body["error"][key] for key in ("code", "message", "param")}
        return self.event({"type": "error", **fields, **body})


class OutputBuilder:
    """A reply's output items, built delta by delta, and the events announcing them.

    Text opens a ``message`` item (closed when a tool call or the end comes); each
    tool call is a ``function_call`` item. At most `max_calls` calls are kept
    (None: all). A reply with neither text nor calls gets an empty message.
    """

    def __init__(self, *, max_calls: int | None = None) -> None:
        self.items: list[dict[str, Any]] = []
        self._max_calls = max_calls
        self._calls = 0
        self._message: dict[str, Any] | None = None
        self._text: list[str] = []

    def add(self, delta: ChatDelta) -> list[dict[str, Any]]:
        """The events for `delta` (payloads without sequence numbers)."""
        events: list[dict[str, Any]] = []
        if delta.content:
            if self._message is None:
                events += self._open_message()
            self._text.append(delta.content)
            events.append(
                {
                    "type": "response.output_text.delta",
                    **self._where(),
                    "content_index": 0,
                    "delta": delta.content,
                    "logprobs": [],
                }
            )
        for call in delta.tool_calls:
            if self._max_calls is not None and self._calls >= self._max_calls:
                continue
            self._calls += 1
            events += self._close_message("completed")
            events += self._function_call(call)
        return events

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close the output (`status` ``completed`` or ``incomplete``); the last events."""
        events = self._open_message() if not self.items and self._message is None else []
        return events + self._close_message(status)

    def _where(self) -> dict[str, Any]:
        assert self._message is not None
        return {"item_id": self._message["id"], "output_index": len(self.items)}

    def _open_message(self) -> list[dict[str, Any]]:
        self._message = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant"}
        self._text = []
        return [
            {
                "type": "response.output_item.added",
                "output_index": len(self.items),
                "item": {**self._message, "content": []},
            },
            {"type": "response.content_part.added", **self._where(), "content_index": 0, "part": _text_part("")},
        ]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        if self._message is None:
            return []
        text = "".join(self._text)
        where = self._where()
        item = {**self._message, "status": status, "content": [_text_part(text)]}
        self.items.append(item)
        self._message = None
        return [
            {"type": "response.output_text.done", **where, "content_index": 0, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "content_index": 0, "part": _text_part(text)},
            {"type": "response.output_item.done", "output_index": where["output_index"], "item": item},
        ]

    def _function_call(self, call: ToolCall) -> list[dict[str, Any]]:
        arguments = _arguments_json(call.arguments)
        item = {
            "id": new_id("fc"),
            "type": "function_call",
            "status": "completed",
            "call_id": call.id,
            "name": call.name,
            "arguments": arguments,
        }
        index = len(self.items)
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return [
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": {**item, "status": "in_progress", "arguments": ""},
            },
            {"type": "response.function_call_arguments.delta", **where, "delta": arguments},
            {"type": "response.function_call_arguments.done", **where, "name": call.name, "arguments": arguments},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]


def _arguments_json(arguments: Any) -> str:
    """A call's arguments as JSON text: characters as they are, unless a string
    holds a lone surrogate (the model wrote an escape such as ``\\ud800``): then
    with ASCII escapes, so the text is valid Unicode and parses to the same value."""
    text = json.dumps(arguments, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(arguments)
    return text


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
