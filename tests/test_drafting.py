"""Draft sources and the draft-length policy: pure logic, no model."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvchat.engine.drafting import CACHE_TOKENS_PER_REPLY, NgramCache, NgramIndex, _entry_bytes
from kvchat.engine.request import Request, RequestSpec, SequenceKV
from kvchat.engine.sampling import SamplingParams
from kvchat.engine.speculation import (
    TILE_ROWS,
    Acceptance,
    Speculator,
    call_cost,
    expected_tokens,
    padded_rows,
)
from kvchat.engine.stream import Stream

# -- NgramIndex ---------------------------------------------------------------------------------


def test_continuation_follows_the_longest_matching_ngram() -> None:
    index = NgramIndex([1, 2, 3, 9, 9, 7, 2, 3, 4, 5, 6], min_n=1, max_n=3)
    # (7, 2, 3) occurred once, followed by 4 5 6; (2, 3) alone also by 9.
    assert index.continuation([7, 2, 3], 3) == (8, [4, 5, 6])
    assert index.continuation([0, 2, 3], 2, after=0) == (3, [9, 9])


def test_continuation_prefers_the_first_occurrence_at_or_after_the_cursor_else_the_latest() -> None:
    index = NgramIndex([5, 1, 5, 2, 5, 3], min_n=1, max_n=1)
    assert index.continuation([5], 1, after=0) == (1, [1])
    assert index.continuation([5], 1, after=2) == (3, [2])
    assert index.continuation([5], 1, after=100) == (5, [3])


def test_continuation_without_a_match_or_room_is_empty() -> None:
    index = NgramIndex([1, 2, 3], min_n=2, max_n=3)
    assert index.continuation([3, 1], 4) == (0, [])
    assert index.continuation([1], 4) == (0, [])  # shorter than min_n
    assert index.continuation([1, 2], 0) == (0, [])


def test_extend_indexes_ngrams_once_they_have_a_follower() -> None:
    index = NgramIndex([1, 2], min_n=2, max_n=2)
    assert index.continuation([1, 2], 3) == (0, [])
    index.extend([8])
    assert index.continuation([1, 2], 3) == (2, [8])


def test_ngram_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        NgramIndex(min_n=0, max_n=2)
    with pytest.raises(ValueError):
        NgramIndex(min_n=3, max_n=2)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 5), max_size=3_000),
    context=st.lists(st.integers(0, 5), min_size=1, max_size=8),
    limit=st.integers(1, 64),
    after=st.integers(0, 4_000),
)
def test_continuation_is_what_followed_the_longest_suffix_match(tokens, context, limit, after) -> None:
    index = NgramIndex(tokens, min_n=1, max_n=4)
    start, found = index.continuation(context, limit, after=after)
    longest = 0
    for n in range(min(4, len(context)), 0, -1):
        suffix = context[-n:]
        if any(tokens[e - n : e] == suffix for e in range(n, len(tokens))):
            longest = n
            break
    if longest == 0:
        assert (start, found) == (0, [])
        return
    assert found == tokens[start : start + limit] and found
    assert tokens[start - longest : start] == context[-longest:]
    ends = [e for e in range(longest, len(tokens)) if tokens[e - longest : e] == context[-longest:]]
    at_or_after = [e for e in ends if e >= after]
    assert start == (at_or_after[0] if at_or_after else ends[-1])


# -- NgramCache -----------------------------------------------------------------------------------


def test_ngram_cache_returns_what_followed_in_the_same_namespace_only() -> None:
    cache = NgramCache(100, n=2, continuation_length=4)
    cache.add("alice", [1, 2, 3, 4, 5, 6])
    assert cache.continuation("alice", [9, 1, 2], 3) == [3, 4, 5]
    assert cache.continuation("bob", [9, 1, 2], 3) == []
    assert cache.continuation(None, [1, 2], 3) == []
    assert cache.continuation("alice", [2], 3) == []  # shorter than n


def test_ngram_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = NgramCache(3, n=1, continuation_length=2)
    cache.add(None, [1, 2, 3, 4])  # (1)->2 3, (2)->3 4, (3)->4
    assert cache.continuation(None, [1], 2) == [2, 3]  # (1) is now the most recent
    cache.add(None, [7, 8])  # (7)->8 pushes out (2), the least recently used
    assert len(cache) == 3
    assert cache.continuation(None, [2], 2) == []
    assert cache.continuation(None, [1], 2) == [2, 3]


def test_a_zero_sized_ngram_cache_keeps_nothing() -> None:
    cache = NgramCache(0)
    cache.add(None, list(range(50)))
    assert len(cache) == 0 and cache.bytes == 0


@settings(max_examples=100, deadline=None)
@given(
    adds=st.lists(
        st.tuples(st.sampled_from(["a", "b", None]), st.lists(st.integers(0, 3), max_size=200)), max_size=30
    ),
    max_entries=st.integers(0, 50),
)
def test_ngram_cache_counts_its_bytes_and_never_exceeds_its_bound(adds, max_entries) -> None:
    cache = NgramCache(max_entries, n=2, continuation_length=5)
    for namespace, tokens in adds:
        cache.add(namespace, tokens)
        assert len(cache) <= max_entries
    assert cache.bytes == sum(_entry_bytes(k, v) for k, v in cache._entries.items())


def test_a_reply_of_a_whole_context_indexes_only_its_last_tokens() -> None:
    cache = NgramCache(1_000_000, n=3)
    reply = list(range(1_000_000))  # a million distinct tokens: a million n-grams unbounded
    cache.add("a", reply)
    assert len(cache) == CACHE_TOKENS_PER_REPLY  # the work of one add is bounded by the reply cap
    tail = reply[-CACHE_TOKENS_PER_REPLY - 3 :]
    assert cache.continuation("a", tail[:3], 4) == tail[3:7]
    assert cache.continuation("a", reply[:3], 4) == []  # the reply's start was not indexed


# -- the cost model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [0, 400, 2_000, 9_000, 1_000_000])
def test_call_cost_grows_with_rows_within_a_kernel_and_drops_at_the_tile(context: int) -> None:
    row_by_row = [call_cost(n, context) for n in range(1, TILE_ROWS)]
    tiled = [call_cost(n, context) for n in range(TILE_ROWS, 1_000)]
    assert all(b > a for a, b in zip(row_by_row, row_by_row[1:]))
    assert all(b >= a for a, b in zip(tiled, tiled[1:]))
    assert call_cost(TILE_ROWS, context) < call_cost(TILE_ROWS - 1, context)
    assert call_cost(0, context) == 0


@pytest.mark.parametrize("rows", [1, 2, 9, 63, 64, 128])
def test_call_cost_grows_with_the_context(rows: int) -> None:
    costs = [call_cost(rows, context) for context in (0, 400, 2_000, 9_000, 1_000_000)]
    assert all(b > a for a, b in zip(costs, costs[1:]))


def test_a_call_is_padded_to_a_tile_only_where_that_is_cheaper_and_there_is_room() -> None:
    assert padded_rows(2, 400, room=200) == 2  # two rows cost less than a tile
    assert padded_rows(9, 9_000, room=200) == TILE_ROWS  # after 9,000 tokens nine rows cost more
    assert padded_rows(9, 9_000, room=TILE_ROWS - 10) == 9  # no room for the padding
    assert padded_rows(50, 400, room=14) == TILE_ROWS
    assert padded_rows(TILE_ROWS, 9_000, room=200) == TILE_ROWS
    assert padded_rows(100, 9_000, room=200) == 100


@given(rows=st.integers(0, 10_000), context=st.integers(0, 1_000_000), room=st.integers(0, 10_000))
def test_padding_never_costs_more_nor_exceeds_the_room(rows: int, context: int, room: int) -> None:
    padded = padded_rows(rows, context, room)
    assert rows <= padded <= rows + room
    assert call_cost(padded, context) <= call_cost(rows, context)


def test_expected_tokens() -> None:
    assert expected_tokens(1.0, 7) == 8
    assert expected_tokens(0.0, 7) == 1
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_acceptance_falls_with_rejections_and_recovers_while_resting() -> None:
    acceptance = Acceptance()
    prior = acceptance.rate
    for _ in range(5):
        acceptance.update(drafted=8, accepted=0)
    low = acceptance.rate
    assert low < 0.25 < prior
    for _ in range(100):
        acceptance.rest()
    assert low < acceptance.rate < 0.9  # failures fade slowly: a try costs a long call
    for _ in range(1000):
        acceptance.rest()
    assert acceptance.rate > 0.9  # a paused source is tried again
    for _ in range(10):
        acceptance.update(drafted=8, accepted=8)
    assert acceptance.rate > 0.95


# -- Speculator.propose ------------------------------------------------------------------------------


def decoding_request(request_id: int, prompt: list[int], generated: list[int], *, max_new: int = 256,
                     prediction: tuple[int, ...] = (), cache_key: str | None = None) -> Request:
    spec = RequestSpec(request_id, tuple(prompt), SamplingParams(prediction=prediction), max_new, cache_key=cache_key)
    request = Request(spec, Stream(request_id, on_cancel=lambda: None))
    for token in generated:
        request.record_token(token)
    n_past = len(prompt) + len(generated) - 1
    request.kv = SequenceKV(seq_id=request_id, n_past=n_past, reserved_cells=n_past + 256)  # room, as granted
    return request


REPEATED = list(range(100, 140))


def test_a_reply_that_repeats_its_prompt_gets_a_lookup_draft() -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=100)
    request = decoding_request(1, [1, 2, *REPEATED, 3], REPEATED[:5])
    speculator.propose([request], capacity=512, call_rows=512)
    assert request.draft and request.draft == tuple(REPEATED[5 : 5 + len(request.draft)])


def test_the_prediction_is_drafted_first() -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=100)
    prediction = (7, 50, 51, 52, 53, 54)
    request = decoding_request(1, [1, 2, *REPEATED, 3], [REPEATED[0], 7], prediction=prediction)
    speculator.propose([request], capacity=512, call_rows=512)
    assert request.draft and request.draft == prediction[1 : 1 + len(request.draft)]


def test_a_prediction_starts_with_a_longer_draft_than_the_engines_own_sources() -> None:
    """A caller's prediction starts from a stronger prior than prompt lookup does."""
    predicted = decoding_request(1, [1, 2, 3], REPEATED[:2], prediction=tuple(REPEATED))
    looked_up = decoding_request(2, [*REPEATED, 3], REPEATED[:2])
    for request in (predicted, looked_up):
        Speculator(max_draft_tokens=32, ngram_cache_entries=0).propose([request], capacity=512, call_rows=512)
    assert predicted.draft == tuple(REPEATED[2 : 2 + len(predicted.draft)])
    assert looked_up.draft == tuple(REPEATED[2 : 2 + len(looked_up.draft)])
    assert len(predicted.draft) > len(looked_up.draft) >= 1


