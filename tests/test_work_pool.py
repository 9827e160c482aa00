"""`WorkPool`, the server's bounded threads for request work (pure logic, no model):
its thread and queue bounds, skipped jobs, cancel checks, discarded results, close."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from kvchat.server.admission import Admission
from kvchat.server.errors import APIError
from kvchat.server.runs import RequestRun
from kvchat.server.work_pool import CancelFlag, WorkPool, WorkSkipped


def pool(threads: int = 2, queued: int = 2) -> WorkPool:
    return WorkPool(threads=threads, max_queued=queued, retry_after=3)


def gate() -> Admission:
    metrics = SimpleNamespace(in_flight=SimpleNamespace(set=lambda value: None), observe=lambda *args: None)
    return Admission(max_running=4, max_queued=4, key_share=1.0, shared=False, retry_after=1, metrics=metrics)


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_jobs_run_on_at_most_threads_threads_and_return_results_and_errors() -> None:
    async def scenario() -> None:
        work = pool(threads=2, queued=8)
        running = 0
        most = 0
        lock = threading.Lock()
        names: set[str] = set()

        def job(index: int) -> int:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
                names.add(threading.current_thread().name)
            time.sleep(0.02)
            with lock:
                running -= 1
            return index * index

        results = await asyncio.gather(*(work.run(lambda cancelled, i=i: job(i)) for i in range(6)))
        assert results == [i * i for i in range(6)]
        assert most == 2 and names == {"kvchat-work"}

        def fails(cancelled) -> None:
            raise ValueError("bad input")

        with pytest.raises(ValueError, match="bad input"):
            await work.run(fails)
        await until(lambda: work.thread_count == 0)  # threads end when no job waits

    asyncio.run(scenario())


def test_past_the_queue_bound_a_job_gets_an_openai_shaped_503_before_any_work() -> None:
    async def scenario() -> None:
        work = pool(threads=1, queued=1)
        release = threading.Event()
        started = threading.Event()
        ran: list[str] = []

        def blocking(cancelled) -> str:
            started.set()
            release.wait(5)
            return "first"

        first = asyncio.create_task(work.run(blocking))
        await until(started.is_set)
        second = asyncio.create_task(work.run(lambda cancelled: ran.append("second") or "second"))
        await until(lambda: work.waiting == 1)
        with pytest.raises(APIError) as info:
            await work.run(lambda cancelled: ran.append("third"))
        error = info.value
        assert (error.status, error.type, error.code) == (503, "server_error", "server_busy")
        assert error.headers == {"Retry-After": "3"} and "busy" in error.message
        release.set()
        assert await first == "first" and await second == "second" and ran == ["second"]

    asyncio.run(scenario())


def test_a_job_whose_request_stopped_before_it_started_is_skipped() -> None:
    async def scenario() -> None:
        work = pool(threads=1, queued=4)
        release = threading.Event()
        started = threading.Event()

        def blocking(cancelled) -> None:
            started.set()
            release.wait(5)

        holder = asyncio.create_task(work.run(blocking))
        await until(started.is_set)
        ran: list[str] = []
        # A request whose time limit passes while its job waits for the thread: 504, and the job never runs.
        late = RequestRun(gate(), "", SimpleNamespace(observe=lambda *args: None), timeout=0.05, shutdown_grace=0)
        waiting = asyncio.create_task(work.run_for(late, lambda cancelled: ran.append("late")))
        # A job whose flag is set while it waits is skipped too.
        flag = CancelFlag()
        flagged = asyncio.create_task(work.run(lambda cancelled: ran.append("flagged"), cancel=flag))
        await asyncio.sleep(0.1)
        flag.cancel()
        release.set()
        await holder
        with pytest.raises(APIError) as info:
            await waiting
        assert info.value.status == 504 and info.value.code == "request_timeout"
        with pytest.raises(WorkSkipped):
            await flagged
        late.finish()
        await until(lambda: work.thread_count == 0)
        assert ran == []

    asyncio.run(scenario())


def test_a_running_job_sees_its_request_stop_through_the_cancel_check() -> None:
    async def scenario() -> None:
        work = pool()
        run = RequestRun(gate(), "", SimpleNamespace(observe=lambda *args: None), timeout=0.1, shutdown_grace=0)
        phases: list[int] = []

        def phased(cancelled) -> str:
            for phase in range(500):  # 5 s of work, checked between phases
                if cancelled():
                    return "stopped"
                phases.append(phase)
                time.sleep(0.01)
            return "done"

        discarded: list[str] = []
        started = time.monotonic()
        with pytest.raises(APIError) as info:
            await work.run_for(run, phased, discard=discarded.append)
        assert info.value.code == "request_timeout" and time.monotonic() - started < 2
        assert discarded == ["stopped"] and len(phases) < 100
        run.finish()

    asyncio.run(scenario())


def test_a_result_nobody_awaits_any_more_is_discarded() -> None:
    async def scenario() -> None:
        work = pool()
        started = threading.Event()
        release = threading.Event()
        discarded: list[str] = []

        def job(cancelled) -> str:
            started.set()
            release.wait(5)
            return "stream"

        task = asyncio.create_task(work.run(job, discard=discarded.append))
        await until(started.is_set)
        task.cancel()  # the route's task is cancelled while its job runs
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await until(lambda: discarded == ["stream"])

    asyncio.run(scenario())


def test_close_skips_waiting_jobs_and_waits_for_running_ones() -> None:
    async def scenario() -> None:
        work = pool(threads=1, queued=4)
        started = threading.Event()
        finished: list[str] = []

        def slow(cancelled) -> str:
            started.set()
            time.sleep(0.2)
            finished.append("slow")
            return "slow"

        running = asyncio.create_task(work.run(slow))
        await until(started.is_set)
        waiting = asyncio.create_task(work.run(lambda cancelled: finished.append("waiting")))
        await until(lambda: work.waiting == 1)
        await asyncio.to_thread(work.close)
        assert finished == ["slow"] and work.thread_count == 0
        assert await running == "slow"
        with pytest.raises(WorkSkipped):
            await waiting
        with pytest.raises(WorkSkipped):
            await work.run(lambda cancelled: finished.append("late"))
        assert finished == ["slow"]

    asyncio.run(scenario())


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError):
        WorkPool(threads=0, max_queued=1, retry_after=1)
