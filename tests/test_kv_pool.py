"""The KV pool, admission plans and conversation operations on a fake KV memory (no model).

`FakeKV` records every ``seq_cp``/``seq_rm``/``seq_add`` and holds real token
contents per cell, so the tests check what the pool promises: each parked
sequence's cells hold exactly its tree path, each request's cells hold its
prompt and generated tokens, no cell is used that the accounting does not
count, and a shift never moves cells another sequence shares.
"""

from __future__ import annotations

import itertools
import json

import pytest
from fake_kv import FakeKV
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvchat.engine.admission import MIN_RESTORE_GAIN, Admission, cells_to_reserve
from kvchat.engine.context_shift import ContextShift, shifted_namespace
from kvchat.engine.kv_pool import KVPool
from kvchat.engine.pinned import PinnedSequence
from kvchat.engine.pinning import PinnedSequences
from kvchat.engine.prefix_cache import PrefixCache
from kvchat.engine.request import Request, RequestSpec
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.state_store import SpilledState, StateStore
from kvchat.engine.stream import Stream
from kvchat.errors import InvalidRequestError

_request_ids = itertools.count(1)


class Pool:
    """A pool on a fake KV memory, with its admission and conversation operations."""

    def __init__(self, *, n_ctx: int = 256, n_seq_max: int = 8, ram_bytes: int = 0, compact: bool = False,
                 partial_remove: bool = True) -> None:
        self.kv = FakeKV(n_ctx=n_ctx, n_seq_max=n_seq_max, partial_remove=partial_remove)
        ticks = itertools.count(1)
        self.cache = PrefixCache(clock=lambda: float(next(ticks)))
        store = StateStore(ram_budget_bytes=ram_bytes) if ram_bytes else None
        self.pool = KVPool(self.kv, cache=self.cache, store=store)  # type: ignore[arg-type]
        self.admission = Admission(self.pool, compact=compact)
        self.pinned = PinnedSequences(self.pool)

    def admit(self, prompt: list[int] | tuple[int, ...], *, max_new: int = 4, cache_key: str | None = None,
              shift: ContextShift | None = None) -> Request | None:
        """Admit a request and evaluate its prompt; None if it does not fit."""
        request = new_request(prompt, max_new, cache_key=cache_key, shift=shift)
        if not self.admission.admit(request):
            assert request.seq_id is None
            return None
        prefill(self, request)
        return request

    def run(self, prompt: list[int] | tuple[int, ...], generated: list[int] = (), **options) -> Request:  # type: ignore[assignment]
        """Admit, evaluate, generate and finish a request (parked in the tree)."""
        request = self.admit(prompt, **options)
        assert request is not None
        generate(self, request, generated)
        self.pool.finish(request, keep=True)
        return request


def new_request(prompt: list[int] | tuple[int, ...], max_new: int = 4, *, cache_key: str | None = None,
                pinned: PinnedSequence | None = None, shift: ContextShift | None = None) -> Request:
    """A request as `Engine.submit` makes it (a shifted one in the shifted namespace)."""
    request_id = next(_request_ids)
    spec = RequestSpec(request_id, tuple(prompt), SamplingParams(), max_new, pinned=pinned, shift=shift,
                       cache_key=cache_key if shift is None else shifted_namespace(cache_key),
                       original_cache_key=cache_key if shift is not None else None)
    return Request(spec, Stream(request_id, lambda: None))


def prefill(p: Pool, request: Request) -> None:
    """What the engine's steps do with an admitted request's pending prompt tokens."""
    assert request.seq_id is not None
    p.kv.append(request.seq_id, p.pool.extend(request, len(request.pending)), request.pending)
    request.pending = []


def generate(p: Pool, request: Request, tokens: list[int] | tuple[int, ...]) -> None:
    """Sample `tokens` one by one; each is evaluated in the next step, the last one never."""
    assert request.seq_id is not None and len(request.generated) + len(tokens) <= request.max_new_tokens
    for token in tokens:
        if request.pending:
            prefill(p, request)
        request.record_token(token)


def leaf_path(cache: PrefixCache, seq_id: int) -> list[int]:
    return list(cache.held_tokens()[seq_id])


SYSTEM = [1, 2, 3, 4, 5, 6]


# -- admission plans -------------------------------------------------------------------------------


