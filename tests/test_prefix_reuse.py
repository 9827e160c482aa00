"""Prefix cache on the real Gemma model: reuse, partial reuse, eviction, tiers, tenants."""

from __future__ import annotations

import logging
from pathlib import Path

from helpers import wait_idle

from kvchat import Engine, EngineSettings, SamplingParams
from kvchat.llama import Model

# Prompts whose greedy continuations have clear top-1 margins: llama.cpp's logits
# shift by up to ~1.0 between batch shapes, so cached and cold runs are compared
# on text where that cannot flip a token (see test_engine.py).
ALPHABET = "The alphabet: A, B, C, D,"
COUNTING = "1, 2, 3, 4, 5,"


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


def test_extending_a_finished_request_evaluates_only_the_new_tokens(idle_engine, idle_cold_engine) -> None:
    model = idle_engine.model
    first_prompt = model.tokenize(ALPHABET, add_special=True) + model.tokenize(" E, F,")
    first = idle_engine.submit(first_prompt, greedy(12)).collect()
    extra = model.tokenize(" and the digits: 0, 1, 2,")
    second_prompt = first_prompt + list(first.token_ids) + extra
    second = idle_engine.submit(second_prompt, greedy(16)).collect()
    # The first request's last sampled token was returned but never evaluated.
    assert second.usage.cached_tokens == len(first_prompt) + len(first.token_ids) - 1
    assert second.usage.evaluated_tokens == len(extra) + 1
    cold = idle_cold_engine.submit(second_prompt, greedy(16)).collect()
    assert cold.usage.cached_tokens == 0
    assert second.token_ids == cold.token_ids


def test_changing_a_middle_token_evaluates_from_the_change_on(idle_engine) -> None:
    model = idle_engine.model
    prompt = model.tokenize(COUNTING + " 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,", add_special=True)
    idle_engine.submit(prompt, greedy(4)).collect()
    changed_at = len(prompt) // 2
    edited = list(prompt)
    edited[changed_at] = model.tokenize(" 99")[-1]
    assert edited[changed_at] != prompt[changed_at]
    usage = idle_engine.submit(edited, greedy(4)).collect().usage
    assert usage.cached_tokens == changed_at
    assert usage.evaluated_tokens == len(edited) - changed_at


def test_the_same_prompt_again_evaluates_exactly_one_token(idle_engine) -> None:
    prompt = idle_engine.model.tokenize("Repeat after me: the same prompt twice.", add_special=True)
    idle_engine.submit(prompt, greedy(3)).collect()
    usage = idle_engine.submit(prompt, greedy(3)).collect().usage
    assert (usage.cached_tokens, usage.evaluated_tokens) == (len(prompt) - 1, 1)


def test_tenants_with_identical_prompts_share_nothing(idle_engine) -> None:
    prompt = idle_engine.model.tokenize("A secret shared by nobody: the tenants are isolated.", add_special=True)
    first = idle_engine.submit(prompt, greedy(3), cache_key="tenant-a").collect().usage
    other = idle_engine.submit(prompt, greedy(3), cache_key="tenant-b").collect().usage
    again = idle_engine.submit(prompt, greedy(3), cache_key="tenant-a").collect().usage
    third = idle_engine.submit(prompt, greedy(3), cache_key="tenant-c").collect().usage
    # tenant-a found nothing although the default namespace holds entries starting with BOS.
    assert first.cached_tokens == 0
    assert other.cached_tokens == 0
    assert again.cached_tokens == len(prompt) - 1
    assert third.cached_tokens == 0


def test_stats_report_hit_rate_and_parked_sequences(idle_engine) -> None:
    prompt = idle_engine.model.tokenize("Counting hits: one, two, three.", add_special=True)
    idle_engine.submit(prompt, greedy(2)).collect()
    before = idle_engine.stats()
    idle_engine.submit(prompt, greedy(2)).collect()
    after = wait_idle(idle_engine)
    assert after.cached_tokens - before.cached_tokens == len(prompt) - 1
    assert after.evaluated_tokens - before.evaluated_tokens == 1
    assert 0 < after.cache_hit_rate < 1
    assert after.parked_sequences >= 1 and after.cache_tokens >= len(prompt)


