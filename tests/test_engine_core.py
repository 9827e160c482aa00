"""The real engine (its worker thread, its core's step) on the fake backend: no model.

`FakeBackend` evaluates tokens into cells and derives each row's logits from
the cells its sequence holds, so every test here checks outputs against
`reference_greedy`, which computes them without any KV: a request that was
given wrong cells (a bad share, a bad restore, a draft's leftovers) says
something else.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
from fake_kv import N_VOCAB, FakeBackend, FakeModel, fake_logits, reference_greedy
from helpers import CHI2_CRITICAL_0001, chi_square_homogeneity

from kvchat import Engine, EngineSettings, SamplingParams
from kvchat.errors import DecodeError, EngineClosedError, InvalidRequestError

GREEDY = SamplingParams(temperature=0.0, max_tokens=None)


def make_engine(*, n_ctx: int = 512, n_seq_max: int = 8, n_batch: int = 64, **options: object) -> tuple[Engine, FakeBackend]:
    backend = FakeBackend(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch)
    settings = EngineSettings(**{"cache_ram_bytes": 0, **options})  # type: ignore[arg-type]
    return Engine(FakeModel(), settings, memory=backend, runner=backend), backend  # type: ignore[arg-type]


def greedy(max_tokens: int, **options: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **options)  # type: ignore[arg-type]


def prompt_of(seed: int, length: int) -> list[int]:
    return [1 + (seed * 13 + i * 7) % 64 for i in range(length)]


def engine_is_clean(engine: Engine, backend: FakeBackend) -> None:
    """Idle, nothing leaked: every cell in use is a parked entry's (or a conversation's),
    each parked sequence holds exactly its tree path, and every sequence id is free
    or parked. Checked on the worker thread, between steps."""

    def check(_pinned: object) -> None:
        core = engine._core
        cache = core.pool.cache
        assert not core.busy
        assert core.pool.reserved_cells == 0
        if cache is not None:
            cache.check_integrity()
            assert cache.protected_tokens == 0
            assert backend.cells_used() == cache.total_tokens + core.pool.pinned_cells
            for holder, tokens in cache.held_tokens().items():
                assert backend.tokens(holder) == list(tokens)
        assert core.pool.free_sequences + core.pool.parked_sequences == backend.n_seq_max  # no id leaked

    engine._on_worker(check)


def test_one_request_generates_what_greedy_decoding_gives() -> None:
    engine, backend = make_engine(speculation="off")
    with engine:
        prompt = prompt_of(1, 20)
        done = engine.submit(prompt, greedy(30)).collect()
        assert list(done.token_ids) == reference_greedy(prompt, 30)
        assert done.usage.prompt_tokens == 20 and done.usage.evaluated_tokens == 20
        engine_is_clean(engine, backend)


def test_a_second_request_reuses_the_cached_prefix_and_evaluates_only_the_rest() -> None:
    engine, backend = make_engine(speculation="off")
    with engine:
        first = prompt_of(2, 40)
        engine.submit(first, greedy(8)).collect()
        second = first[:32] + prompt_of(3, 10)
        done = engine.submit(second, greedy(12)).collect()
        assert done.usage.cached_tokens == 32 and done.usage.evaluated_tokens == 10
        assert list(done.token_ids) == reference_greedy(second, 12)
        engine_is_clean(engine, backend)


def test_many_requests_at_once_each_get_their_own_output() -> None:
    engine, backend = make_engine(speculation="off", max_running=6)
    with engine:
        prompts = [prompt_of(seed, 10 + seed) for seed in range(12)]
        streams = [engine.submit(p, greedy(25)) for p in prompts]
        for prompt, stream in zip(prompts, streams, strict=True):
            assert list(stream.collect().token_ids) == reference_greedy(prompt, 25)
        engine_is_clean(engine, backend)


def test_a_full_pool_preempts_and_every_request_still_gets_exactly_its_tokens() -> None:
    engine, backend = make_engine(n_ctx=160, speculation="off", reservation_step=8, max_running=4)
    with engine:
        prompts = [prompt_of(seed, 12) for seed in range(4)]
        streams = [engine.submit(p, greedy(60)) for p in prompts]  # 4 x 72 cells > 160
        outputs = [list(s.collect().token_ids) for s in streams]
        assert engine.stats().preemptions > 0
        for prompt, output in zip(prompts, outputs, strict=True):
            assert output == reference_greedy(prompt, 60)
        engine_is_clean(engine, backend)


def test_speculation_drafts_from_the_prompt_and_keeps_greedy_output_exact() -> None:
    engine, backend = make_engine(n_ctx=1024)
    with engine:
        first = prompt_of(5, 6)
        reply = reference_greedy(first, 120)
        # A prompt that quotes the reply: lookup drafts from it, verification keeps the output exact.
        prompt = first + reply + first
        done = engine.submit(prompt, greedy(120)).collect()
        assert list(done.token_ids) == reference_greedy(prompt, 120)
        assert done.usage.draft_tokens > 0 and done.usage.accepted_draft_tokens > 0
        engine_is_clean(engine, backend)


def test_a_prediction_is_drafted_and_a_wrong_one_changes_nothing() -> None:
    engine, backend = make_engine(n_ctx=1024)
    with engine:
        prompt = prompt_of(6, 10)
        expected = reference_greedy(prompt, 40)
        right = engine.submit(prompt, greedy(40, prediction=tuple(expected))).collect()
        assert list(right.token_ids) == expected
        assert right.usage.accepted_draft_tokens >= 30
        wrong = engine.submit(prompt_of(7, 10), greedy(40, prediction=tuple(range(1, 41)))).collect()
        assert list(wrong.token_ids) == reference_greedy(prompt_of(7, 10), 40)
        engine_is_clean(engine, backend)


def test_a_short_turn_after_a_long_history_is_padded_to_a_tile_and_stays_exact() -> None:
    """A 20-token turn after 3,000 cached tokens: its rows cost more than a tile's on the
    CPU, so the engine sends a tile (the turn, then a draft and padding after it); the
    reply is exactly greedy decoding's, and the drafted rows leave no cell behind."""
    engine, backend = make_engine(n_ctx=8192)
    with engine:
        history = prompt_of(8, 3000)
        first = engine.submit(history, greedy(4)).collect()
        prompt = history + list(first.token_ids) + prompt_of(9, 20)
        decodes, rows = backend.decodes, backend.rows_decoded
        # Room to pad (a reservation of 100 tokens); ended by its first token.
        stop = reference_greedy(prompt, 1)[0]
        done = engine.submit(prompt, greedy(100, stop_token_ids=(stop,))).collect()
        assert done.token_ids == () and done.usage.finish_reason == "stop"
        assert done.usage.evaluated_tokens == 21  # the first reply's last token, and the turn
        assert (backend.decodes - decodes, backend.rows_decoded - rows) == (1, 64)  # one call, one tile
        assert done.usage.draft_tokens <= 64 - 21  # the tile's rows past the turn (padding counts in no tally)
        engine_is_clean(engine, backend)


