"""Anthropic's Messages API: ``POST /v1/messages`` (streamed by named server-sent
events, or not) and ``POST /v1/messages/count_tokens``, over the app's chat runtime
(:meth:`kvchat.chat.ChatRuntime.complete`), for Claude Code (``ANTHROPIC_BASE_URL``)
and the official ``anthropic`` client.

Both routes take the same admission, time limit, tool limit, tenants and metrics
as the OpenAI routes; the request is translated once, by
:mod:`kvchat.server.messages_api` (what is accepted, ignored and refused is listed
there). Their errors are Anthropic-shaped (see :mod:`kvchat.server.errors`).

Decisions:

- The reply's ``model`` is the id the request named, which may be an alias of the
  served model (or any id, with `any_model`), as llama.cpp's server does: clients
  show it and match it with what they asked for.
- `max_tokens` is clamped to the server's `max_tokens_limit` and to the room the
  prompt leaves in the context (a prompt that leaves none is a 400 whose message
  begins ``prompt is too long``, as Anthropic's, which Claude Code reads to compact
  its conversation). Finding the room takes a second render, only for a request
  whose `max_tokens` does not fit.
- A stream begins with ``message_start`` as soon as the request is submitted; its
  usage counts the whole prompt as ``input_tokens``, and the ``message_delta`` at
  the end carries the split between evaluated and cached tokens. ``ping`` events
  come every :data:`PING_SECONDS` while it runs (a long prompt's prefill too).
- A stop sequence ends the reply where it begins: the engine request is cancelled
  then (it ends within a step; ``output_tokens`` counts what the engine generated).
- ``count_tokens`` renders and tokenizes the prompt as a request would (same
  template, tools, tool choice and generated-token memory), on the work pool
  under the same admission, and submits nothing: its count is the
  ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens`` of the
  same request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from sse_starlette.event import ServerSentEvent

from kvchat.chat import ChatDelta, ChatRuntime, ChatStream
from kvchat.chat.tool_calls import ToolCall
from kvchat.engine import SamplingParams
from kvchat.errors import ContextOverflowError
from kvchat.server.errors import APIError, anthropic_error_body
from kvchat.server.ids import new_id
from kvchat.server.messages_api import (
    ChatRequest,
    CountTokensRequest,
    MessagesRequest,
    anthropic_usage,
    chat_request,
    sampling,
    start_usage,
    stop_reason,
    stop_sequences,
)
from kvchat.server.runs import RequestRun, serving
from kvchat.server.sse import Event, sse_response
from kvchat.server.state import ServerState, Tenant, authorized, server_state
from kvchat.server.stop_scanner import StopScanner
from kvchat.server.work_pool import CancelCheck, work_pool

router = APIRouter()

PING_SECONDS = 5.0
"""Seconds between two ``ping`` events of a stream."""


@router.post("/v1/messages")
async def create_message(
    body: MessagesRequest,
    request: Request,
    state: ServerState = Depends(server_state),
    tenant: Tenant = Depends(authorized),
) -> Any:
    state.check_model(body.model)
    chat = _checked_request(state, body)
    stops = stop_sequences(body.stop_sequences)
    params = sampling(body, state.settings.max_tokens_limit, state.sampling_defaults())
    runtime = state.chat_runtime
    run = state.new_run(request, tenant)
    with serving(run):
        await run.start()
        stream = await work_pool(request).run_for(
            run,
            lambda cancelled: _start(runtime, chat, params, tenant.cache_key, cancelled),
            discard=ChatStream.cancel,
        )
        run.attach(stream)
        reply = MessageBuilder(new_id("msg"), body.model, StopScanner(stops), chat.max_calls)
        if body.stream:
            response = sse_response(
                run,
                stream,
                _message_events(stream, run, reply),
                shutdown_grace=state.settings.shutdown_grace,
                on_error=_error_events,
                done=False,
            )
            response.ping_interval = PING_SECONDS
            response.ping_message_factory = ping_event
            return response
        last = None
        async for delta in stream:
            reply.add(delta)
            if reply.stopped:
                stream.cancel()
            if delta.usage is not None:
                run.usage, last = delta.usage, delta
        if run.error is not None:
            raise run.error
        assert last is not None and last.usage is not None
    return reply.message(last.finish_reason, anthropic_usage(last.usage))


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    body: CountTokensRequest,
    request: Request,
    state: ServerState = Depends(server_state),
    tenant: Tenant = Depends(authorized),
) -> Any:
    state.check_model(body.model)
    chat = _checked_request(state, body)
    runtime = state.chat_runtime
    run = state.new_run(request, tenant)
    with serving(run):
        await run.start()
        count = await work_pool(request).run_for(
            run, lambda cancelled: _count(runtime, chat, tenant.cache_key, cancelled)
        )
    return {"input_tokens": count}


def _checked_request(state: ServerState, body: CountTokensRequest) -> ChatRequest:
    """`body` as a chat request, within the server's tool limit (400 otherwise)."""
    state.check_tool_count(len(body.tools or ()))
    return chat_request(body)


def _start(
    runtime: ChatRuntime, chat: ChatRequest, params: SamplingParams, cache_key: str | None, cancelled: CancelCheck
) -> ChatStream:
    """Submit `chat` (on a work-pool thread), its `max_tokens` clamped to the room its prompt leaves."""

    def complete(options: SamplingParams) -> ChatStream:
        return runtime.complete(
            chat.messages,
            tools=chat.tools,
            tool_choice=chat.tool_choice,
            sampling=options,
            cache_key=cache_key,
            cancelled=cancelled,
        )

    try:
        return complete(params)
    except ContextOverflowError as exc:
        room = exc.context_limit - exc.prompt_tokens
        if room < 1 or params.max_tokens is None or room >= params.max_tokens:
            raise APIError(
                400,
                f"prompt is too long: {exc.prompt_tokens} tokens > {exc.context_limit - 1} maximum",
                code="context_length_exceeded",
            ) from None
        return complete(replace(params, max_tokens=room))


