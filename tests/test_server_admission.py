"""The server's admission (per-key shares of the running places and the queue) and
a request run's stop rules, without a model or a server."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kvchat.server.admission import Admission, Ticket
from kvchat.server.errors import APIError
from kvchat.server.runs import RequestRun, serving


class Gauge:
    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value


def metrics() -> SimpleNamespace:
    return SimpleNamespace(in_flight=Gauge(), observe=lambda *args: None)


def admission(*, running: int = 4, queued: int = 6, share: float = 0.5, shared: bool = True) -> Admission:
    return Admission(max_running=running, max_queued=queued, key_share=share, shared=shared, retry_after=2,
                     metrics=metrics())


def refused(admission: Admission, key: str) -> APIError:
    with pytest.raises(APIError) as info:
        admission.enter(key)
    assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.headers == {"Retry-After": "2"}
    return info.value


def test_shares_round_up_and_keep_one_running_place() -> None:
    gate = admission(running=4, queued=6, share=0.5)
    assert (gate.capacity, gate.key_running, gate.key_capacity) == (10, 2, 5)
    gate = admission(running=3, queued=0, share=0.2)
    assert (gate.key_running, gate.key_capacity) == (1, 1)


def test_one_key_gets_its_share_and_then_429_while_another_key_is_admitted() -> None:
    gate = admission(running=4, queued=6, share=0.5)
    tickets = [gate.enter("a") for _ in range(5)]
    assert "share" in refused(gate, "a").message
    other = gate.enter("b")
    assert gate.in_flight == 6
    for ticket in tickets:
        gate.leave(ticket)
    gate.leave(other)
    assert gate.in_flight == 0 and not gate._tenants


async def take_places(gate: Admission, tickets: list[Ticket]) -> None:
    for ticket in tickets:
        await gate.take_place(ticket)


@pytest.mark.parametrize("gate", [admission(shared=False), admission(share=1.0)], ids=["no keys", "share 1"])
def test_without_shares_one_key_may_fill_the_server(gate: Admission) -> None:
    assert gate.key_running is None and gate.key_capacity == gate.capacity == 10
    tickets = [gate.enter("") for _ in range(10)]
    assert "busy" in refused(gate, "").message
    # No per-key gate: nobody waits here (beyond max_running, requests queue in the engine).
    asyncio.run(asyncio.wait_for(take_places(gate, tickets), 5))


def test_running_places_go_in_arrival_order_and_a_cancelled_wait_leaks_nothing() -> None:
    async def scenario() -> None:
        gate = admission(running=2, queued=4, share=0.5)  # one running place per key
        first, second, third = (gate.enter("a") for _ in range(3))
        await gate.take_place(first)
        waiting = [asyncio.create_task(gate.take_place(t)) for t in (second, third)]
        await asyncio.sleep(0)
        assert not any(task.done() for task in waiting)
        waiting[0].cancel()  # the second request gives up (time limit, disconnect)
        await asyncio.sleep(0)
        gate.leave(second)
        gate.leave(first)
        await asyncio.wait_for(waiting[1], 5)  # the third gets the place
        assert third.holds_place and not second.holds_place
        gate.leave(third)
        gate.leave(third)  # a second leave does nothing
        assert gate.in_flight == 0 and not gate._tenants

    asyncio.run(scenario())


class Work:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def test_the_time_limit_counts_the_wait_for_a_running_place() -> None:
    async def scenario() -> None:
        gate = admission(running=2, queued=4, share=0.5)
        holder = RequestRun(gate, "a", metrics(), timeout=None, shutdown_grace=0)
        await holder.start()
        late = RequestRun(gate, "a", metrics(), timeout=0.05, shutdown_grace=0)
        with pytest.raises(APIError) as info, serving(late):
            await asyncio.wait_for(late.start(), 5)
        assert info.value.status == 504 and info.value.code == "request_timeout"
        work = Work()
        late.attach(work)  # work that shows up after the stop is cancelled at once
        assert work.cancelled == 1
        holder.finish()
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_a_run_stops_its_work_on_time_and_on_finish() -> None:
    async def scenario() -> None:
        gate = admission()
        run = RequestRun(gate, "", metrics(), timeout=0.05, shutdown_grace=0)
        await run.start()
        work = Work()
        run.attach(work)
        await asyncio.sleep(0.2)
        assert work.cancelled == 1 and run.error is not None and run.error.code == "request_timeout"
        run.finish()
        run.finish()
        assert gate.in_flight == 0

    asyncio.run(scenario())
