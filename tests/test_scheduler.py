"""Scheduling on the real engine core (fake backend, no model): admission in order,
reservations that grow, preemption of the youngest, and a state machine of random
submits, cancels, conversations, forks and evictions.

The core's own `step` runs here (admit, reserve, draft, decode, verify, emit,
release); `FakeBackend` derives each token from the cells its sequence holds, so a
request that is preempted and resumed, shares a prefix or is restored must end
with exactly what `reference_greedy` computes without any KV.
"""

from __future__ import annotations

import itertools

from fake_kv import FakeBackend, FakeKV, FakeModel, reference_greedy
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvchat.engine.core import EngineCore
from kvchat.engine.drafting import index_request
from kvchat.engine.pinned import PinnedSequence
from kvchat.engine.request import Request, RequestSpec
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.settings import EngineSettings
from kvchat.engine.stream import Completion, Stream

_ids = itertools.count(1)


class Core:
    """An engine core on a fake backend, stepped by the test."""

    def __init__(self, *, n_ctx: int = 256, n_seq_max: int = 8, max_running: int = 8, ram_bytes: int = 0,
                 compact: bool = False, speculation: str = "off", n_batch: int = 64) -> None:
        self.backend = FakeBackend(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch)
        engine_settings = EngineSettings(max_running=max_running, cache_ram_bytes=ram_bytes, compact_pool=compact,
                                         speculation=speculation)  # type: ignore[arg-type]
        self.core = EngineCore(FakeModel(), engine_settings, self.backend, self.backend)  # type: ignore[arg-type]
        self.steps = 0

    @property
    def scheduler(self):  # noqa: ANN201 - the core's scheduler
        return self.core.scheduler

    @property
    def pool(self):  # noqa: ANN201 - the core's pool
        return self.core.pool

    def submit(self, prompt: list[int], max_new: int, *, step: int = 16, pinned: PinnedSequence | None = None,
               prediction: tuple[int, ...] | None = None) -> Request:
        """Queue a greedy request as `Engine.submit` would (its checks passed)."""
        request_id = next(_ids)
        sampling = SamplingParams(temperature=0.0, max_tokens=max_new, prediction=prediction or ())
        spec = RequestSpec(request_id, tuple(prompt), sampling, max_new, step, pinned=pinned)
        request = Request(spec, Stream(request_id, lambda: None))
        request.draft_indexes = index_request(request.prompt, sampling.prediction)
        if pinned is not None:
            pinned.generating = True
        self.core.add(request)
        return request

    def step(self) -> None:
        self.steps += 1
        self.core.step()

    def run(self, limit: int = 10_000) -> None:
        while self.core.busy:
            assert self.steps < limit, "no progress"
            self.step()


_results: dict[int, Completion] = {}


def result(request: Request) -> Completion:
    """The finished request's output, as its caller sees it (read once, then remembered)."""
    if request.request_id not in _results:
        _results[request.request_id] = request.stream.collect()
    return _results[request.request_id]


def expected(request: Request) -> list[int]:
    return reference_greedy(request.prompt, request.max_new_tokens)


def test_requests_without_a_small_max_tokens_all_run_at_once() -> None:
    """Each reserves its prompt and one reservation step, not its whole max_tokens."""
    c = Core(n_ctx=256)
    requests = [c.submit([1, 2, 3, 4 + i], max_new=240) for i in range(6)]  # each could fill the whole pool
    c.step()
    assert len(c.scheduler.running) == 6
    assert all(r.reserved_cells == 4 + 16 for r in requests)


def test_a_full_pool_preempts_the_youngest_and_everyone_finishes_exactly() -> None:
    c = Core(n_ctx=256)
    prompts = [[1, 2, 3, 4 + i] for i in range(40) if len(reference_greedy([1, 2, 3, 4 + i], 100)) == 100][:4]
    requests = [c.submit(prompt, max_new=100) for prompt in prompts]  # 4 x 104 cells > 256
    c.run()
    assert c.scheduler.preemptions > 0
    for request in requests:
        done = result(request)
        assert done.usage.finish_reason == "length" and list(done.token_ids) == expected(request)
    cache = c.pool.cache
    assert c.backend.cells_used() == cache.total_tokens  # everything parked, nothing leaked
    assert c.pool.reserved_cells == 0 and cache.protected_tokens == 0