@pytest.mark.parametrize(
    ("slack", "max_new", "call_rows", "most"),
    [(3, 256, 512, 3), (256, 4, 512, 4 - 1), (256, 256, 5, 4), (256, 256, 512, 16)],
)
def test_a_draft_stays_within_the_reservation_max_tokens_and_the_call(slack, max_new, call_rows, most) -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=0)
    request = decoding_request(1, [*REPEATED, *REPEATED], REPEATED[:1])
    for _ in range(5):  # a history of full acceptance (with room): the longest draft that fits pays
        speculator.propose([request], capacity=512, call_rows=512)
        assert request.draft
        speculator.verified(request, len(request.draft), len(request.draft))
    request.kv.reserved_cells = request.own_cells + len(request.pending) + slack
    request.spec = replace(request.spec, max_new_tokens=max_new)
    speculator.propose([request], capacity=512, call_rows=call_rows)
    assert 1 <= len(request.draft) <= most


def test_drafting_pauses_when_it_does_not_pay() -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=0)
    request = decoding_request(1, [*REPEATED, *REPEATED], REPEATED[:1])
    for _ in range(6):  # every draft rejected
        speculator.propose([request], capacity=512, call_rows=512)
        assert request.draft or _ > 0
        speculator.verified(request, len(request.draft), 0)
    speculator.propose([request], capacity=512, call_rows=512)
    assert request.draft == ()


