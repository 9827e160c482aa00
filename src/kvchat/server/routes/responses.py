"""OpenAI's Responses API: ``POST /v1/responses`` (streamed by typed server-sent
events, or not), ``GET /v1/responses/{id}`` and ``DELETE /v1/responses/{id}``,
over the app's chat runtime (:meth:`kvchat.chat.ChatRuntime.complete`).

A response's conversation is its `input` after the stored conversation of its
``previous_response_id`` (that response's input and output, without its
`instructions`: instructions apply to one response only, and come first in its
prompt). A chain therefore sends the engine the same token prefix turn after
turn, and the prefix cache evaluates only what is new.

Stored responses (``store``, on by default) live in the server's bounded
:class:`kvchat.server.response_store.ResponseStore`, under the API key that made
them: another key's ``GET``, ``DELETE`` or ``previous_response_id`` gets the 404 an
unknown id gets. Requests go through the same admission, time limit, tool and
token limits as chat completions (``max_tools`` counts the tools offered to the
model, a namespace's each); what the API has and kvchat does not is refused, or,
for built-in tools, left out and named in the ``kvchat-omitted-tools`` header
(see :mod:`kvchat.server.responses_api`, which also says how OpenAI's Codex CLI is
served). A streamed response repeats ``response.in_progress`` after
:data:`PULSE_SECONDS` without an event, so that clients with an idle timeout
(Codex's is 300 seconds) wait through a long prompt's evaluation.

A finished response is encoded once (:func:`kvchat.server.response_store.encode_response`):
those bytes are the reply and what a later ``GET`` returns. A response that cannot
be encoded (its echoed fields are checked on the way in, so only a model's output
could make one) is never stored: the request ends with a typed 500
(``response_not_serializable``), or that error event when streamed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from kvchat.chat import ChatDelta, ChatStream
from kvchat.engine import SamplingParams
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import APIError
from kvchat.server.response_objects import (
    EventCounter,
    OutputBuilder,
    ResponseFrame,
    response_usage,
    unencodable,
)
from kvchat.server.response_store import UnencodableResponseError, encode_response
from kvchat.server.responses_api import (
    ChatName,
    ResponsesRequest,
    ToolOffer,
    chat_tools,
    check_supported,
    input_messages,
    known_calls,
    response_format,
)
from kvchat.server.runs import RequestRun, serving
from kvchat.server.sse import Event, sse_response
from kvchat.server.state import ServerState, Tenant, authorized, server_state
from kvchat.server.work_pool import work_pool

router = APIRouter()
log = logging.getLogger("kvchat.server")

_PARAMS = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens"}
"""The chat runtime's names of a request's fields, and the Responses API's."""
OMITTED_TOOLS_HEADER = "kvchat-omitted-tools"
"""The response header naming the types of the tools left out of the prompt (comma-separated)."""
PULSE_SECONDS = 30.0
"""How long a streamed response goes without an event before it sends
``response.in_progress`` again: while a long prompt is evaluated, or while a tool
call is held until it is whole. OpenAI's Codex CLI gives up on a stream after 300
seconds without an event (its ``stream_idle_timeout_ms``), and a first turn of
Codex (some 9,000 tokens) can take that long on a small CPU."""


@dataclass(frozen=True)
class _Turn:
    """One response in the making: what it echoes, and where it is stored when done
    (`names` gives the chat name of a called tool, to store its calls as history)."""

    frame: ResponseFrame
    conversation: Sequence[Mapping[str, Any]]
    tenant: Tenant
    state: ServerState
    names: ChatName

    def finish(self, builder: OutputBuilder, delta: ChatDelta) -> tuple[dict[str, Any], bytes, list[dict[str, Any]]]:
        """The finished response for the last `delta` (with usage), as an object and
        as the JSON bytes sent and stored, and the events that close its output;
        stored if the request asked for it. Raises `APIError` (500, see
        :func:`unencodable`) if the response cannot be encoded: nothing is stored."""
        status = "incomplete" if delta.finish_reason == "length" else "completed"
        events = builder.finish(status)
        assert delta.usage is not None
        usage = response_usage(delta.usage, cache_writes=self.state.engine.settings.prefix_cache)
        body = self.frame.body(status, builder.items, usage)
        try:
            content = encode_response(body)
        except UnencodableResponseError as exc:
            log.error("response %s is neither returned nor stored: %s", self.frame.id, exc)
            raise unencodable(f"response {self.frame.id}") from None
        if self.frame.store:
            self._store(body, content, builder.items)
        return body, content, events

    def _store(self, body: dict[str, Any], content: bytes, output: list[dict[str, Any]]) -> None:
        try:
            reply = input_messages(output, calls=known_calls(self.conversation), field="output", names=self.names)
        except InvalidRequestError:  # output that the Responses input would refuse as history
            log.warning("response %s is not stored: its output cannot be continued", self.frame.id)
            return
        history = [*self.conversation, *reply]
        if not self.state.responses.put(self.tenant.key, self.frame.id, body, history, content=content):
            log.warning("response %s is not stored: it is larger than the store's bound", self.frame.id)