def test_a_request_shares_the_longest_resident_prefix() -> None:
    p = Pool()
    first = p.run(SYSTEM + [10, 11, 12], generated=[30, 31])
    holder = first.kv_tokens
    plan = p.admission.tree_plan(new_request(list(holder) + [40, 41]))
    assert (plan.source, plan.prefix_tokens) == ("tree", len(holder))
    second = p.admit(list(holder) + [40, 41])
    assert second is not None and second.cached_tokens == second.shared_prefix == len(holder)
    [copy] = [c for c in p.kv.calls if c[0] == "cp"]
    assert copy[2:] == (second.seq_id, 0, len(holder))
    assert p.kv.tokens(second.seq_id) == list(holder) + [40, 41]
    assert p.cache.protected_tokens == len(holder)  # the shared path is locked while the request runs


def test_at_least_one_prompt_token_is_evaluated() -> None:
    p = Pool()
    p.run(SYSTEM, generated=[9])
    again = p.admit(SYSTEM)
    assert again is not None and again.cached_tokens == len(SYSTEM) - 1


def test_a_request_that_does_not_fit_changes_nothing() -> None:
    p = Pool(n_ctx=64)
    p.run(SYSTEM + [7, 8])
    running = p.admit([20, 21, 22], max_new=20)
    assert running is not None
    calls, free = list(p.kv.calls), p.pool.free_sequences
    protected, reserved = p.cache.protected_tokens, p.pool.reserved_cells
    too_big = new_request(SYSTEM + [7, 8, 9], max_new=50)
    assert not p.admission.admit(too_big)
    assert too_big.seq_id is None and too_big.cached_tokens == 0
    assert (p.pool.free_sequences, p.cache.protected_tokens, p.pool.reserved_cells) == (free, protected, reserved)
    assert [c for c in p.kv.calls[len(calls):] if c[0] != "state"] == [("rm", c[1], c[2], c[3])
                                                                       for c in p.kv.calls[len(calls):]
                                                                       if c[0] == "rm"]  # evictions only


def test_reservations_are_what_the_plan_says() -> None:
    p = Pool()
    request = p.admit(SYSTEM + [7], max_new=5)
    assert request is not None and request.reserved_cells == cells_to_reserve(request, 0) == 7 + 5
    assert p.pool.cells_in_use() == 12
    generate(p, request, [1, 2])
    p.pool.finish(request, keep=True)
    assert p.pool.reserved_cells == 0 and p.pool.cells_in_use() == p.cache.total_tokens == 8


def test_spilled_state_is_restored_when_it_covers_more_than_the_pool() -> None:
    p = Pool(ram_bytes=1 << 20)
    long = SYSTEM + list(range(10, 10 + MIN_RESTORE_GAIN + 4))
    p.run(long)
    assert p.pool.evict_lru() and p.cache.total_tokens == 0 and p.pool.counters.spills == 1
    request = p.admit(long + [99])
    assert request is not None
    assert request.cached_tokens == len(long) and request.shared_prefix == 0  # its own cells, not the tree's
    assert p.pool.counters.restores == 1 and ("set_state", request.seq_id) in p.kv.calls
    assert p.kv.tokens(request.seq_id) == long + [99]


def test_a_restore_that_fails_is_counted_and_the_tokens_are_evaluated() -> None:
    p = Pool(ram_bytes=1 << 20)
    long = SYSTEM + list(range(10, 40))
    assert p.pool.store is not None
    p.pool.store.put(SpilledState(tuple(long), None, b"not a state llama.cpp accepts"))
    request = p.admit(long + [99])
    assert request is not None and request.cached_tokens == 0
    assert (p.pool.counters.restores, p.pool.counters.restore_failures) == (0, 1)
    assert p.kv.tokens(request.seq_id) == long + [99]


def test_a_spilled_state_that_holds_other_positions_than_its_entry_is_not_used() -> None:
    """A disk entry whose header's tokens do not describe its state (a damaged or
    tampered file) must not give the request wrong KV."""
    p = Pool(ram_bytes=1 << 20)
    long = [*SYSTEM, *range(10, 40)]
    assert p.pool.store is not None
    p.pool.store.put(SpilledState(tuple(long), None, p.kv.state_of_tokens(long[:-5])))
    request = p.admit([*long, 99])
    assert request is not None and request.cached_tokens == 0
    assert (p.pool.counters.restores, p.pool.counters.restore_failures) == (0, 1)
    assert p.kv.tokens(request.seq_id) == [*long, 99]


def test_a_short_spilled_gain_is_not_worth_a_restore() -> None:
    p = Pool(ram_bytes=1 << 20)
    p.run(SYSTEM + [7, 8, 9])
    p.pool.evict_lru()
    request = p.admit(SYSTEM + [7, 8, 9, 10])
    assert request is not None and request.cached_tokens == 0 and p.pool.counters.restores == 0