def test_the_oldest_request_is_never_preempted_for_a_younger_one() -> None:
    c = Core(n_ctx=256)
    oldest = c.submit([9, 9], max_new=200)
    others = [c.submit([1, 2 + i], max_new=200) for i in range(3)]
    c.run()
    assert oldest.preemptions == 0
    assert sum(r.preemptions for r in others) > 0
    assert all(list(result(r).token_ids) == expected(r) for r in [oldest, *others])


def test_a_resumed_request_reuses_its_parked_kv() -> None:
    c = Core(n_ctx=128)
    old = c.submit([1, 2, 3], max_new=100)
    young = c.submit([4, 5, 6], max_new=60)
    while not young.preemptions:
        c.step()
    generated = len(young.generated)
    assert young in c.scheduler.waiting and young.seq_id is None
    rows_before = c.backend.rows_decoded
    c.run()
    assert young.cached_tokens == 0  # usage speaks of the prompt's first admission only
    assert list(result(young).token_ids) == expected(young)
    assert generated > 0 and list(result(old).token_ids) == expected(old)
    # Resuming from the parked cells evaluated far fewer rows than the tokens it held.
    assert c.backend.rows_decoded - rows_before < len(young.generated) + len(old.generated) + 3 + generated


def test_a_request_alone_that_fills_the_pool_ends_with_length() -> None:
    c = Core(n_ctx=64)
    held = list(range(1, 31))
    c.core.pinned.restore(held, FakeKV.state_of_tokens(held))  # a conversation holds cells nobody can take
    prompt = next([1, i] for i in range(1, 60) if len(reference_greedy([1, i], 60)) == 60)
    request = c.submit(prompt, max_new=60)
    c.run()
    done = result(request)
    assert done.usage.finish_reason == "length" and 0 < len(done.token_ids) < 60
    assert list(done.token_ids) == expected(request)[: len(done.token_ids)]
    assert c.backend.cells_used() <= 64


def test_small_max_tokens_reserve_everything_at_once_and_never_grow() -> None:
    c = Core(n_ctx=256)
    request = c.submit([1, 2, 3], max_new=10, step=16)
    c.step()
    assert request.reserved_cells == 3 + 10
    grown = False
    while c.core.busy:
        c.step()
        grown = grown or request.reserved_cells > 13
    assert not grown and list(result(request).token_ids) == expected(request)