def test_a_predictions_first_tokens_come_with_a_short_turn_after_a_long_history() -> None:
    """The tile a short turn pays for anyway carries the prediction's first tokens: the
    reply's first chunk holds several tokens, and the reply is greedy decoding's."""
    engine, backend = make_engine(n_ctx=8192)
    with engine:
        history = prompt_of(10, 3000)
        first = engine.submit(history, greedy(4)).collect()
        prompt = history + list(first.token_ids) + prompt_of(11, 20)
        expected = reference_greedy(prompt, 60)  # (room for a tile: 60 tokens reserved)
        stream = engine.submit(prompt, greedy(60, prediction=tuple(expected)))
        chunks = [chunk.token_ids for chunk in stream]
        assert len(chunks[0]) > 1
        assert [t for chunk in chunks for t in chunk] == expected
        engine_is_clean(engine, backend)


def first_stop_inside_a_long_accepted_draft() -> tuple[list[int], int, list[int]]:
    """A prompt whose greedy reply, drafted in full by a prediction, has a token that
    can serve as a stop token in its middle."""
    for seed in range(200):
        prompt = prompt_of(seed, 8)
        reply = reference_greedy(prompt, 40)
        if len(reply) == 40:
            stop = reply[20]
            if stop not in reply[:20]:
                return prompt, stop, reply
    raise AssertionError("no such prompt")


def test_a_stop_inside_an_accepted_draft_keeps_only_the_cells_before_it() -> None:
    engine, backend = make_engine(n_ctx=1024)
    with engine:
        prompt, stop, reply = first_stop_inside_a_long_accepted_draft()
        done = engine.submit(prompt, greedy(40, prediction=tuple(reply), stop_token_ids=(stop,))).collect()
        assert list(done.token_ids) == reply[:20] and done.usage.finish_reason == "stop"
        assert done.usage.accepted_draft_tokens > 20  # the draft ran past the stop
        # Parked: the prompt and the reply before the stop, as decoding without drafts would hold.
        cache = engine._core.pool.cache
        assert cache is not None
        match = cache.peek(prompt + reply, namespace=None)
        assert match.length == len(prompt) + 20
        assert match.holder is not None and backend.tokens(match.holder) == prompt + reply[:20]
        engine_is_clean(engine, backend)