def test_a_shifted_prompt_takes_over_the_originals_cells_and_moves_them_back() -> None:
    p = Pool()
    original = SYSTEM + list(range(20, 60))
    p.run(original)
    shift = ContextShift(tuple(original + [90, 91]), n_keep=len(SYSTEM), n_drop=10)
    request = p.admit(shift.prompt, shift=shift)
    assert request is not None and p.pool.counters.shifts == 1
    assert request.cached_tokens == len(original) - 10
    assert ("add", request.seq_id, len(SYSTEM) + 10, len(original), -10) in p.kv.calls
    assert p.kv.tokens(request.seq_id) == list(shift.prompt)
    assert p.cache.total_tokens == 0  # the original's entry left the tree: its cells moved


def test_a_shifted_prompt_takes_over_the_original_with_compaction_on() -> None:
    """The default settings: compaction must not move the original out before the shift uses it."""
    p = Pool(ram_bytes=1 << 20, compact=True)
    original = SYSTEM + list(range(100, 180))
    p.run(original)
    shift = ContextShift(tuple([*original, 90]), n_keep=len(SYSTEM), n_drop=40)
    request = p.admit(shift.prompt, shift=shift)
    assert request is not None and p.pool.counters.shifts == 1
    assert request.cached_tokens == len(original) - 40
    assert p.kv.tokens(request.seq_id) == list(shift.prompt)


def test_finish_reshares_tokens_that_another_request_parked_meanwhile() -> None:
    p = Pool()
    prompt = SYSTEM + [7, 8]
    first, second = p.admit(prompt), p.admit(prompt)
    assert first is not None and second is not None and second.cached_tokens == 0
    first_id, second_id = first.seq_id, second.seq_id
    generate(p, first, [50, 51])  # holds prompt + [50]
    generate(p, second, [50, 52, 53])  # holds prompt + [50, 52]: extends the first
    p.pool.finish(first, keep=True)
    p.pool.finish(second, keep=True)
    shared = len(prompt) + 1  # evaluated by both
    assert ("rm", second_id, 0, shared) in p.kv.calls
    assert ("cp", first_id, second_id, 0, shared) in p.kv.calls
    assert ("rm", first_id, -1, -1) in p.kv.calls  # the first's entry is redundant now
    assert p.cache.holders() == {second_id}
    assert p.kv.cells_used() == p.cache.total_tokens == shared + 1  # one cell per tree token


def test_compaction_moves_parked_entries_the_request_does_not_use_to_ram() -> None:
    p = Pool(n_ctx=512, ram_bytes=1 << 20, compact=True)
    unused = [50] * 3 + list(range(100, 170))
    used = SYSTEM + list(range(200, 270))
    p.run(unused)
    p.run(used)
    request = p.admit(used + [1])
    assert request is not None and request.cached_tokens == len(used)
    assert p.pool.store is not None and p.pool.store.best_match(unused) is not None
    assert p.cache.peek(unused).length == 0  # out of the KV pool


def test_compaction_leaves_session_tails_behind_a_shared_prompt_in_the_pool() -> None:
    """Coding agents: sessions share a long prompt and differ in a short tail. A spill
    would copy a session's whole state to free its tail's cells: compaction keeps them,
    while an entry that is all its own cells still goes to RAM."""
    p = Pool(n_ctx=1024, n_seq_max=8, ram_bytes=1 << 20, compact=True)
    shared = SYSTEM + list(range(1000, 1150))
    lone = [50] * 3 + list(range(100, 170))
    sessions = [shared + list(range(2000 + 100 * i, 2020 + 100 * i)) for i in range(3)]
    p.run(lone)  # the least recently used: compaction reaches it first
    for tokens in sessions:
        p.run(tokens)
    assert [p.cache.own_tokens(p.cache.peek(t).node) for t in sessions] == [20] * 3  # type: ignore[arg-type]
    request = p.admit(sessions[0] + [1])
    assert request is not None and request.cached_tokens == len(sessions[0])
    assert p.cache.peek(lone).length == 0 and p.pool.store is not None and p.pool.store.best_match(lone) is not None
    for tokens in sessions[1:]:
        assert p.cache.peek(tokens).length == len(tokens)  # still in the pool, not spilled
        assert p.pool.store.best_match(tokens) is None


