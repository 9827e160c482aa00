"""`Scheduler`: admission in order, reservations that grow, preemption of the youngest (no model).

The engine's steps are simulated on `FakeKV`: every running request evaluates
its pending tokens and "samples" a token that depends only on its id and
position, so a request that is preempted and resumed must end with exactly the
tokens it would have generated without the interruption.
"""

from __future__ import annotations

import itertools

from fake_kv import FakeKV
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvchat.engine.admission import Admission
from kvchat.engine.kv_pool import KVPool
from kvchat.engine.pinning import PinnedSequences
from kvchat.engine.prefix_cache import PrefixCache
from kvchat.engine.request import Request
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.scheduler import Scheduler
from kvchat.engine.state_store import StateStore
from kvchat.engine.stream import Stream

_ids = itertools.count(1)


def token_for(request: Request, index: int) -> int:
    """The token a request "samples" at generated position `index`."""
    return (request.request_id * 7 + index * 3) % 50 + 100


class Sim:
    """A scheduler on a fake KV memory, and a loop that plays the engine's steps."""

    def __init__(self, *, n_ctx: int = 256, n_seq_max: int = 8, max_running: int = 8, ram_bytes: int = 0,
                 compact: bool = False) -> None:
        self.kv = FakeKV(n_ctx=n_ctx, n_seq_max=n_seq_max)
        ticks = itertools.count(1)
        cache = PrefixCache(clock=lambda: float(next(ticks)))
        store = StateStore(ram_budget_bytes=ram_bytes) if ram_bytes else None
        self.pool = KVPool(self.kv, cache=cache, store=store)  # type: ignore[arg-type]
        self.pinned = PinnedSequences(self.pool)
        self.scheduler = Scheduler(self.pool, Admission(self.pool, compact=compact), self.pinned,
                                   max_running=max_running)
        self.finished: dict[int, tuple[Request, str]] = {}
        self.first_token_step: dict[int, int] = {}
        self.steps = 0

    def submit(self, prompt: list[int], max_new: int, *, step: int = 16) -> Request:
        request_id = next(_ids)
        request = Request(request_id, tuple(prompt), SamplingParams(), max_new, Stream(request_id, lambda: None),
                          step)
        self.scheduler.add(request)
        return request

    def finish(self, request: Request, reason: str) -> None:
        self.scheduler.remove(request)
        self.pool.finish(request, keep=True)
        self.finished[request.request_id] = (request, reason)

    def step(self) -> None:
        self.steps += 1
        self.scheduler.admit()
        for request in self.scheduler.reserve_step():
            self.finish(request, "length")
        for request in list(self.scheduler.running):
            assert request.own_cells + len(request.pending) <= request.reserved_cells  # covered before evaluating
            assert request.seq_id is not None
            self.kv.append(request.seq_id, request.n_past, request.pending)
            request.n_past += len(request.pending)
            request.pending = []
            request.record_token(token_for(request, len(request.generated)))
            self.first_token_step.setdefault(request.request_id, self.steps)
            if len(request.generated) >= request.max_new_tokens:
                self.finish(request, "length")

    def run(self, limit: int = 10_000) -> None:
        while self.scheduler.running or self.scheduler.waiting:
            assert self.steps < limit, "no progress"
            self.step()


def expected_tokens(request: Request) -> list[int]:
    return [token_for(request, i) for i in range(request.max_new_tokens)]


def test_requests_without_a_small_max_tokens_all_run_at_once() -> None:
    """Each reserves its prompt and one reservation step, not its whole max_tokens."""
    sim = Sim(n_ctx=256)
    requests = [sim.submit([1, 2, 3, i], max_new=240) for i in range(6)]  # each could fill the whole pool
    sim.step()
    assert len(sim.scheduler.running) == 6
    assert all(r.reserved_cells == 4 + 16 for r in requests)


def test_a_full_pool_preempts_the_youngest_and_everyone_finishes_exactly() -> None:
    sim = Sim(n_ctx=256)
    requests = [sim.submit([1, 2, 3, i], max_new=100) for i in range(4)]  # 4 x 104 cells > 256
    sim.run()
    assert sim.scheduler.preemptions > 0
    for request in requests:
        finished, reason = sim.finished[request.request_id]
        assert reason == "length" and list(finished.generated) == expected_tokens(request)
    assert sim.kv.cells_used() == sim.pool.cache.total_tokens  # everything parked, nothing leaked
    assert sim.pool.reserved_cells == 0 and sim.pool.cache.protected_tokens == 0