def test_small_pool_serves_fifty_interleaved_requests_with_evictions(gemma_model) -> None:
    settings = EngineSettings(n_ctx=768, max_running=4, n_seq_max=8, cache_ram_bytes=0)
    topics = ["cats", "the sea", "mountains", "old trains", "bread", "winter", "robots", "gardens", "jazz", "maps"]
    with Engine(gemma_model, settings) as engine:
        histories = [gemma_model.tokenize(f"A conversation about {t}.", add_special=True) for t in topics]
        finished = 0
        for turn in range(5):
            streams = []
            for i, history in enumerate(histories):
                history += gemma_model.tokenize(f" Question {turn} about {topics[i]}:")
                streams.append(engine.submit(history, greedy(6)))
            for i, stream in enumerate(streams):  # 10 at once, 4 running, the rest queued
                done = stream.collect()
                assert done.usage.finish_reason in ("length", "stop")
                histories[i] = histories[i] + list(done.token_ids)
                finished += 1
        stats = wait_idle(engine)
        assert finished == 50
        assert stats.requests_finished == 50
        assert stats.evictions > 0
        assert stats.cached_tokens > 0  # later turns still found their prefixes
        assert stats.tokens_resident <= settings.n_ctx
        assert stats.free_sequences + stats.parked_sequences == settings.n_seq_max


def _fill_pool(engine: Engine, model: Model, n: int) -> None:
    """Run unrelated requests until earlier entries had to be evicted."""
    for i in range(n):
        engine.submit(model.tokenize(f"Filler text number {i} about something else entirely, " * 6,
                                     add_special=True), greedy(4)).collect()


def test_spill_to_ram_then_restore_continues_like_a_cold_run(gemma_model, cold_engine) -> None:
    settings = EngineSettings(n_ctx=512, max_running=2, n_seq_max=4, cache_ram_bytes=64 * 1024 * 1024)
    prompt = gemma_model.tokenize(COUNTING + " 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,",
                                  add_special=True)
    with Engine(gemma_model, settings) as engine:
        engine.submit(prompt, greedy(4)).collect()
        _fill_pool(engine, gemma_model, 6)
        spilled = engine.stats()
        assert spilled.spills > 0 and spilled.ram_tokens >= len(prompt)
        extended = prompt + gemma_model.tokenize(" 21, 22,")
        warm = engine.submit(extended, greedy(16)).collect()
        stats = wait_idle(engine)
    assert stats.restores == 1
    assert warm.usage.cached_tokens >= len(prompt) - 1
    assert warm.usage.evaluated_tokens < len(extended) // 2
    assert warm.token_ids == cold_engine.submit(extended, greedy(16)).collect().token_ids


def test_a_branch_spilled_as_a_tail_comes_back_onto_the_shared_prefix_like_a_cold_run(
    gemma_model, cold_engine
) -> None:
    """Three conversations share a long prompt; evicting one spills only its own turn
    (llama.cpp's state of positions past the prompt), which a later request restores
    onto the prompt's cells in the pool: the answer is the cold run's."""
    settings = EngineSettings(n_ctx=1024, max_running=1, n_seq_max=4, cache_ram_bytes=64 * 1024 * 1024)
    shared = gemma_model.tokenize(COUNTING + "".join(f" {n}," for n in range(6, 30)), add_special=True)
    branches = [shared + gemma_model.tokenize(f" and then the {word} said: one, two, three, four, five, six,")
                for word in ("cat", "dog", "bird")]
    with Engine(gemma_model, settings) as engine:
        for branch in branches:
            engine.submit(branch, greedy(2)).collect()
        engine.submit(gemma_model.tokenize("Something else entirely.", add_special=True), greedy(2)).collect()
        engine.submit(gemma_model.tokenize("And another thing.", add_special=True), greedy(2)).collect()
        spilled = wait_idle(engine)
        extended = branches[0] + gemma_model.tokenize(" seven,")
        warm = engine.submit(extended, greedy(12)).collect()
        stats = wait_idle(engine)
    own = len(branches[0]) - len(shared)
    assert spilled.spills >= 1 and 0 < spilled.ram_tokens < len(shared)  # tails, not whole states
    assert stats.restores == 1 and warm.usage.cached_tokens >= len(branches[0])  # and its first reply token
    assert own >= 16
    assert warm.token_ids == cold_engine.submit(extended, greedy(12)).collect().token_ids