def test_a_seeded_sampled_request_repeats_itself() -> None:
    engine, backend = make_engine()
    with engine:
        sampling = SamplingParams(temperature=1.0, seed=42, max_tokens=30)
        first = engine.submit(prompt_of(8, 12), sampling).collect()
        second = engine.submit(prompt_of(8, 12), sampling).collect()
        assert first.token_ids == second.token_ids and len(first.token_ids) > 0
        engine_is_clean(engine, backend)


def endless_prompt(length: int = 3000) -> list[int]:
    """A prompt whose greedy reply runs `length` tokens without an end token."""
    return next(p for p in (prompt_of(seed, 10) for seed in range(100)) if len(reference_greedy(p, length)) == length)


def test_a_cancelled_request_ends_cancelled_and_releases_its_cells() -> None:
    engine, backend = make_engine(n_ctx=4096, speculation="off")
    backend.decode_seconds = 0.005  # the cancel comes long before 3,000 tokens
    with engine:
        stream = engine.submit(endless_prompt(), greedy(3000))
        chunks = iter(stream)
        next(chunks)
        stream.cancel()
        assert list(chunks)[-1].finish_reason == "cancelled"
        engine.submit(prompt_of(10, 5), greedy(2)).collect()  # a step after: the engine is idle again
        engine_is_clean(engine, backend)


def test_a_decode_error_fails_the_running_requests_and_the_engine_serves_on() -> None:
    engine, backend = make_engine(speculation="off")
    with engine:
        backend.fail_next_decode = 1  # llama.cpp: no KV slot
        with pytest.raises(DecodeError):
            engine.submit(prompt_of(11, 10), greedy(5)).collect()
        done = engine.submit(prompt_of(12, 10), greedy(5)).collect()
        assert list(done.token_ids) == reference_greedy(prompt_of(12, 10), 5)
        engine_is_clean(engine, backend)


def test_a_conversation_runs_in_its_pinned_sequence_forks_and_rewinds() -> None:
    engine, backend = make_engine(speculation="off")
    with engine:
        conversation = engine.conversation()
        conversation.prompt(prompt_of(13, 10))
        first = list(conversation.generate(greedy(6)).collect().token_ids)
        assert first == reference_greedy(prompt_of(13, 10), 6)
        resident = conversation.tokens
        assert backend.tokens(conversation._pinned.seq_id) == resident
        fork = conversation.fork()
        fork.prompt([5, 6, 7])
        forked = list(fork.generate(greedy(4)).collect().token_ids)
        history = prompt_of(13, 10) + first
        assert forked == reference_greedy(history + [5, 6, 7], 4)
        conversation.rewind(3)
        assert backend.tokens(conversation._pinned.seq_id) == conversation.tokens
        fork.close()
        conversation.close()
        engine_is_clean(engine, backend)


def test_close_cancels_running_and_queued_requests_and_refuses_new_ones() -> None:
    engine, backend = make_engine(n_ctx=8192, speculation="off", max_running=1)
    backend.decode_seconds = 0.01  # 5,000 tokens would take a minute: close comes first
    running = engine.submit(endless_prompt(5000), greedy(5000))
    queued = engine.submit(prompt_of(15, 4), greedy(5000))
    chunks = iter(running)
    next(chunks)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(10)
    assert not closer.is_alive()
    assert list(chunks)[-1].finish_reason == "cancelled"
    assert queued.collect().usage.finish_reason == "cancelled"
    with pytest.raises(EngineClosedError):
        engine.submit(prompt_of(16, 4), greedy(2))


def test_prompts_outside_the_vocabulary_are_refused_before_queueing() -> None:
    engine, backend = make_engine()
    with engine:
        with pytest.raises(InvalidRequestError):
            engine.submit([1, 2, N_VOCAB], greedy(2))
        assert backend.decodes == 0


def test_the_fake_logits_depend_on_the_previous_cell() -> None:
    """The premise of these tests: the same token after different cells gives
    different logits, so wrong cells change the output."""
    assert (fake_logits(3, 5) != fake_logits(4, 5)).any()


def test_chi_square_detects_a_changed_distribution() -> None:
    same = chi_square_homogeneity(Counter({1: 100, 2: 60, 3: 40}), Counter({1: 98, 2: 63, 3: 39}))
    skewed = chi_square_homogeneity(Counter({1: 100, 2: 60, 3: 40}), Counter({1: 160, 2: 25, 3: 15}))
    assert same[0] < CHI2_CRITICAL_0001[same[1]] < skewed[0]