def test_the_oldest_request_is_never_preempted_for_a_younger_one() -> None:
    sim = Sim(n_ctx=256)
    oldest = sim.submit([9, 9], max_new=200)
    others = [sim.submit([1, i], max_new=200) for i in range(3)]
    sim.run()
    assert oldest.preemptions == 0
    assert sum(r.preemptions for r in others) > 0
    assert all(sim.finished[r.request_id][1] == "length" for r in [oldest, *others])


def test_a_resumed_request_reuses_its_parked_kv() -> None:
    sim = Sim(n_ctx=128)
    old = sim.submit([1, 2, 3], max_new=100)
    young = sim.submit([4, 5, 6], max_new=60)
    while not young.preemptions:
        sim.step()
    generated = len(young.generated)
    assert young in sim.scheduler.waiting and young.seq_id is None
    sim.run()
    assert young.cached_tokens == 0  # usage speaks of the prompt's first admission only
    assert list(sim.finished[young.request_id][0].generated) == expected_tokens(young)
    assert generated > 0 and list(sim.finished[old.request_id][0].generated) == expected_tokens(old)


def test_a_request_alone_that_fills_the_pool_ends_with_length() -> None:
    sim = Sim(n_ctx=64)
    conversation = sim.pinned.pin()  # holds cells nobody can take
    sim.kv.append(conversation.seq_id, 0, list(range(30)))
    conversation.tokens = list(range(30))
    conversation.own_cells = 30
    sim.pool.pinned_cells += 30
    request = sim.submit([1, 2], max_new=60)
    sim.run()
    finished, reason = sim.finished[request.request_id]
    assert reason == "length" and 0 < len(finished.generated) < 60
    assert sim.kv.cells_used() <= 64


def test_small_max_tokens_reserve_everything_at_once_and_never_grow() -> None:
    sim = Sim(n_ctx=256)
    request = sim.submit([1, 2, 3], max_new=10, step=16)
    sim.step()
    assert request.reserved_cells == 3 + 10
    reserved = request.reserved_cells
    sim.run()
    assert reserved == 13 and sim.finished[request.request_id][1] == "length"


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals and steps on a small pool: every request finishes with exactly
    its own tokens, cells never run out, and nothing leaks."""

    @initialize(n_ctx=st.sampled_from([64, 128, 256]), max_running=st.integers(1, 6),
                ram=st.sampled_from([0, 1 << 20]), compact=st.booleans())
    def start(self, n_ctx: int, max_running: int, ram: int, compact: bool) -> None:
        self.sim = Sim(n_ctx=n_ctx, n_seq_max=8, max_running=max_running, ram_bytes=ram, compact=compact)
        self.requests: list[Request] = []

    @rule(prefix=st.integers(0, 3), extra=st.lists(st.integers(0, 9), min_size=1, max_size=12),
          max_new=st.integers(1, 80), step=st.sampled_from([1, 4, 16]))
    def submit(self, prefix: int, extra: list[int], max_new: int, step: int) -> None:
        prompt = [1, 2, 3][:prefix] + extra
        if len(prompt) + max_new <= self.sim.kv.n_ctx:  # the engine refuses the rest at submit
            self.requests.append(self.sim.submit(prompt, max_new, step=step))

    @precondition(lambda self: self.sim.scheduler.running or self.sim.scheduler.waiting)
    @rule(n=st.integers(1, 20))
    def steps(self, n: int) -> None:
        for _ in range(n):
            self.sim.step()

    @invariant()
    def kv_agrees_with_the_requests(self) -> None:
        sim = self.sim
        sim.pool.cache.check_integrity()
        for request in sim.scheduler.running:
            assert sim.kv.tokens(request.seq_id) == list(request.kv_tokens)
        assert sim.kv.cells_used() <= sim.pool.cells_in_use() <= sim.kv.n_ctx

    def teardown(self) -> None:
        if not hasattr(self, "sim"):
            return
        self.sim.run()
        for request in self.requests:  # each fits the pool on its own, so each completes
            finished, reason = self.sim.finished[request.request_id]
            assert reason == "length" and list(finished.generated) == expected_tokens(request)
        assert self.sim.pool.reserved_cells == 0 and self.sim.pool.cache.protected_tokens == 0


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