def test_compaction_moves_other_parked_entries_to_ram_and_back(gemma_model, cold_engine) -> None:
    counting = gemma_model.tokenize(COUNTING + "".join(f" {n}," for n in range(6, 40)), add_special=True)
    alphabet = gemma_model.tokenize(ALPHABET + " E, F, G, H, I, J, K, L, M, N, O, P, Q, R, S, T, U, V, W, X,"
                                    " Y, Z, a, b, c, d, e, f, g, h, i, j,", add_special=True)
    short = gemma_model.tokenize("Hello there,", add_special=True)
    assert min(len(counting), len(alphabet)) >= 64  # compaction leaves shorter entries in the pool
    extended = counting + gemma_model.tokenize(" 40, 41,")
    for compact in (True, False):
        settings = EngineSettings(n_ctx=1024, max_running=2, n_seq_max=8, compact_pool=compact)
        with Engine(gemma_model, settings) as engine:
            engine.submit(counting, greedy(2)).collect()
            engine.submit(short, greedy(2)).collect()
            engine.submit(alphabet, greedy(2)).collect()  # admitted while the other two are parked
            parked = wait_idle(engine)
            warm = engine.submit(extended, greedy(12)).collect()
            after = wait_idle(engine)
        if compact:
            # The long entry went to RAM (the pool kept the short one and the running request's)...
            assert parked.spills == 1 and parked.ram_tokens >= len(counting)
            assert parked.parked_sequences == 2
            # ...and came back as a copy when its conversation continued.
            assert after.restores == 1
        else:
            assert (parked.spills, parked.parked_sequences, after.restores) == (0, 3, 0)
        assert warm.usage.cached_tokens >= len(counting) - 1
        assert warm.token_ids == cold_engine.submit(extended, greedy(12)).collect().token_ids


def _disk_settings(cache_dir: Path) -> EngineSettings:
    return EngineSettings(n_ctx=512, max_running=2, n_seq_max=4, cache_ram_bytes=0, cache_dir=str(cache_dir))


def test_disk_tier_survives_an_engine_restart(gemma_model, cold_engine, tmp_path) -> None:
    prompt = gemma_model.tokenize(ALPHABET + " E, F, G, H, I, J, K, L, M, N, O, P,", add_special=True)
    with Engine(gemma_model, _disk_settings(tmp_path)) as engine:
        engine.submit(prompt, greedy(4)).collect()
    assert list(tmp_path.glob("*.kvstate")), "closing the engine persisted nothing"
    extended = prompt + gemma_model.tokenize(" Q, R,")
    with Engine(gemma_model, _disk_settings(tmp_path)) as restarted:
        warm = restarted.submit(extended, greedy(16)).collect()
        assert restarted.stats().restores == 1
    assert warm.usage.cached_tokens >= len(prompt) - 1
    assert warm.token_ids == cold_engine.submit(extended, greedy(16)).collect().token_ids


def test_corrupt_disk_entry_is_skipped_and_the_request_succeeds(gemma_model, cold_engine, tmp_path, caplog) -> None:
    prompt = gemma_model.tokenize(COUNTING + " 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,", add_special=True)
    with Engine(gemma_model, _disk_settings(tmp_path)) as engine:
        engine.submit(prompt, greedy(4)).collect()
    for path in tmp_path.glob("*.kvstate"):
        data = bytearray(path.read_bytes())
        for i in range(len(data) - 64, len(data)):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    extended = prompt + gemma_model.tokenize(" 16, 17,")
    with caplog.at_level(logging.WARNING, logger="kvchat"):
        with Engine(gemma_model, _disk_settings(tmp_path)) as restarted:
            warm = restarted.submit(extended, greedy(8)).collect()
            assert restarted.stats().restores == 0
    assert warm.usage.finish_reason == "length"
    assert warm.usage.cached_tokens == 0
    assert warm.token_ids == cold_engine.submit(extended, greedy(8)).collect().token_ids
    assert any("kvstate" in r.getMessage() or "corrupt" in r.getMessage().lower() for r in caplog.records)