def test_a_large_batch_drafts_less() -> None:
    def drafted(n: int) -> int:
        speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=0)
        requests = [decoding_request(i, [*REPEATED, *REPEATED], REPEATED[:1]) for i in range(1, n + 1)]
        speculator.propose(requests, capacity=4096, call_rows=4096)
        return sum(len(r.draft) for r in requests) // n

    assert drafted(1) > drafted(48)


def test_the_ngram_cache_learns_from_finished_requests_of_the_same_namespace_only() -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=1000)
    reply = [60, 61, 62, 63, 64, 65, 66, 67, 68, 69]
    done = decoding_request(1, [1, 2, 3], reply, cache_key="alice")
    speculator.finished(done, keep=True)
    for key, expect_draft in (("alice", True), ("bob", False)):
        other = decoding_request(2, [4, 5, 6, 60, 61, 62], [60, 61, 62], cache_key=key)
        other.spec = replace(other.spec, prompt=(7, 8, 9))  # no lookup source: only the n-gram cache can draft
        speculator.propose([other], capacity=512, call_rows=512)
        assert bool(other.draft) is expect_draft
        if expect_draft:
            assert other.draft == tuple(reply[3 : 3 + len(other.draft)])
        speculator.finished(other, keep=False)


def test_a_seeded_request_does_not_draft_from_other_requests_replies() -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=1000)
    speculator.finished(decoding_request(1, [1, 2, 3], [60, 61, 62, 63, 64, 65]), keep=True)
    seeded = decoding_request(2, [7, 8, 9], [60, 61, 62])
    seeded.spec = replace(seeded.spec, sampling=SamplingParams(seed=5))
    speculator.propose([seeded], capacity=512, call_rows=512)
    assert seeded.draft == ()