def test_compaction_leaves_an_entry_too_large_for_an_eighth_of_the_ram_tier_in_the_pool() -> None:
    """A coding agent's prompt would fill much of the tier: spilled, it pushes other
    entries out and comes back as a copy that shares no cells. It stays; a small one goes."""
    small, large = [50] * 3 + list(range(100, 170)), [60] * 3 + list(range(1000, 1600))
    p = Pool(n_ctx=2048)
    p.run(large)
    holder = p.cache.peek(large).holder
    assert holder is not None
    per_token = p.pool.measure_state_size(holder, len(large))  # FakeKV: bytes of JSON per token
    for eighth, spilled in ((400, False), (700, True)):  # an eighth of the tier holds 400 tokens, then 700
        p = Pool(n_ctx=2048, ram_bytes=int(8 * per_token * eighth), compact=True)
        p.run(large)  # least recently used
        p.run(small)
        request = p.admit(SYSTEM + [1, 2, 3])
        assert request is not None
        assert (p.cache.peek(large).length == 0) is spilled
        assert p.pool.counters.spills == (2 if spilled else 0)  # compaction stops at the first it leaves


def replay_agent_sessions(*, n_ctx: int, calls: int) -> Pool:
    """benchmarks/coding_agents.py at a tenth of its size: three Codex and three Claude
    Code sessions take turns; each client's sessions share a long prompt, and each later
    call appends a tool call and its output (75 tokens). Asserts that every later call
    evaluates exactly its new tokens; returns the pool (32 sequence ids, as `kvchat
    serve` makes it, and a RAM tier of two Codex prompts)."""
    codex_prompt, claude_prompt = list(range(100_000, 100_864)), list(range(200_000, 200_945))
    prompts = {("codex", s): [*codex_prompt, *range(300_000 + 100 * s, 300_002 + 100 * s)] for s in range(3)}
    prompts |= {("claude", s): [*claude_prompt, *range(400_000 + 1000 * s, 400_212 + 1000 * s)] for s in range(3)}
    probe = Pool(n_ctx=2048)
    probe.run(codex_prompt)
    holder = probe.cache.peek(codex_prompt).holder
    assert holder is not None
    per_token = probe.pool.measure_state_size(holder, len(codex_prompt))
    p = Pool(n_ctx=n_ctx, n_seq_max=32, ram_bytes=int(2180 * per_token), compact=True)
    for call in range(calls):
        for session in range(3):
            for client in ("codex", "claude"):
                new = [500_000 + 10_000 * call + 100 * session + i + (5000 if client == "claude" else 0)
                       for i in range(75)] if call else []
                prompts[client, session] += new
                request = p.admit(prompts[client, session])
                assert request is not None
                generate(p, request, [7, 8])
                p.pool.finish(request, keep=True)
                p.pool.check_parked()
                if call:
                    evaluated = len(prompts[client, session]) - request.cached_tokens
                    assert evaluated == len(new), (client, session, call, evaluated)
    return p


def test_interleaved_agent_sessions_evaluate_only_their_new_tokens_with_compaction_on() -> None:
    """With compaction spilling whole states (as before), every later call of the replay
    evaluated its session's tail again (up to 4.67x its new tokens); now each later call
    evaluates exactly its new tokens, and a pool that holds every session spills nothing."""
    p = replay_agent_sessions(n_ctx=8192, calls=3)
    assert p.pool.counters.spills == 0


def stored_positions(p: Pool, tokens: list[int], resident: int) -> list[int]:
    """The positions the stored state that serves `tokens` holds (FakeKV's state is JSON)."""
    assert p.pool.store is not None
    match = p.pool.store.best_match(tokens, resident=resident)
    assert match is not None
    loaded = p.pool.store.load(match)
    assert loaded is not None
    return sorted(int(pos) for pos in json.loads(loaded.state))


def park_two_branches(p: Pool) -> tuple[list[int], list[int], list[int]]:
    """Park two prompts that share a 46-token prefix: (the prefix, the first, the second)."""
    shared = SYSTEM + list(range(100, 140))
    first, second = shared + list(range(200, 230)), shared + list(range(300, 330))
    p.run(first)
    p.run(second)
    return shared, first, second


def test_an_evicted_branch_spills_only_its_tail_past_the_prefix_others_share() -> None:
    p = Pool(n_ctx=512, ram_bytes=1 << 20)
    shared, first, second = park_two_branches(p)
    assert p.pool.evict_lru() and p.pool.counters.spills == 1  # `first`: its holder is freed
    assert stored_positions(p, first, resident=len(shared)) == list(range(len(shared), len(first)))
    assert p.pool.store is not None and p.pool.store.best_match(first) is None  # not without the prefix
    assert p.pool.evict_lru() and p.pool.counters.spills == 2  # `second`: its holder keeps the prefix
    assert stored_positions(p, second, resident=len(shared)) == list(range(len(shared), len(second)))
    assert p.cache.peek(second).length == len(shared)
    p.pool.check_parked()
    assert p.kv.cells_used() == len(shared)  # the copy of the tail went with its scratch sequence


