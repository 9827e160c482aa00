"""The life of one model request on the server: admission, time limit, disconnects,
shutdown, metrics.

:class:`RequestRun` holds one admitted request (see
:class:`kvchat.server.admission.Admission`) from its admission to the end of its
response. It stops the request's work (an engine stream, an embedding job) when
the time limit passes, when the client disconnects, or when the server shuts
down (after the grace period), remembers why, records latency metrics and frees
its slot. A route uses it like this::

    run = state.new_run(request, tenant)      # 429 here, before any work
    with serving(run):                          # errors become OpenAI-shaped; the run ends
        await run.start()                       # the key's running place (may wait)
        stream = ...submit...
        run.attach(stream)
        ...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import anyio
from starlette.requests import Request

from kvchat.engine import Usage
from kvchat.server.admission import Admission, Ticket
from kvchat.server.errors import APIError, error_for
from kvchat.server.metrics import ServerMetrics

__all__ = ["Cancellable", "RequestRun", "serving"]

SHUTDOWN_POLL_SECONDS = 0.25
"""How often a request looks whether the server is shutting down."""


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class RequestRun:
    """One admitted request. Call :meth:`start` before its work begins,
    :meth:`attach` once the work exists, and :meth:`finish` when it ends
    (any path; further calls do nothing); or use :func:`serving`.

    The time limit counts from admission, so time spent waiting for a running
    place counts too. The client is watched for a disconnect until the response
    starts (:meth:`stop_watching_client`; a streamed response watches it itself).
    """

    def __init__(
        self,
        admission: Admission,
        key: str,
        metrics: ServerMetrics,
        *,
        timeout: float | None,
        shutdown_grace: float,
        request: Request | None = None,
        shutting_down: Callable[[], bool] | None = None,
        items: int = 1,
    ) -> None:
        self._ticket: Ticket = admission.enter(key, items)
        self._admission = admission
        self._metrics = metrics
        self._timeout = timeout
        self._shutdown_grace = shutdown_grace
        self._work: Cancellable | None = None
        self._waiting: anyio.CancelScope | None = None
        self._stopped_by: str | None = None
        self._finished = False
        self.handed_over = False
        """True once a streamed response owns the run (it calls :meth:`finish`)."""
        self.submitted_at = time.monotonic()
        self.usage: Usage | None = None
        """The request's final usage, once a producer has seen it."""
        loop = asyncio.get_running_loop()
        self._timer = None if timeout is None else loop.call_later(timeout, self._stop, "timeout")
        self._watcher = None if request is None else loop.create_task(self._watch_client(request))
        self._shutdown_watcher = (
            None if shutting_down is None else loop.create_task(self._watch_shutdown(shutting_down))
        )

    async def start(self) -> None:
        """Wait for a running place of the request's key; raises :attr:`error` if
        the request is stopped meanwhile (time limit, disconnect)."""
        if self._stopped_by is None:
            with anyio.CancelScope() as scope:
                self._waiting = scope
                await self._admission.take_place(self._ticket)
            self._waiting = None
        if self._stopped_by is not None:
            raise self.error or APIError(500, "the request was stopped", type="server_error")

    def attach(self, work: Cancellable) -> None:
        """Watch `work` (cancelled at once if the request was stopped already)."""
        self._work = work
        if self._stopped_by is not None:
            work.cancel()

    async def stop_on_shutdown(self, shutdown: anyio.Event) -> None:
        """Wait for `shutdown`, then give the work the grace period and cancel it.
        Run as a task; cancel the task when the work ends."""
        await shutdown.wait()
        await asyncio.sleep(self._shutdown_grace)
        self._stop("shutdown")

    async def _watch_shutdown(self, shutting_down: Callable[[], bool]) -> None:
        # uvicorn only sets a flag on SIGTERM; a request that is not streamed would
        # otherwise run on until uvicorn's own timeout cancels it without an answer.
        while not shutting_down():
            await asyncio.sleep(SHUTDOWN_POLL_SECONDS)
        await asyncio.sleep(self._shutdown_grace)
        self._stop("shutdown")

    def stop_watching_client(self) -> None:
        """Stop watching for a disconnect (a streamed response watches the client itself)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def _watch_client(self, request: Request) -> None:
        # The body has been read: what the client sends next can only be its disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._stop("disconnect")

    def _stop(self, reason: str) -> None:
        if self._stopped_by is not None or self._finished:
            return
        self._stopped_by = reason
        if self._waiting is not None:
            self._waiting.cancel()
        if self._work is not None:
            self._work.cancel()

    @property
    def error(self) -> APIError | None:
        """Why the server cut the request short, as the error to report (None if it did not)."""
        if self._stopped_by == "timeout":
            return APIError(
                504,
                f"the request took longer than the server's limit of {self._timeout:g} s",
                type="server_error",
                code="request_timeout",
            )
        if self._stopped_by == "shutdown":
            return APIError(503, "the server is shutting down", type="server_error", code="server_shutdown")
        if self._stopped_by == "disconnect":
            # nginx's status for a request its client abandoned; only the access log sees it.
            return APIError(499, "the client closed the connection", code="client_closed_request")
        return None

    def finish(self, usage: Usage | None = None) -> None:
        """The request ended: stop its work if it still runs, record its latencies
        (if it produced `usage` and was not cut short) and free its slot."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        self.stop_watching_client()
        if self._shutdown_watcher is not None:
            self._shutdown_watcher.cancel()
        if self._work is not None:
            self._work.cancel()  # nothing happens if it has ended
        usage = usage or self.usage
        if usage is not None and self._stopped_by is None:
            self._metrics.observe(usage, self.submitted_at, time.monotonic())
        self._admission.leave(self._ticket)


@contextmanager
def serving(run: RequestRun) -> Iterator[RequestRun]:
    """Run a route's work under `run`: errors become OpenAI-shaped ones, and the run
    ends with the block unless a streamed response took it over (``run.handed_over``)."""
    try:
        yield run
    except Exception as exc:  # noqa: BLE001 - typed errors become OpenAI-shaped ones
        raise error_for(exc) from None
    finally:
        if not run.handed_over:
            run.finish()