def reject_every_draft(speculator: Speculator, request: Request, steps: int) -> None:
    for _ in range(steps):
        speculator.propose([request], capacity=512, call_rows=512)
        speculator.verified(request, len(request.draft), 0)
    speculator.finished(request, keep=False)


def test_one_callers_rejected_predictions_do_not_pause_the_next_callers() -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=0)
    prediction = (7, 50, 51, 52, 53, 54)
    for request_id in range(1, 6):  # predictions that are always wrong
        reject_every_draft(speculator, decoding_request(request_id, [1, 2, 3], [7], prediction=prediction), 6)
    request = decoding_request(9, [1, 2, 3], [7], prediction=prediction)
    speculator.propose([request], capacity=512, call_rows=512)
    assert request.draft == prediction[1 : 1 + len(request.draft)] and request.draft


def test_a_lookup_paused_by_recent_requests_is_tried_again_after_some_steps() -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=0)
    for request_id in range(1, 6):  # replies that never follow their prompt
        reject_every_draft(speculator, decoding_request(request_id, [*REPEATED, *REPEATED], REPEATED[:1]), 8)
    paused = decoding_request(10, [*REPEATED, *REPEATED], REPEATED[:1])
    speculator.propose([paused], capacity=512, call_rows=512)
    assert paused.draft == ()  # the recent rate is a new request's prior
    speculator.finished(paused, keep=False)
    idle = decoding_request(11, [1, 2, 3, 4], [5])  # steps in which nothing drafts from lookup
    for _ in range(200):
        speculator.propose([idle], capacity=512, call_rows=512)
    request = decoding_request(12, [*REPEATED, *REPEATED], REPEATED[:1])
    speculator.propose([request], capacity=512, call_rows=512)
    assert request.draft