@router.post("/v1/responses")
async def create_response(
    body: ResponsesRequest,
    request: Request,
    state: ServerState = Depends(server_state),
    tenant: Tenant = Depends(authorized),
) -> Any:
    state.check_model(body.model)
    check_supported(body)
    offer = chat_tools(body.tools, body.tool_choice)
    state.check_tool_count(len(offer.tools or ()), counted="tools offered (a namespace's tools count each)")
    state.check_max_tokens(body.max_output_tokens, field="max_output_tokens")
    history = _previous_history(state, tenant, body.previous_response_id)
    if isinstance(body.input, list) and not body.input:
        raise APIError(400, "input must not be empty", param="input")
    conversation = [*history, *input_messages(body.input, calls=known_calls(history), names=offer.chat_name)]
    fmt = response_format(body.text)
    sampling = _sampling(body, state.sampling_defaults())
    prompt = [{"role": "system", "content": body.instructions}, *conversation] if body.instructions else conversation
    frame = replace(state.response_frame(body, state.settings, sampling), omitted_tools=offer.omitted)
    turn = _Turn(frame, conversation, tenant, state, offer.chat_name)
    max_calls = 1 if body.parallel_tool_calls is False else body.max_tool_calls
    run = state.new_run(request, tenant)
    with serving(run):
        await run.start()
        try:
            stream = await work_pool(request).run_for(
                run,
                lambda cancelled: state.chat_runtime.complete(
                    prompt,
                    tools=offer.tools,
                    tool_choice=offer.tool_choice,
                    response_format=fmt,
                    sampling=sampling,
                    overflow="truncate_oldest" if body.truncation == "auto" else "error",
                    cache_key=tenant.cache_key,
                    cancelled=cancelled,
                ),
                discard=ChatStream.cancel,
            )
        except InvalidRequestError as exc:
            exc.field = _PARAMS.get(exc.field or "", exc.field)
            raise
        run.attach(stream)
        builder = OutputBuilder(max_calls=max_calls, targets=offer.targets)
        if body.stream:
            counter = EventCounter()
            events = _response_events(stream, run, builder, counter, turn)
            streamed = sse_response(
                run,
                stream,
                events,
                shutdown_grace=state.settings.shutdown_grace,
                on_error=lambda error: counter.failed(error, turn.frame, builder.so_far()),
                done=False,
            )
            streamed.headers.update(_omitted_header(offer))
            return streamed
        last = None
        async for delta in stream:
            builder.add(delta)
            if delta.usage is not None:
                run.usage, last = delta.usage, delta
        if run.error is not None:
            raise run.error
        assert last is not None
        _, content, _ = turn.finish(builder, last)
    return Response(content, media_type="application/json", headers=_omitted_header(offer))


def _omitted_header(offer: ToolOffer) -> dict[str, str]:
    """The ``kvchat-omitted-tools`` header of a response, if tools were left out."""
    return {OMITTED_TOOLS_HEADER: ",".join(offer.omitted)} if offer.omitted else {}


@router.get("/v1/responses/{response_id}")
async def retrieve_response(
    response_id: str,
    stream: bool = False,
    state: ServerState = Depends(server_state),
    tenant: Tenant = Depends(authorized),
) -> Any:
    if stream:
        raise APIError(400, "a stored response cannot be streamed again", param="stream")
    stored = state.responses.get(tenant.key, response_id)
    if stored is None:
        raise _not_found(response_id)
    return Response(stored.content, media_type="application/json")  # the bytes checked when it was stored


@router.delete("/v1/responses/{response_id}")
async def delete_response(
    response_id: str, state: ServerState = Depends(server_state), tenant: Tenant = Depends(authorized)
) -> Any:
    if not state.responses.delete(tenant.key, response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _not_found(response_id: str, param: str | None = None) -> APIError:
    code = "previous_response_not_found" if param else "response_not_found"
    return APIError(404, f"no response with id {response_id[:100]!r} is stored", param=param, code=code)


def _previous_history(state: ServerState, tenant: Tenant, response_id: str | None) -> Sequence[Mapping[str, Any]]:
    """The stored conversation a request continues (404 if there is none for this key)."""
    if response_id is None:
        return ()
    stored = state.responses.get(tenant.key, response_id)
    if stored is None:
        raise _not_found(response_id, "previous_response_id")
    return stored.history


def _sampling(body: ResponsesRequest, defaults: dict[str, Any]) -> SamplingParams:
    options: dict[str, Any] = {"max_tokens": body.max_output_tokens, **defaults}
    if body.temperature is not None:
        options["temperature"] = body.temperature
    if body.top_p is not None:
        options["top_p"] = body.top_p
    return SamplingParams(**options)


async def _response_events(
    stream: ChatStream, run: RequestRun, builder: OutputBuilder, counter: EventCounter, turn: _Turn
) -> AsyncGenerator[Event, None]:
    """The typed events of a streamed response (an error is added by `sse_response`)."""
    for kind in ("response.created", "response.in_progress"):
        yield counter.event({"type": kind, "response": turn.frame.body("in_progress")})
    async for delta in pulsed(stream, PULSE_SECONDS):
        if delta is None:
            yield counter.event({"type": "response.in_progress", "response": turn.frame.body("in_progress")})
            continue
        for payload in builder.add(delta):
            yield counter.event(payload)
        if delta.usage is not None:
            run.usage = delta.usage
        if delta.finish_reason is not None and run.error is None:
            response, _, closing = turn.finish(builder, delta)
            for payload in closing:
                yield counter.event(payload)
            yield counter.event({"type": f"response.{response['status']}", "response": response})


async def pulsed(deltas: AsyncIterable[ChatDelta], every: float) -> AsyncGenerator[ChatDelta | None, None]:
    """`deltas`, and None each time `every` seconds pass without one. The next delta
    is awaited in a task of its own, which a pulse leaves running (nothing is lost)
    and which is cancelled if the consumer stops while it waits."""
    iterator = aiter(deltas)
    while True:
        waiting = asyncio.ensure_future(anext(iterator))
        try:
            while not (await asyncio.wait({waiting}, timeout=every))[0]:
                yield None
        finally:
            waiting.cancel()  # a no-op once it is done
        try:
            delta = waiting.result()
        except StopAsyncIteration:
            return
        yield delta