def test_a_tail_comes_back_onto_the_tree_and_only_the_new_tokens_are_evaluated() -> None:
    p = Pool(n_ctx=512, ram_bytes=1 << 20)
    shared, first, second = park_two_branches(p)
    p.pool.evict_lru()
    request = p.admit(first + [99])
    assert request is not None and request.cached_tokens == len(first)
    assert request.shared_prefix == len(shared) and request.locked_node is not None  # the prefix is the tree's
    assert p.pool.counters.restores == 1
    assert p.kv.tokens(request.seq_id) == first + [99]
    p.pool.finish(request, keep=True)
    p.pool.check_parked()
    assert p.kv.cells_used() == p.pool.cells_in_use()  # shared cells counted once


def test_a_trimmed_holder_spills_its_whole_state_when_no_sequence_id_is_free() -> None:
    p = Pool(n_ctx=512, n_seq_max=2, ram_bytes=1 << 20)
    shared, first, second = park_two_branches(p)
    p.pool.evict_lru()  # `first`: frees its id...
    conversation = p.pinned.pin()  # ...which a conversation takes
    assert p.pool.free_sequences == 0
    p.pool.evict_lru()  # `second`: no id to copy its tail through
    assert stored_positions(p, second, resident=0) == list(range(len(second)))
    p.pool.check_parked()
    p.pinned.unpin(conversation)