def test_sampling_requests_failures_do_not_pause_greedy_requests() -> None:
    speculator = Speculator(max_draft_tokens=16, ngram_cache_entries=0)
    for request_id in range(1, 6):  # sampled replies whose drafts are never kept
        reject_every_draft(speculator, decoding_request(request_id, [*REPEATED, *REPEATED], REPEATED[:1]), 8)
    sampled = decoding_request(10, [*REPEATED, *REPEATED], REPEATED[:1])
    speculator.propose([sampled], capacity=512, call_rows=512)
    assert sampled.draft == ()  # the sampling requests' recent rate is its prior
    speculator.finished(sampled, keep=False)
    greedy = decoding_request(11, [*REPEATED, *REPEATED], REPEATED[:1])
    greedy.spec = replace(greedy.spec, sampling=SamplingParams(temperature=0))
    speculator.propose([greedy], capacity=512, call_rows=512)
    assert greedy.draft == tuple(REPEATED[1 : 1 + len(greedy.draft)]) and greedy.draft


# -- acceptance priors per namespace -------------------------------------------------------------


def test_one_namespaces_acceptance_never_changes_anothers_prior() -> None:
    speculator = Speculator(max_draft_tokens=8, ngram_cache_entries=0)
    for _ in range(50):  # tenant a's drafts are all rejected
        speculator._recent_for("a", True)["lookup"].update(8, 0)
    assert speculator._recent_for("a", True)["lookup"].rate < 0.2
    assert speculator._recent_for("b", True)["lookup"].rate == Acceptance().rate  # b starts fresh
    assert speculator._recent_for(None, True)["lookup"].rate == Acceptance().rate


def test_acceptance_priors_keep_a_bounded_number_of_namespaces() -> None:
    from kvchat.engine.speculation import MAX_PRIOR_NAMESPACES

    speculator = Speculator(max_draft_tokens=8, ngram_cache_entries=0)
    speculator._recent_for("first", True)["lookup"].update(8, 0)
    for i in range(3 * MAX_PRIOR_NAMESPACES):  # a million keys would cost the same
        speculator._recent_for(f"key-{i}", i % 2 == 0)
    assert len(speculator._recent) == MAX_PRIOR_NAMESPACES
    assert speculator._recent_for("first", True)["lookup"].rate == Acceptance().rate  # forgotten: fresh again


# -- padding to a tile -----------------------------------------------------------------------------


def trusted_lookup(speculator: Speculator, request: Request) -> None:
    """Give `request`'s lookup source a history of full acceptance."""
    speculator._state(request).acceptance["lookup"] = Acceptance(accepted=99.0, rejected=1.0)


def test_a_draft_after_a_long_context_is_padded_to_one_tile_and_the_padding_counts_in_no_tally() -> None:
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    request = decoding_request(1, [7] * 9_000 + [*REPEATED, *REPEATED], REPEATED[:1])
    trusted_lookup(speculator, request)
    speculator.propose([request], capacity=512, call_rows=512)
    proposed = REPEATED[1:] + REPEATED[:1]  # all the lookup has: 40 tokens
    assert len(request.draft) == TILE_ROWS - 1  # with the last token: one tile's rows
    assert request.draft[: len(proposed)] == tuple(proposed)
    assert speculator.verified(request, len(request.draft), len(request.draft)) == (len(proposed), len(proposed))


def test_rejected_padding_is_not_a_rejection_of_the_source() -> None:
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    request = decoding_request(1, [7] * 9_000 + [*REPEATED, *REPEATED], REPEATED[:1])
    trusted_lookup(speculator, request)
    before = speculator._state(request).rate("lookup").rejected
    speculator.propose([request], capacity=512, call_rows=512)
    assert speculator.verified(request, len(request.draft), 40) == (40, 40)  # every proposed one
    assert speculator._state(request).rate("lookup").rejected < before  # decayed, no new rejection


def test_a_short_context_keeps_a_short_draft_unpadded() -> None:
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    request = decoding_request(1, [1, 2, *REPEATED, 3], REPEATED[:5])
    trusted_lookup(speculator, request)
    speculator.propose([request], capacity=512, call_rows=512)
    assert request.draft and request.draft == tuple(REPEATED[5 : 5 + len(request.draft)])
    assert len(request.draft) < TILE_ROWS - 1  # after 45 tokens, its rows cost less than a tile


