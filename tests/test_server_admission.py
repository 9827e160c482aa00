"""The server's admission (per-key shares of the running places and the queue, one
place per prompt or input) and a request run's stop rules, without a model or a
server; and, over HTTP on the real model, that one key's many-prompt completion or
many-input embedding does not starve another key."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from helpers import assert_idle
from http_server import RunningServer

from kvchat import Engine
from kvchat.server import ServerSettings, create_app
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


def refused(admission: Admission, key: str, items: int = 1) -> APIError:
    with pytest.raises(APIError) as info:
        admission.enter(key, items)
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


# -- one place per item: a completion's prompts, an embedding's inputs ----------------------------

def test_a_request_counts_one_place_per_item_up_to_its_keys_running_places() -> None:
    gate = admission(running=16, queued=8, share=0.125)  # two running places and one waiting per key
    assert (gate.key_running, gate.key_capacity, gate.most_places) == (2, 3, 2)
    assert [gate.places(n) for n in (1, 2, 16, 0)] == [1, 2, 2, 1]
    big = gate.enter("a", 16)  # more prompts than the key's running places: its whole share
    assert big.weight == 2 and gate.in_flight == 2 and gate.requests == 1
    small = gate.enter("a")
    assert "share" in refused(gate, "a").message  # 3 of 3 places: the key is full...
    other = gate.enter("b", 16)  # ...and another key is taken in at once
    for ticket in (big, small, other):
        gate.leave(ticket)
    assert gate.in_flight == 0 and gate.requests == 0 and not gate._tenants
    # Without shares a request counts its prompts (at most max_running) against the server's bound.
    gate = admission(running=4, queued=6, shared=False)
    assert gate.places(16) == 4 and gate.enter("", 3).weight == 3 and gate.enter("", 16).weight == 4
    assert "busy" in refused(gate, "", 16).message  # 7 of 10 places and 4 more: all at once or none
    assert gate.in_flight == 7 and gate.requests == 2
    assert gate.enter("", 3).weight == 3


def test_a_large_request_takes_its_places_together_in_arrival_order() -> None:
    async def scenario() -> None:
        gate = admission(running=8, queued=8, share=0.5)  # four running places per key
        one = gate.enter("a")
        await gate.take_place(one)
        big = gate.enter("a", 16)  # counts 4: waits until the key's places are all free
        late = gate.enter("a")  # arrives after it: not served before it, though a place is free
        waiting = [asyncio.create_task(gate.take_place(t)) for t in (big, late)]
        other = gate.enter("b", 4)
        await asyncio.wait_for(gate.take_place(other), 1)  # another key's request runs at once
        await asyncio.sleep(0)
        assert not any(task.done() for task in waiting)
        gate.leave(one)
        await asyncio.wait_for(waiting[0], 1)
        await asyncio.sleep(0)
        assert big.holds_place and not waiting[1].done()
        gate.leave(big)
        await asyncio.wait_for(waiting[1], 1)
        # A cancelled wait of a large request frees the way for those behind it.
        again = gate.enter("a", 4)
        behind = gate.enter("a")
        tasks = [asyncio.create_task(gate.take_place(t)) for t in (again, behind)]
        await asyncio.sleep(0)
        assert not any(task.done() for task in tasks)
        tasks[0].cancel()
        await asyncio.wait_for(tasks[1], 1)
        for ticket in (late, again, behind, other):
            gate.leave(ticket)
        assert gate.in_flight == 0 and not gate._tenants

    asyncio.run(scenario())


# -- over HTTP: one key's many-prompt request does not starve another key -------------------------

KEY_A, KEY_B = "key-a-secret", "key-b-secret"
NO_END = {"1": -100, "106": -100}  # Gemma 3's end tokens banned: generation runs to max_tokens
SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank. "


@pytest.fixture
def shared_server(gemma_engine: Engine) -> Iterator[tuple[RunningServer, Engine]]:
    """Two keys on the shared Gemma engine (16 running places): each key holds two."""
    settings = ServerSettings(model_name="gemma", api_keys=(KEY_A, KEY_B), key_share=0.125, max_queued=8)
    app = create_app(gemma_engine, settings)
    assert app.state.kvchat.admission.key_running == 2
    with RunningServer(app) as server:
        yield server, gemma_engine
    assert_idle(gemma_engine)


def post(server: RunningServer, path: str, key: str, body: dict, done: dict, name: str) -> httpx.Response:
    response = httpx.post(f"{server.url}{path}", json={"model": "gemma", **body}, timeout=600,
                          headers={"Authorization": f"Bearer {key}"})
    done[name] = time.monotonic()
    return response


def test_a_sixteen_prompt_completion_holds_its_keys_share_and_another_key_runs_at_once(shared_server) -> None:
    server, engine = shared_server
    done: dict[str, float] = {}
    prompts = [f"Count with me: {i}, {i + 1}," for i in range(16)]
    big_body = {"prompt": prompts, "max_tokens": 8, "temperature": 0, "logit_bias": NO_END}
    answers: dict[str, httpx.Response] = {}
    big = threading.Thread(target=lambda: answers.update(
        a=post(server, "/v1/completions", KEY_A, big_body, done, "a")))
    busiest = 0
    big.start()
    deadline = time.monotonic() + 120
    while engine.stats().active == 0:
        assert time.monotonic() < deadline and big.is_alive()
        time.sleep(0.005)
    small = threading.Thread(target=lambda: answers.update(b=post(
        server, "/v1/completions", KEY_B, {"prompt": "Hello", "max_tokens": 4, "logit_bias": NO_END}, done, "b")))
    small.start()
    while big.is_alive():
        stats = engine.stats()
        busiest = max(busiest, stats.active + stats.queued)
        time.sleep(0.005)
    big.join()
    small.join()
    assert answers["a"].status_code == 200 and answers["b"].status_code == 200, answers
    choices = answers["a"].json()["choices"]
    assert sorted(choice["index"] for choice in choices) == list(range(16))
    assert answers["a"].json()["usage"]["completion_tokens"] == 16 * 8
    # Key A never had more than its two places with the engine, so key B's request ran at once
    # (with all 16 prompts submitted together, it would have queued behind them all).
    assert busiest <= 3, busiest
    assert done["b"] < done["a"]


def test_a_large_embedding_request_does_not_hold_the_embedding_thread_from_another_key(shared_server) -> None:
    server, _ = shared_server
    done: dict[str, float] = {}
    answers: dict[str, httpx.Response] = {}
    texts = [SENTENCE * 4] * 8  # four waves of two texts
    big = threading.Thread(target=lambda: answers.update(
        a=post(server, "/v1/embeddings", KEY_A, {"input": texts}, done, "a")))
    big.start()
    embeddings = server.server.config.app.state.kvchat.embeddings
    deadline = time.monotonic() + 120
    while not embeddings.running:  # A's first wave is on the embedding thread
        assert time.monotonic() < deadline and big.is_alive()
        time.sleep(0.005)
    answers["b"] = post(server, "/v1/embeddings", KEY_B, {"input": ["hello"]}, done, "b")
    big.join()
    assert answers["a"].status_code == 200 and answers["b"].status_code == 200, answers
    vectors = answers["a"].json()["data"]
    assert [item["index"] for item in vectors] == list(range(8))
    assert vectors[0]["embedding"] == vectors[-1]["embedding"]  # the same text in the first and last wave
    assert done["b"] < done["a"]  # B waited for one wave of A's, not for all of them