def test_drafting_keeps_the_sampling_distribution() -> None:
    """Chi-square test of homogeneity over the first two sampled tokens, with many
    seeds, with speculation and without. The second token is the first one a draft
    can cover: the prediction drafts the most likely second token after each of the
    likely first ones, so drafts are accepted sometimes and rejected sometimes."""
    prompt = prompt_of(17, 6)
    likely_firsts = np.argsort(fake_logits(prompt[-2], prompt[-1]))[::-1][:4]
    prediction: list[int] = []
    for first in map(int, likely_firsts):
        prediction += [first, int(np.argmax(fake_logits(prompt[-1], first)))]
    n = 1500

    def pairs(speculation: str, seeds: range, prediction: tuple[int, ...]) -> tuple[Counter, int, int]:
        engine, _ = make_engine(n_ctx=2048, speculation=speculation, prefix_cache=False)
        counts: Counter = Counter()
        drafted = accepted = 0
        with engine:
            for batch in range(seeds.start, seeds.stop, 4):  # 4 at a time, as a server runs them
                streams = [
                    engine.submit(prompt, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                                         max_tokens=2, seed=seed, prediction=prediction))
                    for seed in range(batch, min(batch + 4, seeds.stop))
                ]
                for stream in streams:
                    counts[stream.collect().token_ids] += 1
                    drafted += stream.usage.draft_tokens
                    accepted += stream.usage.accepted_draft_tokens
        return counts, drafted, accepted

    with_drafts, drafted, accepted = pairs("auto", range(0, n), tuple(prediction))
    without, _, _ = pairs("off", range(n, 2 * n), ())
    assert drafted >= n // 3, "too few drafts were verified for the test to mean anything"
    assert 0 < accepted < drafted, "drafts should be accepted sometimes and rejected sometimes"
    statistic, df = chi_square_homogeneity(with_drafts, without)
    assert df >= 4, f"too few likely outputs: {with_drafts}, {without}"
    assert statistic < CHI2_CRITICAL_0001[df], f"chi2={statistic:.1f} (df={df}): {with_drafts} vs {without}"


def test_making_room_for_a_restore_does_not_drop_the_state_it_restores() -> None:
    # The RAM tier holds two entries. A and B are spilled to it by compaction; C and D
    # stay parked (no room left in the tier). A extended then plans to restore A, the
    # tier's least recently used entry, and making room for it evicts C or D into the
    # tier: that must drop B, not the very state the request is about to load.
    entry_bytes = len(FakeBackend.state_of_tokens(list(range(104))))
    engine, backend = make_engine(n_ctx=256, max_running=1, n_seq_max=8, cache_ram_bytes=int(entry_bytes * 2.5))
    with engine:
        prompts = [prompt_of(seed, 100) for seed in (1, 2, 3, 4)]
        for prompt in prompts:
            engine.submit(prompt, greedy(4)).collect()
        spilled = engine.stats()
        assert spilled.ram_tokens >= 2 * 100  # A and B
        extended = prompts[0] + prompt_of(9, 40)
        result = engine.submit(extended, greedy(4)).collect()
        stats = engine.stats()
        assert stats.restore_failures == 0
        assert stats.restores == spilled.restores + 1
        assert result.usage.cached_tokens >= 100  # A's prompt came back from RAM
        assert list(result.token_ids) == reference_greedy(extended, 4)
        engine_is_clean(engine, backend)


def test_requests_that_start_together_with_a_long_shared_prompt_evaluate_it_once() -> None:
    """Agents' sessions start together with the same instructions and tools: the later
    ones wait while the first evaluates them, then share its cells."""
    engine, backend = make_engine(n_ctx=2048, speculation="off")
    shared = prompt_of(20, 600)
    prompts = [shared + prompt_of(30 + i, 12) for i in range(3)]
    unrelated = prompt_of(40, 30)
    with engine:
        streams = [engine.submit(p, greedy(6)) for p in prompts]
        other = engine.submit(unrelated, greedy(6))
        done = [s.collect() for s in streams]
        alone = other.collect()
        for prompt, d in zip(prompts, done, strict=True):
            assert list(d.token_ids) == reference_greedy(prompt, 6)
        assert sum(d.usage.evaluated_tokens for d in done) == 600 + 3 * 12
        assert list(alone.token_ids) == reference_greedy(unrelated, 6)
        engine_is_clean(engine, backend)


def test_two_tenants_starting_together_with_the_same_prompt_share_nothing() -> None:
    engine, backend = make_engine(n_ctx=2048, speculation="off")
    shared = prompt_of(21, 600)
    with engine:
        first = engine.submit(shared + [5], greedy(4), cache_key="a")
        second = engine.submit(shared + [6], greedy(4), cache_key="b")
        assert second.collect().usage.cached_tokens == 0
        assert first.collect().usage.cached_tokens == 0
        engine_is_clean(engine, backend)
