"""Server-sent-event responses for streamed completions.

:func:`sse_response` wraps a route's event generator with what every stream
needs: cancel the engine request when the client goes away, when the time
limit passes or when the server shuts down (after the grace period), report
those as one ``data: {"error": ...}`` event, and always end with ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
from sse_starlette.sse import EventSourceResponse

from kvchat.server.errors import APIError, error_body, error_for
from kvchat.server.runs import Cancellable, RequestRun

Event = dict[str, str]


def data_event(body: dict) -> Event:
    """One ``data:`` event carrying `body` as JSON."""
    return {"data": json.dumps(body, ensure_ascii=False)}


def error_event(error: APIError) -> Event:
    return data_event(error_body(error.message, type=error.type, param=error.param, code=error.code))


def sse_response(run: RequestRun, stream: Cancellable, events: AsyncIterator[Event],
                 *, shutdown_grace: float) -> EventSourceResponse:
    """Stream `events` (produced from `stream`) to the client under `run`'s rules.

    The producer should stop early (no finish event) when ``run.error`` is set:
    the error event is then sent here.
    """
    shutdown = anyio.Event()

    async def guarded() -> AsyncIterator[Event]:
        watcher = asyncio.create_task(run.stop_on_shutdown(shutdown))
        try:
            try:
                async with aclosing(events) as produced:
                    async for event in produced:
                        yield event
                if run.error is not None:
                    yield error_event(run.error)
            except Exception as exc:  # noqa: BLE001 - the status line is already sent
                yield error_event(error_for(exc))
            yield {"data": "[DONE]"}
        finally:
            # Client gone, error or normal end: the engine stops within one step.
            watcher.cancel()
            stream.cancel()
            run.finish()

    # sse-starlette sets `shutdown` when the server begins to shut down and
    # force-cancels the stream after its own grace period; ours ends first.
    return EventSourceResponse(guarded(), ping=15, shutdown_event=shutdown,
                               shutdown_grace_period=shutdown_grace + 2)
