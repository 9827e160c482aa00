"""Server-sent-event responses for streamed completions.

:func:`sse_response` wraps a route's event generator with what every stream
needs: cancel the engine request when the client goes away, when the time
limit passes or when the server shuts down (after the grace period), report
those as one ``data: {"error": ...}`` event (or the caller's error event), and
end with ``[DONE]`` (unless the caller's API has none).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.types import Receive, Scope, Send

from kvchat.server.errors import APIError, error_body, error_for
from kvchat.server.runs import Cancellable, RequestRun

Event = dict[str, str]


def data_event(body: dict) -> Event:
    """One ``data:`` event carrying `body` as JSON."""
    return {"data": json.dumps(body, ensure_ascii=False)}


def error_event(error: APIError) -> Event:
    return data_event(error_body(error.message, type=error.type, param=error.param, code=error.code))


def error_events(error: APIError) -> list[Event]:
    """The completion APIs' end of a failed stream: one :func:`error_event`."""
    return [error_event(error)]


def sse_response(
    run: RequestRun,
    stream: Cancellable,
    events: AsyncGenerator[Event, None],
    *,
    shutdown_grace: float,
    on_error: Callable[[APIError], Sequence[Event]] = error_events,
    done: bool = True,
) -> EventSourceResponse:
    """Stream `events` (produced from `stream`) to the client under `run`'s rules.

    The producer should stop early (no finish event) when ``run.error`` is set:
    the events that end a failed stream (made by `on_error`) are then sent here. The stream ends with
    ``data: [DONE]`` if `done` (the completion APIs; the Responses API has none).
    The response takes `run` over: it watches the client and ends the run
    however the stream ends.
    """
    run.handed_over = True
    return _RequestEventStream(run, stream, events, shutdown_grace, on_error, done)


class _RequestEventStream(EventSourceResponse):
    """An event stream whose request is cancelled and released however the response ends.

    The cleanup sits around the whole ASGI call, not only in the generator: a
    client that disconnects before the first event would otherwise leave a
    generator that never started, and its request, behind.
    """

    def __init__(
        self,
        run: RequestRun,
        stream: Cancellable,
        events: AsyncGenerator[Event, None],
        shutdown_grace: float,
        on_error: Callable[[APIError], Sequence[Event]],
        done: bool,
    ) -> None:
        self._run = run
        self._stream = stream
        self._on_error = on_error
        self._done = done
        # sse-starlette sets this event when the server begins to shut down and
        # force-cancels the stream after its own grace period; ours ends first.
        self._shutdown = anyio.Event()
        super().__init__(
            self._guarded(events), ping=15, shutdown_event=self._shutdown, shutdown_grace_period=shutdown_grace + 2
        )

    async def _guarded(self, events: AsyncGenerator[Event, None]) -> AsyncIterator[Event]:
        try:
            async with aclosing(events) as produced:
                async for event in produced:
                    yield event
            if self._run.error is not None:
                for event in self._on_error(self._run.error):
                    yield event
        except Exception as exc:  # noqa: BLE001 - the status line is already sent
            for event in self._on_error(error_for(exc)):
                yield event
        if self._done:
            yield {"data": "[DONE]"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._run.stop_watching_client()  # sse-starlette listens for the disconnect from here on
        watcher = asyncio.create_task(self._run.stop_on_shutdown(self._shutdown))
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Client gone, error or normal end: the engine stops within one step.
            watcher.cancel()
            self._stream.cancel()
            self._run.finish()
