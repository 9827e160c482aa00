"""The objects the Responses API answers with: the response, its output items, its
usage, and the typed events of a streamed response.

:class:`OutputBuilder` turns a chat reply's deltas into output items (a
``message`` with one ``output_text`` part; a ``function_call`` per call of a
function tool, with the ``namespace`` of a namespaced one; a ``custom_tool_call``
per call of a custom tool) and the stream events that announce them, so a
streamed and a whole response are made by the same code. :class:`EventCounter`
numbers the events (``sequence_number``) and names each SSE event by its
``type``, as OpenAI does.

The stream is what OpenAI's Codex CLI parses (codex-rs/codex-api/src/sse/responses.rs,
``process_sse``, commit 0a7fb0d of openai/codex). Codex dispatches on the ``type``
inside each event's data (not the SSE event name) and reads:

- ``response.created``: only that it carries a ``response`` object;
- ``response.output_item.added`` and ``response.output_item.done``: ``item``, parsed
  as one of its ``ResponseItem`` types (codex-rs/protocol/src/models.rs): a
  ``message`` (``role``, ``content`` of ``output_text`` parts), a ``function_call``
  (``name``, ``namespace``, ``arguments`` as a JSON string, ``call_id``), a
  ``custom_tool_call`` (``call_id``, ``name``, ``input``); an item it cannot parse
  is skipped. The calls it runs are those of ``output_item.done``; ``id`` and
  ``status`` are optional for it, and sent anyway;
- ``response.output_text.delta``: ``delta`` (the text it shows as it comes);
- ``response.completed``: ``response.id`` and ``response.usage`` with
  ``input_tokens``, ``output_tokens``, ``total_tokens``,
  ``input_tokens_details.cached_tokens`` and ``output_tokens_details.reasoning_tokens``.
  A stream that ends without it is an error to Codex ("stream closed before
  response.completed"), which it retries;
- ``response.failed`` (``response.error``), ``response.reasoning_*`` events; all
  other types are ignored.

Codex also gives up on a stream after 300 seconds without an event
(``stream_idle_timeout_ms``): the route repeats ``response.in_progress`` while no
other event comes (:data:`kvchat.server.routes.responses.PULSE_SECONDS`).

kvchat sends every event OpenAI's API sends for these items (so the official
client's stream helpers work too); a response cut short by ``max_output_tokens``
ends with ``response.incomplete``, as OpenAI's does, which Codex treats as an
unfinished stream. No ``reasoning`` item is sent: the models do not reason, and
Codex needs none.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kvchat.chat.complete import ChatDelta
from kvchat.chat.tool_calls import ToolCall
from kvchat.engine import Usage
from kvchat.server.errors import APIError, error_body
from kvchat.server.ids import new_id
from kvchat.server.sse import Event

__all__ = [
    "CallTarget",
    "EventCounter",
    "OutputBuilder",
    "ResponseFrame",
    "arguments_json",
    "new_id",
    "response_usage",
    "unencodable",
]


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
class CallTarget:
    """What a call of an offered tool is in the Responses API: a ``function_call``
    (`kind` ``"function"``) or a ``custom_tool_call`` (``"custom"``, whose ``input``
    is the call's ``input`` argument) of the tool `name`, in `namespace` (None: a
    tool outside any namespace)."""

    name: str
    namespace: str | None = None
    kind: Literal["function", "custom"] = "function"


@dataclass(frozen=True)
class ResponseFrame:
    """What a response echoes of its request, and its identity; :meth:`body` adds the rest.

    The body holds one field OpenAI's response has not: ``kvchat_omitted_tools``
    (see `omitted_tools`). The official clients' response types take fields they
    do not know (the ``openai`` client keeps them as extra attributes)."""

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
    omitted_tools: tuple[str, ...] = ()
    """The types of the request's tools that were left out of the prompt (built-in
    tools the server cannot run), sent as ``kvchat_omitted_tools``."""
    created_at: int = field(default_factory=lambda: int(time.time()))

    def body(
        self,
        status: str,
        output: Sequence[dict[str, Any]] = (),
        usage: dict[str, Any] | None = None,
        *,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The response object in `status` (``in_progress``, ``completed``,
        ``incomplete``, or ``failed`` with its `error`: ``code`` and ``message``)."""
        finished = status in ("completed", "incomplete")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if finished else None,
            "error": error,
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
            "kvchat_omitted_tools": list(self.omitted_tools),
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

    def failed(self, error: APIError, frame: ResponseFrame, output: Sequence[dict[str, Any]]) -> list[Event]:
        """The events that end a stream that failed with `error`: ``response.failed``
        (the response with its ``error`` and the output so far: what Codex CLI reads,
        retrying or stopping by the error's ``code``), then :meth:`error` (what makes
        the official client raise)."""
        failure = {"code": error.code or error.type, "message": error.message}
        try:
            failed = [self.event({"type": "response.failed", "response": frame.body("failed", output, error=failure)})]
        except APIError:  # the output so far cannot be encoded: the error event alone says it
            failed = []
        return [*failed, self.error(error)]

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
    tool call is a ``function_call`` or ``custom_tool_call`` item, as `targets`
    (chat function name to :class:`CallTarget`) says; a call of a name not there
    (the model made it up) is a ``function_call`` of that name. At most
    `max_calls` calls are kept (None: all). A reply with neither text nor calls
    gets an empty message.
    """

    def __init__(self, *, max_calls: int | None = None, targets: Mapping[str, CallTarget] | None = None) -> None:
        self.items: list[dict[str, Any]] = []
        self._max_calls = max_calls
        self._targets = targets or {}
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
            target = self._targets.get(call.name, CallTarget(call.name))
            events += self._custom_call(call, target) if target.kind == "custom" else self._function_call(call, target)
        return events

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close the output (`status` ``completed`` or ``incomplete``); the last events."""
        events = self._open_message() if not self.items and self._message is None else []
        return events + self._close_message(status)

    def so_far(self) -> list[dict[str, Any]]:
        """The output as it stands, a message still open included (``incomplete``):
        what a response that failed mid-way shows."""
        if self._message is None:
            return list(self.items)
        text = "".join(self._text)
        return [*self.items, {**self._message, "status": "incomplete", "content": [_text_part(text)]}]

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

    def _function_call(self, call: ToolCall, target: CallTarget) -> list[dict[str, Any]]:
        arguments = arguments_json(call.arguments)
        item = self._call_item("fc", "function_call", call, target, arguments=arguments)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        return [
            {"type": "response.output_item.added", **_added(item, where, arguments="")},
            {"type": "response.function_call_arguments.delta", **where, "delta": arguments},
            {"type": "response.function_call_arguments.done", **where, "name": target.name, "arguments": arguments},
            {"type": "response.output_item.done", "output_index": where["output_index"], "item": item},
        ]

    def _custom_call(self, call: ToolCall, target: CallTarget) -> list[dict[str, Any]]:
        text = _custom_input(call.arguments)
        item = self._call_item("ctc", "custom_tool_call", call, target, input=text)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        return [
            {"type": "response.output_item.added", **_added(item, where, input="")},
            {"type": "response.custom_tool_call_input.delta", **where, "delta": text},
            {"type": "response.custom_tool_call_input.done", **where, "input": text},
            {"type": "response.output_item.done", "output_index": where["output_index"], "item": item},
        ]

    def _call_item(self, prefix: str, kind: str, call: ToolCall, target: CallTarget, **payload: str) -> dict[str, Any]:
        """A finished call item, appended to the output."""
        item: dict[str, Any] = {
            "id": new_id(prefix),
            "type": kind,
            "status": "completed",
            "call_id": call.id,
            "name": target.name,
        }
        if target.namespace is not None:
            item["namespace"] = target.namespace
        item.update(payload)
        self.items.append(item)
        return item


def _added(item: dict[str, Any], where: dict[str, Any], **empty: str) -> dict[str, Any]:
    """The fields of the ``output_item.added`` event of a call `item` at `where`: the
    item in progress, its payload (`empty`) not yet written."""
    return {"output_index": where["output_index"], "item": {**item, "status": "in_progress", **empty}}


def _custom_input(arguments: Any) -> str:
    """A custom tool's ``input`` from the arguments of the function it is offered as:
    the ``input`` argument (a lone surrogate, which the model can write as a JSON
    escape, replaced by U+FFFD), or, from a model that wrote other arguments, their JSON."""
    text = arguments.get("input") if isinstance(arguments, Mapping) else None
    if not isinstance(text, str):
        return arguments_json(arguments)
    if text.isascii():
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def arguments_json(arguments: Any) -> str:
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