def test_a_store_with_a_disk_tier_keeps_whole_states(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Files outlive the process: a restarted server holds nothing in the pool, so a
    tail's prefix would be missing. Evictions and the shutdown spill whole states."""
    p = Pool(n_ctx=512)
    p.pool.store = StateStore(ram_budget_bytes=1 << 20, disk_dir=tmp_path, layout_key="fake-layout")
    shared, first, second = park_two_branches(p)
    p.pool.evict_lru()
    assert stored_positions(p, first, resident=0) == list(range(len(first)))
    p.pool.persist()
    restarted = StateStore(ram_budget_bytes=1 << 20, disk_dir=tmp_path, layout_key="fake-layout")
    for tokens in (first, second):
        match = restarted.best_match(tokens)  # nothing resident after a restart
        assert match is not None and match.length == len(tokens) and match.start == 0


def test_a_session_evicted_turn_by_turn_comes_back_as_a_chain_of_tails() -> None:
    """Each turn of a session parks the prompt and leaves the unused reply as a branch,
    so the session's cells are evicted turn by turn, each as the tail of the turn before."""
    p = Pool(n_ctx=1024, n_seq_max=16, ram_bytes=1 << 20)
    shared = SYSTEM + list(range(100, 200))
    other = shared + list(range(900, 940))
    session = shared + [1000, 1001]
    for turn in range(3):
        session = session + list(range(2000 + 100 * turn, 2040 + 100 * turn))
        p.run(session, [7, 8])
    p.run(other)  # keeps the shared prefix in the tree
    while p.cache.peek(session).length > len(shared):
        assert p.pool.evict_lru()
    assert p.pool.counters.spills >= 3
    request = p.admit(session + [99])
    assert request is not None and request.cached_tokens == len(session)
    assert request.shared_prefix == len(shared) and p.pool.counters.restores == 1
    assert p.kv.tokens(request.seq_id) == session + [99]
    p.pool.finish(request, keep=True)
    p.pool.check_parked()


def test_interleaved_agent_sessions_evaluate_only_their_new_tokens_in_a_full_pool() -> None:
    """The replay in a pool too small for every session. Spilling whole states, it gave
    the benchmark's run of 2026-12-07 exactly at its third round (28 evictions, 17
    spills, a failed restore, 2x the new tokens), and up to 5.8x in a fourth; with tails
    restored onto the shared prompts (as chains), every later call evaluates exactly its
    new tokens."""
    counters = replay_agent_sessions(n_ctx=3276, calls=4).pool.counters
    assert counters.evictions > 20 and counters.restores > 0 and counters.restore_failures == 0  # the pool was full


def test_a_running_request_publishes_its_evaluated_tokens_to_the_tree() -> None:
    p = Pool(n_ctx=512)
    prompt = SYSTEM + list(range(100, 160))
    running = p.admit(prompt, max_new=8)
    assert running is not None and p.pool.publish(running)
    assert running.shared_prefix == len(prompt) and running.reserved_cells == running.decode_cells()
    assert p.cache.peek(prompt).length == len(prompt)
    assert not p.pool.publish(running)  # nothing new to give
    other = p.admit(prompt + [7, 8])
    assert other is not None and other.cached_tokens == len(prompt)  # shares the running request's cells
    generate(p, running, [1, 2, 3])
    p.pool.finish(running, keep=True)
    p.pool.finish(other, keep=True)
    p.pool.check_parked()
    assert p.kv.cells_used() == p.cache.total_tokens and p.pool.reserved_cells == 0


def test_a_running_request_shares_what_the_tree_parked_meanwhile_then_publishes_the_rest() -> None:
    """Two requests evaluated the same prompt side by side; once the first is published,
    the second shares those cells from the tree instead of its own, and publishes its
    generated tokens."""
    p = Pool(n_ctx=512)
    prompt = SYSTEM + list(range(100, 160))
    first = p.admit(prompt, max_new=4)
    second = p.admit(prompt, max_new=8)
    assert first is not None and second is not None and second.cached_tokens == 0
    assert p.pool.publish(first)
    assert not p.pool.publish(second)  # nothing the tree does not hold
    generate(p, second, [1, 2, 3])
    assert p.pool.publish(second)
    assert second.shared_prefix == len(prompt) + 2 and p.kv.tokens(second.seq_id) == prompt + [1, 2]
    assert p.kv.cells_used() <= p.pool.cells_in_use()
    for request in (first, second):
        p.pool.finish(request, keep=True)
    p.pool.check_parked()
    assert p.kv.cells_used() == p.cache.total_tokens and p.pool.reserved_cells == 0


def test_publish_evicting_for_an_id_the_entry_it_would_share_keeps_the_request_whole() -> None:
    p = Pool(n_ctx=512, n_seq_max=3)
    prompt = SYSTEM + list(range(100, 160))
    running = p.admit(prompt + [1], max_new=4)
    assert running is not None
    p.run(prompt + [2])  # parks the same prompt in cells of its own
    conversation = p.pinned.pin()  # takes the last free id: publishing must evict that entry
    assert p.pool.publish(running)
    assert p.kv.tokens(running.seq_id) == list(running.kv_tokens)
    assert p.cache.peek(running.kv_tokens).length == len(running.kv_tokens)
    p.pool.finish(running, keep=True)
    p.pool.check_parked()
    p.pinned.unpin(conversation)


def test_own_tokens_are_the_cells_a_spill_would_free() -> None:
    p = Pool(n_ctx=512)
    alone = list(range(300, 340))
    p.run(alone)
    assert p.cache.own_tokens(p.cache.peek(alone).node) == len(alone)  # type: ignore[arg-type]
    extended = alone + list(range(400, 410))
    p.run(extended)  # one sequence, two edges: both its own
    assert p.cache.own_tokens(p.cache.peek(extended).node) == len(extended)  # type: ignore[arg-type]
    branch = alone + list(range(500, 505))
    p.run(branch)  # now the 40 tokens of `alone` are shared by two entries
    assert p.cache.own_tokens(p.cache.peek(branch).node) == 5  # type: ignore[arg-type]
    assert p.cache.own_tokens(p.cache.peek(extended).node) == 10  # type: ignore[arg-type]


def test_an_exhausted_pool_evicts_least_recently_used_entries() -> None:
    p = Pool(n_ctx=32, n_seq_max=4)
    p.run([1, 2, 3, 4, 5, 6, 7, 8])
    p.run([9, 10, 11, 12, 13, 14, 15, 16])
    request = p.admit([20] * 20, max_new=4)
    assert request is not None and p.pool.counters.evictions >= 1
    assert p.kv.cells_used() <= p.pool.cells_in_use() <= 32


# -- conversations -----------------------------------------------------------------------------------


def conversation_turn(p: Pool, pinned: PinnedSequence, new: list[int], reply: list[int]) -> None:
    prompt = pinned.tokens + pinned.unevaluated + new
    request = new_request(prompt, max_new=len(reply) + 1, pinned=pinned)
    assert p.pinned.admit(request)
    prefill(p, request)
    generate(p, request, reply)
    p.pinned.finish(request, keep=True)


def test_a_conversation_turn_evaluates_only_what_is_new() -> None:
    p = Pool()
    conv = p.pinned.pin()
    conversation_turn(p, conv, SYSTEM, [30, 31])
    before = p.kv.cells_used()
    conversation_turn(p, conv, [40], [41])
    assert p.kv.tokens(conv.seq_id) == SYSTEM + [30, 31, 40]
    assert conv.unevaluated == [41]
    assert p.kv.cells_used() == before + 2 == p.pool.pinned_cells


def test_fork_truncate_and_unpin_keep_cells_and_accounting_together() -> None:
    p = Pool()
    parent = p.pinned.pin()
    conversation_turn(p, parent, SYSTEM, [30, 31])
    child = p.pinned.fork(parent)
    assert p.kv.cells_used() == p.pool.pinned_cells == len(SYSTEM) + 1  # shared, counted once
    conversation_turn(p, child, [31], [50])
    p.pinned.truncate(parent, 2)
    assert p.kv.tokens(parent.seq_id) == SYSTEM[:2]
    assert p.kv.tokens(child.seq_id) == SYSTEM + [30, 31]
    assert p.kv.cells_used() == p.pool.pinned_cells
    p.pinned.unpin(parent)
    p.pinned.unpin(child)
    assert p.kv.cells_used() == p.pool.pinned_cells == 0 and p.pool.free_sequences == 8


def test_rewinding_memory_that_cannot_be_cut_is_refused_and_changes_nothing() -> None:
    p = Pool(partial_remove=False)  # recurrent or hybrid memory
    conv = p.pinned.pin()
    conversation_turn(p, conv, SYSTEM, [30])
    with pytest.raises(InvalidRequestError, match="cannot be cut"):
        p.pinned.truncate(conv, 2)
    assert conv.tokens == SYSTEM and p.kv.tokens(conv.seq_id) == SYSTEM
    p.pinned.truncate(conv, 0)  # dropping everything is always possible
    assert conv.tokens == [] and not p.kv.holds_anything(conv.seq_id)


def test_a_failed_conversation_batch_goes_back_to_what_was_resident() -> None:
    p = Pool()
    conv = p.pinned.pin()
    conversation_turn(p, conv, SYSTEM, [30])
    request = new_request(conv.tokens + conv.unevaluated + [40, 41], pinned=conv)
    assert p.pinned.admit(request)
    prefill(p, request)
    p.pinned.finish(request, keep=False)
    assert conv.tokens == SYSTEM and p.kv.tokens(conv.seq_id) == SYSTEM and conv.unevaluated == []


# -- the stateful property test ----------------------------------------------------------------------

BASES = [SYSTEM + [10 + i] * 3 + list(range(20 + 10 * i, 60 + 10 * i)) for i in range(3)]


class PoolMachine(RuleBasedStateMachine):
    """Random admissions, generations, finishes, evictions and conversation operations;
    after every step the fake KV memory must agree with the tree, the requests, the
    conversations and the accounting."""

    @initialize(n_ctx=st.sampled_from([96, 160, 320]), n_seq_max=st.sampled_from([4, 8]),
                ram=st.sampled_from([0, 1 << 20]), compact=st.booleans())
    def start(self, n_ctx: int, n_seq_max: int, ram: int, compact: bool) -> None:
        self.p = Pool(n_ctx=n_ctx, n_seq_max=n_seq_max, ram_bytes=ram, compact=compact)
        self.running: list[Request] = []
        self.conversations: list[PinnedSequence] = []
        self.shifted = False  # a shift took cells over into another namespace

    @rule(base=st.sampled_from(BASES), length=st.integers(1, 52), extra=st.lists(st.integers(0, 9), max_size=4),
          max_new=st.integers(1, 8), key=st.sampled_from([None, "tenant"]))
    def admit(self, base: list[int], length: int, extra: list[int], max_new: int, key: str | None) -> None:
        prompt = base[:length] + extra
        if len(prompt) + max_new > self.p.kv.n_ctx:
            return
        protected = self.p.cache.protected_tokens
        request = self.p.admit(prompt, max_new=max_new, cache_key=key)
        if request is None:
            assert self.p.cache.protected_tokens == protected  # a refused admission leaves no lock
        else:
            self.running.append(request)

    @rule(base=st.sampled_from(BASES), n_drop=st.integers(1, 30), key=st.sampled_from([None, "tenant"]))
    def admit_shifted(self, base: list[int], n_drop: int, key: str | None) -> None:
        shift = ContextShift(tuple(base + [7]), n_keep=len(SYSTEM), n_drop=n_drop)
        shifts = self.p.pool.counters.shifts
        request = self.p.admit(shift.prompt, max_new=2, cache_key=key, shift=shift)
        if request is not None:
            self.running.append(request)
            self.shifted |= self.p.pool.counters.shifts > shifts

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def generate(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.running))
        room = request.max_new_tokens - len(request.generated)
        tokens = data.draw(st.lists(st.integers(0, 9), max_size=room))
        generate(self.p, request, tokens)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), keep=st.booleans())
    def finish(self, data: st.DataObject, keep: bool) -> None:
        request = data.draw(st.sampled_from(self.running))
        self.running.remove(request)
        self.p.pool.finish(request, keep=keep)

    @rule()
    def evict(self) -> None:
        self.p.pool.evict_lru()

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.running))
        if self.p.pool.publish(request):
            assert request.shared_prefix == request.n_past and request.locked_node is not None
            assert self.p.cache.peek(request.kv_tokens, namespace=request.cache_key).length == request.n_past

    @rule()
    def pin(self) -> None:
        try:
            self.conversations.append(self.p.pinned.pin())
        except InvalidRequestError:
            assert self.p.pool.free_sequences == 0

    @precondition(lambda self: self.conversations)
    @rule(data=st.data(), new=st.lists(st.integers(0, 9), min_size=1, max_size=6),
          reply=st.lists(st.integers(0, 9), max_size=4))
    def conversation_turn(self, data: st.DataObject, new: list[int], reply: list[int]) -> None:
        conv = data.draw(st.sampled_from(self.conversations))
        prompt = conv.tokens + conv.unevaluated + new
        request = new_request(prompt, max_new=len(reply) + 1, pinned=conv)
        if self.p.pinned.admit(request):
            prefill(self.p, request)
            generate(self.p, request, reply)
            self.p.pinned.finish(request, keep=data.draw(st.booleans()))

    @precondition(lambda self: self.conversations)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        conv = data.draw(st.sampled_from(self.conversations))
        try:
            self.conversations.append(self.p.pinned.fork(conv))
        except InvalidRequestError:
            assert self.p.pool.free_sequences == 0

    @precondition(lambda self: self.conversations)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        conv = data.draw(st.sampled_from(self.conversations))
        self.p.pinned.truncate(conv, data.draw(st.integers(0, len(conv.tokens))))
        conv.unevaluated = []

    @precondition(lambda self: self.conversations)
    @rule(data=st.data())
    def shift_left(self, data: st.DataObject) -> None:
        conv = data.draw(st.sampled_from(self.conversations))
        if conv.children or conv.parent is not None or len(conv.tokens) < 2:
            return
        keep = data.draw(st.integers(0, len(conv.tokens) - 1))
        self.p.pinned.shift_left(conv, keep, data.draw(st.integers(1, len(conv.tokens) - keep)))

    @precondition(lambda self: self.conversations)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        conv = data.draw(st.sampled_from(self.conversations))
        self.conversations.remove(conv)
        self.p.pinned.unpin(conv)

    @invariant()
    def kv_matches_the_bookkeeping(self) -> None:
        p, kv = self.p, self.p.kv
        p.cache.check_integrity()
        parked = p.cache.holders()
        running = [r.seq_id for r in self.running]
        pinned = [c.seq_id for c in self.conversations]
        in_use = [*parked, *running, *pinned]
        assert len(set(in_use)) == len(in_use) and len(in_use) + p.pool.free_sequences == kv.n_seq_max
        for holder in parked:
            assert kv.tokens(holder) == leaf_path(p.cache, holder)
        for request in self.running:
            assert kv.tokens(request.seq_id) == list(request.kv_tokens)
        for conv in self.conversations:
            assert kv.tokens(conv.seq_id) == conv.tokens
            # Charged for its positions past the fork point; its parent holds those before it.
            own_start = conv.fork_point if conv.parent is not None else 0
            assert conv.own_cells == len(conv.tokens) - own_start >= 0
            if conv.parent is not None:
                assert conv in conv.parent.children and conv.parent in self.conversations
                assert conv.parent.tokens[:own_start] == conv.tokens[:own_start]
            assert all(child.parent is conv for child in conv.children)
        assert p.pool.pinned_cells == sum(c.own_cells for c in self.conversations)
        assert kv.cells_used() <= p.pool.cells_in_use() <= kv.n_ctx
        if not self.running:
            # Exact, except that a shifted request's kept head can share cells with the
            # original's entry in the unshifted namespace: each tree counts them.
            counted = p.cache.total_tokens + p.pool.pinned_cells
            assert kv.cells_used() == counted if not self.shifted else kv.cells_used() <= counted
            assert p.cache.protected_tokens == 0 and p.pool.reserved_cells == 0


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
