"""The life of one model request on the server: admission, time limit, shutdown, metrics.

- :class:`Admission` bounds the requests in flight (running + queued); beyond
  it a request gets 429 with ``Retry-After`` at once, before any work.
- :class:`RequestRun` holds one admitted request: it cancels the request's
  stream when the time limit passes or when the server shuts down (after the
  grace period), remembers why, records latency metrics and frees its slot.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import anyio

from kvchat.engine import Usage
from kvchat.server.errors import APIError
from kvchat.server.metrics import ServerMetrics


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Admission:
    """At most `capacity` model requests in flight; the rest are refused with 429."""

    def __init__(self, capacity: int, retry_after: int, metrics: ServerMetrics) -> None:
        self.capacity = capacity
        self.retry_after = retry_after
        self.in_flight = 0
        self._metrics = metrics

    def enter(self) -> None:
        """Take a slot or raise the 429 error. Call from the event loop only."""
        if self.in_flight >= self.capacity:
            raise APIError(
                429,
                f"the server is busy ({self.in_flight} requests in flight); retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.in_flight += 1
        self._metrics.in_flight.set(self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1
        self._metrics.in_flight.set(self.in_flight)


class RequestRun:
    """One admitted request. Use :meth:`attach` once its stream exists and
    :meth:`finish` exactly when it ends (any path; further calls do nothing)."""

    def __init__(
        self, admission: Admission, metrics: ServerMetrics, *, timeout: float | None, shutdown_grace: float
    ) -> None:
        admission.enter()
        self._admission = admission
        self._metrics = metrics
        self._timeout = timeout
        self._shutdown_grace = shutdown_grace
        self._stream: Cancellable | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stopped_by: str | None = None
        self._finished = False
        self.submitted_at = time.monotonic()
        self.usage: Usage | None = None
        """The request's final usage, once a producer has seen it."""

    def attach(self, stream: Cancellable) -> None:
        """Watch `stream`: cancel it if the request outlives the time limit."""
        self._stream = stream
        if self._timeout is not None:
            remaining = max(self._timeout - (time.monotonic() - self.submitted_at), 0.0)
            self._timer = asyncio.get_running_loop().call_later(remaining, self._stop, "timeout")

    async def stop_on_shutdown(self, shutdown: anyio.Event) -> None:
        """Wait for `shutdown`, then give the stream the grace period and cancel it.
        Run as a task; cancel the task when the stream ends."""
        await shutdown.wait()
        await asyncio.sleep(self._shutdown_grace)
        self._stop("shutdown")

    def _stop(self, reason: str) -> None:
        if self._stopped_by is None and not self._finished and self._stream is not None:
            self._stopped_by = reason
            self._stream.cancel()

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
        return None

    def finish(self, usage: Usage | None = None) -> None:
        """The request ended: record its latencies (if it produced `usage`) and free its slot."""
        if self._finished:
            return
        self._finished = True
        if self._timer is not None:
            self._timer.cancel()
        usage = usage or self.usage
        if usage is not None and self._stopped_by is None:
            self._metrics.observe(usage, self.submitted_at, time.monotonic())
        self._admission.leave()