def _count(runtime: ChatRuntime, chat: ChatRequest, cache_key: str | None, cancelled: CancelCheck) -> int:
    """The tokens of `chat`'s prompt (:meth:`ChatRuntime.prompt_tokens`; 0 if cancelled)."""
    if cancelled():
        return 0
    return runtime.prompt_tokens(chat.messages, tools=chat.tools, tool_choice=chat.tool_choice, cache_key=cache_key)


class MessageBuilder:
    """One reply in the making: its content blocks, built from chat deltas, and
    the stream events that build them (``content_block_start``, ``_delta``, ``_stop``).

    Text goes through the stop sequences' scanner; a tool call closes the open text
    block and is one ``tool_use`` block, its input sent whole as one
    ``input_json_delta``. Past `max_calls` calls, further calls are dropped.
    """

    def __init__(self, message_id: str, model: str, scanner: StopScanner, max_calls: int | None) -> None:
        self.id = message_id
        self.model = model
        self.blocks: list[dict[str, Any]] = []
        self._scanner = scanner
        self._max_calls = max_calls
        self._calls = 0
        self._text_open = False

    @property
    def stopped(self) -> bool:
        """Whether a stop sequence has ended the reply (the caller cancels its stream)."""
        return self._scanner.matched is not None

    def add(self, delta: ChatDelta) -> list[dict[str, Any]]:
        """The events of one delta (none once a stop sequence has ended the reply)."""
        if self.stopped:
            return []
        events = self._text(self._scanner.feed(delta.content)) if delta.content else []
        if self.stopped:
            return events + self._close_text()
        for call in delta.tool_calls:
            events += self._text(self._scanner.flush()) + self._close_text()
            if self._max_calls is None or self._calls < self._max_calls:
                events += self._tool_use(call)
                self._calls += 1
        if delta.finish_reason is not None:
            events += self._text(self._scanner.flush()) + self._close_text()
        return events

    def message(self, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        """The message object: the blocks so far, and how the reply ended."""
        matched = self._scanner.matched
        return self.frame(
            content=self.blocks, stop_reason=stop_reason(finish_reason, matched), stop_sequence=matched, usage=usage
        )

    def frame(
        self,
        *,
        content: list[dict[str, Any]],
        stop_reason: str | None,
        stop_sequence: str | None,
        usage: dict[str, int],
    ) -> dict[str, Any]:
        """The message object with these fields (a stream's ``message_start`` has no content yet)."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    def _text(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        events = []
        if not self._text_open:
            self._text_open = True
            self.blocks.append({"type": "text", "text": ""})
            events.append(_block_start(len(self.blocks) - 1, {"type": "text", "text": ""}))
        self.blocks[-1]["text"] += text
        events.append(_block_delta(len(self.blocks) - 1, {"type": "text_delta", "text": text}))
        return events

    def _close_text(self) -> list[dict[str, Any]]:
        if not self._text_open:
            return []
        self._text_open = False
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def _tool_use(self, call: ToolCall) -> list[dict[str, Any]]:
        block = {"type": "tool_use", "id": new_id("toolu"), "name": call.name, "input": call.arguments}
        self.blocks.append(block)
        index = len(self.blocks) - 1
        partial = json.dumps(call.arguments, ensure_ascii=False)
        return [
            _block_start(index, {**block, "input": {}}),
            _block_delta(index, {"type": "input_json_delta", "partial_json": partial}),
            {"type": "content_block_stop", "index": index},
        ]


def _block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def _block_delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


async def _message_events(stream: ChatStream, run: RequestRun, reply: MessageBuilder) -> AsyncGenerator[Event, None]:
    """The named events of a streamed reply (an error event is added by `sse_response`)."""
    start = reply.frame(content=[], stop_reason=None, stop_sequence=None, usage=start_usage(stream.prompt_tokens))
    yield _event({"type": "message_start", "message": start})
    async for delta in stream:
        for payload in reply.add(delta):
            yield _event(payload)
        if reply.stopped:
            stream.cancel()
        if delta.usage is not None:
            run.usage = delta.usage
        if delta.finish_reason is not None and delta.usage is not None and run.error is None:
            final = reply.message(delta.finish_reason, anthropic_usage(delta.usage))
            ending = {"stop_reason": final["stop_reason"], "stop_sequence": final["stop_sequence"]}
            yield _event({"type": "message_delta", "delta": ending, "usage": final["usage"]})
            yield _event({"type": "message_stop"})


def _event(payload: dict[str, Any]) -> Event:
    """One named event: its ``type`` is the SSE event name too, as Anthropic's streams have it."""
    return {"event": payload["type"], "data": json.dumps(payload, ensure_ascii=False)}


def _error_events(error: APIError) -> list[Event]:
    """A failed stream's end: Anthropic's ``error`` event."""
    return [_event(anthropic_error_body(error))]


def ping_event() -> ServerSentEvent:
    """Anthropic's keep-alive event, ``event: ping`` with ``{"type": "ping"}`` (the clients skip it)."""
    return ServerSentEvent(data=json.dumps({"type": "ping"}), event="ping")