class EngineMachine(RuleBasedStateMachine):
    """Random submits, cancels, conversations, forks and evictions on the real core:
    after every step the KV memory holds what the bookkeeping says, cells never run
    out, and at the end every request has exactly its own tokens and nothing leaked."""

    @initialize(n_ctx=st.sampled_from([64, 128, 256]), max_running=st.integers(1, 6),
                ram=st.sampled_from([0, 1 << 20]), compact=st.booleans(), speculation=st.sampled_from(["off", "auto"]),
                n_batch=st.sampled_from([8, 64]))
    def start(self, n_ctx: int, max_running: int, ram: int, compact: bool, speculation: str, n_batch: int) -> None:
        self.c = Core(n_ctx=n_ctx, n_seq_max=8, max_running=max_running, ram_bytes=ram, compact=compact,
                      speculation=speculation, n_batch=n_batch)
        self.requests: list[Request] = []
        self.cancelled: set[int] = set()
        self.conversations: list[PinnedSequence] = []
        self.conversations_held_cells = False

    @rule(prefix=st.integers(0, 3), extra=st.lists(st.integers(1, 64), min_size=1, max_size=12),
          max_new=st.integers(1, 80), step=st.sampled_from([1, 4, 16]), predict=st.booleans())
    def submit(self, prefix: int, extra: list[int], max_new: int, step: int, predict: bool) -> None:
        prompt = [1, 2, 3][:prefix] + extra
        if len(prompt) + max_new > self.c.backend.n_ctx:  # the engine refuses it at submit
            return
        prediction = tuple(reference_greedy(prompt, max_new)[: max_new // 2]) + (5, 6) if predict else None
        self.requests.append(self.c.submit(prompt, max_new, step=step, prediction=prediction))

    @precondition(lambda self: any(not r.stream.done for r in self.requests))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from([r for r in self.requests if not r.stream.done]))
        request.cancel_requested = True
        self.cancelled.add(request.request_id)

    @precondition(lambda self: self.c.core.busy)
    @rule(n=st.integers(1, 20))
    def steps(self, n: int) -> None:
        for _ in range(n):
            self.c.step()
            self.kv_agrees_with_the_bookkeeping()

    @precondition(lambda self: len(self.conversations) < 2 and self.c.pool.free_sequences > 2)
    @rule(tokens=st.lists(st.integers(1, 64), min_size=1, max_size=10))
    def restore_conversation(self, tokens: list[int]) -> None:
        if self.c.pool.cells_in_use() + len(tokens) <= self.c.backend.n_ctx // 2:
            self.conversations.append(self.c.core.pinned.restore(tokens, FakeKV.state_of_tokens(tokens)))
            self.conversations_held_cells = True

    @precondition(lambda self: any(not p.generating for p in self.conversations) and self.c.pool.free_sequences > 2)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from([p for p in self.conversations if not p.generating]))
        self.conversations.append(self.c.core.pinned.fork(parent))

    @precondition(lambda self: any(not p.generating for p in self.conversations))
    @rule(data=st.data(), extra=st.lists(st.integers(1, 64), min_size=1, max_size=6), max_new=st.integers(1, 8))
    def converse(self, data: st.DataObject, extra: list[int], max_new: int) -> None:
        pinned = data.draw(st.sampled_from([p for p in self.conversations if not p.generating]))
        prompt = [*pinned.tokens, *pinned.unevaluated, *extra]
        if self.c.pool.cells_in_use() + len(prompt) + max_new <= self.c.backend.n_ctx // 2:
            self.requests.append(self.c.submit(prompt, max_new, pinned=pinned))

    @precondition(lambda self: any(not p.generating for p in self.conversations))
    @rule(data=st.data())
    def close_conversation(self, data: st.DataObject) -> None:
        pinned = data.draw(st.sampled_from([p for p in self.conversations if not p.generating]))
        self.c.core.pinned.unpin(pinned)
        self.conversations.remove(pinned)

    @rule()
    def evict(self) -> None:
        self.c.pool.evict_lru()

    @invariant()
    def kv_agrees_with_the_bookkeeping(self) -> None:
        if not hasattr(self, "c"):
            return
        c, backend = self.c, self.c.backend
        cache = c.pool.cache
        cache.check_integrity()
        for request in c.scheduler.running:
            assert backend.tokens(request.seq_id) == list(request.kv_tokens)
        for holder, tokens in cache.held_tokens().items():
            assert backend.tokens(holder) == list(tokens)
        c.pool.check_parked()
        for pinned in self.conversations:
            if not pinned.generating:
                assert backend.tokens(pinned.seq_id) == pinned.tokens
        assert backend.cells_used() <= c.pool.cells_in_use() <= backend.n_ctx

    def teardown(self) -> None:
        if not hasattr(self, "c"):
            return
        self.c.run()
        for request in self.requests:
            done = result(request)
            if request.pinned is not None:
                history = request.prompt
                assert list(done.token_ids) == reference_greedy(history, request.max_new_tokens)[: len(done.token_ids)]
            elif request.request_id in self.cancelled:
                assert list(done.token_ids) == expected(request)[: len(done.token_ids)]
            elif self.conversations_held_cells:  # they may have left too little room: ended early
                assert list(done.token_ids) == expected(request)[: len(done.token_ids)]
                assert len(done.token_ids) == len(expected(request)) or done.usage.finish_reason == "length"
            else:  # each fits the pool on its own, so each completes
                assert list(done.token_ids) == expected(request)
        for pinned in list(self.conversations):
            self.c.core.pinned.unpin(pinned)
        pool = self.c.pool
        assert pool.reserved_cells == 0 and pool.cache.protected_tokens == 0 and pool.pinned_cells == 0
        assert self.c.backend.cells_used() == pool.cache.total_tokens


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


def test_a_request_that_waits_for_a_shared_prompt_lets_the_ones_behind_it_go_first() -> None:
    """The second request shares 300 tokens with the first, which evaluates them over
    several steps: it waits for them (and then shares them), while an unrelated request
    queued after it is admitted at once."""
    c = Core(n_ctx=1024, n_batch=64)
    shared = [1 + (i * 7) % 50 for i in range(300)]
    first = c.submit(shared + [51], max_new=4)
    second = c.submit(shared + [52], max_new=4)
    other = c.submit([53, 54, 55], max_new=4)
    c.step()
    assert c.scheduler.running == [first, other] and list(c.scheduler.waiting) == [second]
    c.run()
    assert second.cached_tokens == len(shared) and first.cached_tokens == 0
    for request in (first, second, other):
        assert list(result(request).token_ids) == expected(request)