def test_a_step_of_several_sequences_is_never_padded() -> None:
    """The planner cuts such a step into calls below a tile, so padding would only cost."""
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    requests = [decoding_request(i, [7] * 9_000 + [*REPEATED, *REPEATED], REPEATED[:1]) for i in (1, 2)]
    for request in requests:
        trusted_lookup(speculator, request)
    speculator.propose(requests, capacity=512, call_rows=TILE_ROWS - 1)
    for request in requests:
        assert request.draft == tuple(REPEATED[1 : 1 + len(request.draft)])


# -- drafts after a prompt ---------------------------------------------------------------------------


def prompting_request(request_id: int, prompt: list[int], cached: int, *, prediction: tuple[int, ...] = ()) -> Request:
    """A request whose prompt has `cached` tokens in its sequence and the rest pending."""
    spec = RequestSpec(request_id, tuple(prompt), SamplingParams(prediction=prediction), 256)
    request = Request(spec, Stream(request_id, on_cancel=lambda: None))
    request.pending = list(prompt[cached:])
    request.kv = SequenceKV(seq_id=request_id, n_past=cached, reserved_cells=len(prompt) + 256)
    return request


def test_a_prediction_is_drafted_right_after_a_prompt_that_ends_in_this_step() -> None:
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    request = prompting_request(1, [1, 2, 3] * 700, cached=2_080, prediction=tuple(REPEATED))
    speculator.propose([request], capacity=512, call_rows=512)
    assert request.draft[: len(REPEATED)] == tuple(REPEATED)  # all of it: 60 rows, in the tile the 20 pay for
    assert speculator.verified(request, len(request.draft), len(REPEATED)) == (len(REPEATED), len(REPEATED))


def test_the_last_rows_of_a_prompt_after_a_long_context_are_padded_to_a_tile() -> None:
    """Nothing to draft from, but 20 rows after 9,000 cached tokens cost more than a tile."""
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    request = prompting_request(1, list(range(10_020)), cached=10_000)
    lookup_before = Acceptance(**vars(speculator._state(request).rate("lookup")))
    speculator.propose([request], capacity=512, call_rows=512)
    assert len(request.draft) == TILE_ROWS - 20
    assert set(request.draft) == {request.pending[-1]}
    assert speculator.verified(request, len(request.draft), 0) == (0, 0)
    assert speculator._state(request).rate("lookup").rate >= lookup_before.rate  # no rejection learnt


def test_a_prompt_is_not_padded_where_its_rows_cost_less_or_other_requests_run() -> None:
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    short = prompting_request(1, list(range(220)), cached=200)  # 20 rows after 200 tokens
    speculator.propose([short], capacity=512, call_rows=512)
    assert short.draft == ()
    long_context = [prompting_request(i, list(range(10_020)), cached=10_000) for i in (2, 3)]
    speculator.propose(long_context, capacity=512, call_rows=TILE_ROWS - 1)
    assert all(r.draft == () for r in long_context)


def test_a_prompt_that_does_not_end_in_this_step_gets_no_draft() -> None:
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    request = prompting_request(1, list(range(10_000)), cached=9_000, prediction=tuple(REPEATED))
    speculator.propose([request], capacity=512, call_rows=512)
    assert request.draft == ()


@pytest.mark.parametrize(("length", "cached"), [(300, 280), (2_100, 2_020), (9_000, 8_000)])
def test_a_draft_after_a_prompt_never_makes_its_call_dearer(length: int, cached: int) -> None:
    """The reply's first token waits for the whole call: short turns after a short history
    (20 rows cost less than a tile), turns of 80 rows (already tiled) and chunks of a
    long prompt's last step get no draft, however good the prediction."""
    speculator = Speculator(max_draft_tokens=TILE_ROWS - 1, ngram_cache_entries=0)
    request = prompting_request(1, [1, 2, 3] * (length // 3), cached=cached, prediction=tuple(REPEATED))
    speculator._state(request).acceptance["prediction"] = Acceptance(accepted=99.0, rejected=1.0)
    speculator.propose([request], capacity=1024, call_rows=1024)
    assert request.draft == ()
