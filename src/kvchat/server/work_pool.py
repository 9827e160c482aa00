"""`WorkPool`: the server's threads for the work a request brings before the engine sees it.

Rendering a chat template, fitting a conversation that overflows the context,
tokenizing prompts and predictions, compiling a grammar: CPU work whose size the
request chooses. The routes run it here, neither on the event loop (which must
keep answering every other request, ``/health`` included) nor on asyncio's
default executor (shared with everything else, with a queue of any length).

- At most `threads` jobs run at once. Threads start with work and end when no
  job waits (as the embedding worker's do), so an app whose lifespan never
  runs (some ASGI hosts, the tests' servers) leaves no thread behind.
- At most `max_queued` jobs wait for a thread; one more is refused at once with
  503 ``server_busy`` and ``Retry-After`` (OpenAI-shaped; the official client
  retries it), before any work.
- A job is skipped, not run, when its request was stopped before a thread took
  it: the client disconnected, the time limit passed, the server shuts down
  (:meth:`WorkPool.run_for` ties a job to its :class:`RequestRun`). A job that
  has started gets the same news through its cancel check, which it reads
  between its phases (:func:`kvchat.chat.complete.complete` does).
- :meth:`WorkPool.close` (the app's shutdown) skips the waiting jobs and waits
  for the running ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from starlette.requests import Request

from kvchat.server.errors import APIError
from kvchat.server.runs import RequestRun

__all__ = ["CancelFlag", "WorkPool", "WorkSkipped", "work_pool"]

T = TypeVar("T")

CancelCheck = Callable[[], bool]
"""What a job reads between its phases: True once its work is no longer wanted."""


class WorkSkipped(Exception):
    """The job's request was stopped (or the pool closed) before a thread took the job: it did not run."""


class CancelFlag:
    """A flag that the event loop sets and a job's thread reads: a
    :class:`~kvchat.server.runs.Cancellable` to attach to a :class:`RequestRun`,
    whose stop (disconnect, time limit, shutdown) sets it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class _Job(Generic[T]):
    """One job: the function, and the future its awaiting coroutine reads."""

    def __init__(
        self,
        work: Callable[[CancelCheck], T],
        flag: CancelFlag,
        discard: Callable[[T], object] | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.work = work
        self.flag = flag
        self.discard = discard
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()

    def run(self) -> None:
        """On a pool thread: run the work, unless it is no longer wanted."""
        if self.flag.is_set():
            self.settle(WorkSkipped())
            return
        try:
            result = self.work(self.flag.is_set)
        except Exception as exc:  # noqa: BLE001 - the awaiting route gets the job's error
            self.settle(exc)
        else:
            self.settle(result)

    def settle(self, outcome: T | BaseException) -> None:
        """Hand `outcome` to the awaiting coroutine (from any thread). A result that
        nobody awaits any more (its coroutine was cancelled) is discarded."""

        def settle() -> None:
            if not self.future.done():
                if isinstance(outcome, BaseException):
                    self.future.set_exception(outcome)
                else:
                    self.future.set_result(outcome)
            elif self.discard is not None and not isinstance(outcome, BaseException):
                self.discard(outcome)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(settle)


class WorkPool:
    """Runs jobs on at most `threads` threads, with at most `max_queued` jobs waiting
    (see the module's docstring). Call :meth:`run` and :meth:`run_for` from the event loop."""

    def __init__(self, *, threads: int, max_queued: int, retry_after: int) -> None:
        if threads < 1 or max_queued < 0:
            raise ValueError("a work pool needs threads >= 1 and max_queued >= 0")
        self.threads = threads
        self.max_queued = max_queued
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._jobs: deque[_Job] = deque()
        self._alive: set[threading.Thread] = set()
        self._running = 0
        self._closed = False

    @property
    def waiting(self) -> int:
        """Jobs waiting for a thread."""
        with self._lock:
            return len(self._jobs)

    @property
    def thread_count(self) -> int:
        """Threads alive (there are none while no job waits or runs)."""
        with self._lock:
            return len(self._alive)

    async def run(
        self,
        work: Callable[[CancelCheck], T],
        *,
        cancel: CancelFlag | None = None,
        discard: Callable[[T], object] | None = None,
    ) -> T:
        """``work(cancelled)`` on a pool thread: its result, or its exception.

        `cancelled` is `cancel`'s check (a flag of the pool's own if None). A job
        whose flag is set before a thread takes it is skipped (:class:`WorkSkipped`).
        If the awaiting coroutine is cancelled, the flag is set, and a result that
        arrives after that goes to `discard` (say, to cancel the engine request the
        work submitted). Raises the 503 ``server_busy`` error, before any work, if
        `max_queued` jobs wait already, and :class:`WorkSkipped` once the pool is closed.
        """
        flag = cancel or CancelFlag()
        job = _Job(work, flag, discard, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise WorkSkipped()
            if self._running + len(self._jobs) >= self.threads + self.max_queued:
                raise APIError(
                    503,
                    f"the server is busy ({len(self._jobs)} requests wait for its {self.threads} work threads); "
                    "retry later",
                    type="server_error",
                    code="server_busy",
                    headers={"Retry-After": str(self.retry_after)},
                )
            self._jobs.append(job)
            idle = len(self._alive) - self._running  # threads about to take a job
            if idle < len(self._jobs) and len(self._alive) < self.threads:
                thread = threading.Thread(target=self._work, name="kvchat-work", daemon=True)
                self._alive.add(thread)
                thread.start()
        try:
            return await job.future
        except asyncio.CancelledError:
            flag.cancel()
            raise

    async def run_for(
        self, run: RequestRun, work: Callable[[CancelCheck], T], *, discard: Callable[[T], object] | None = None
    ) -> T:
        """:meth:`run` for a request's `run`: the work's cancel check turns True when
        the run is stopped (disconnect, time limit, shutdown), and a job whose run
        stopped before it started is skipped. Raises the run's error (504, 499,
        503) if it stopped, before or while the job ran (a result is then handed
        to `discard`), or 503 ``server_shutdown`` if the pool closed first."""
        flag = CancelFlag()
        run.attach(flag)  # already stopped: set at once
        try:
            result = await self.run(work, cancel=flag, discard=discard)
        except WorkSkipped:
            raise run.error or _shutting_down() from None
        except Exception:
            if run.error is not None:  # a stopped run reports why it stopped
                raise run.error from None
            raise
        if run.error is not None:
            if discard is not None:
                discard(result)
            raise run.error
        return result

    def close(self) -> None:
        """Skip the jobs that wait, and wait for the running ones to end. Jobs
        submitted later are skipped too."""
        with self._lock:
            self._closed = True
            waiting = list(self._jobs)
            self._jobs.clear()
            threads = list(self._alive)
        for job in waiting:
            job.settle(WorkSkipped())
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                if not self._jobs:
                    self._alive.discard(me)
                    return
                job = self._jobs.popleft()
                self._running += 1
            try:
                job.run()
            finally:
                with self._lock:
                    self._running -= 1


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="server_shutdown")


def work_pool(request: Request) -> WorkPool:
    """The work pool of the app that serves `request` (made by :func:`kvchat.server.app.create_app`)."""
    pool: WorkPool = request.app.state.kvchat_work
    return pool
