"""Context shift: a prompt too long for the context keeps its head, drops the oldest
half of the rest, and reuses the original's cached KV moved back in position."""

from __future__ import annotations

import pytest
from helpers import assert_idle

from kvchat import ContextOverflowError, Engine, EngineSettings, InvalidRequestError, SamplingParams
from kvchat.chat import chat_tokenizer, complete
from kvchat.engine import ContextShift
from kvchat.llama import Model


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


def test_to_fit_drops_whole_halves_after_the_kept_head() -> None:
    original = tuple(range(300))
    shift = ContextShift.to_fit(original, n_keep=20, budget=200)
    half = (200 - 20) // 2
    assert shift.n_drop == 2 * half  # 100 too many: one half (90) is not enough
    assert shift.prompt == original[:20] + original[20 + 2 * half:]
    assert len(shift.prompt) <= 200
    # A longer original within the same step keeps the same cut, so its prefix is shared.
    longer = ContextShift.to_fit(original + (1, 2, 3), n_keep=20, budget=200)
    assert longer.n_drop == shift.n_drop and longer.prompt[: len(shift.prompt)] == shift.prompt
    with pytest.raises(ContextOverflowError):
        ContextShift.to_fit(original, n_keep=199, budget=200)


@pytest.fixture(scope="module")
def small_gemma(gemma_model: Model) -> Engine:
    # The default cache tiers (RAM tier, pool compaction): the shift must find the original's KV anyway.
    settings = EngineSettings(n_ctx=1024, max_request_tokens=256, max_running=2, n_seq_max=8)
    with Engine(gemma_model, settings) as engine:
        yield engine


def test_shift_reuses_the_originals_kv_and_the_next_call_reuses_the_shift(small_gemma: Engine) -> None:
    model = small_gemma.model
    head = model.tokenize("Numbers:", add_special=True)
    count = 1
    while len(head + model.tokenize(" " + ", ".join(str(i) for i in range(1, count + 1)) + ",")) < 222:
        count += 1
    history = head + model.tokenize(" " + ", ".join(str(i) for i in range(1, count + 1)) + ",")
    assert len(history) + 16 <= small_gemma.context_limit < len(history) + 120
    first = small_gemma.submit(history, greedy(16)).collect()  # cached: history + answer
    original = tuple(history + list(first.token_ids) + model.tokenize(" and more: 1, 2, 3,"))
    shift = ContextShift.to_fit(original, n_keep=len(head), budget=small_gemma.context_limit - 16)
    assert shift.n_drop > 0
    shifted = small_gemma.submit(list(shift.prompt), greedy(16), shift=shift).collect()
    cached_by_shift = len(history) + len(first.token_ids) - 1 - shift.n_drop  # the original's KV, moved back
    assert shifted.usage.cached_tokens == cached_by_shift
    assert shifted.usage.finish_reason == "length" and len(shifted.token_ids) == 16
    assert small_gemma.stats().shifts == 1
    # The caller's next call: longer history, same cut, so the shifted prompt is a cached prefix.
    follow_up = original + tuple(shifted.token_ids) + tuple(model.tokenize(" 4,"))
    again = ContextShift.to_fit(follow_up, n_keep=len(head), budget=small_gemma.context_limit - 16)
    assert again.n_drop == shift.n_drop
    reused = small_gemma.submit(list(again.prompt), greedy(16), shift=again).collect()
    assert reused.usage.cached_tokens == len(shift.prompt) + len(shifted.token_ids) - 1
    assert_idle(small_gemma)


def test_shift_prompt_must_match_the_shift(small_gemma: Engine) -> None:
    shift = ContextShift(tuple(range(10, 40)), n_keep=2, n_drop=4)
    with pytest.raises(InvalidRequestError):
        small_gemma.submit(list(range(10, 30)), greedy(2), shift=shift)


def test_complete_with_shift_keeps_the_system_prompt(qwen_model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    # Requests are limited to 320 tokens; the pool has room for the earlier KV and the shifted request.
    settings = EngineSettings(n_ctx=1024, max_request_tokens=320, max_running=2, n_seq_max=4)
    with Engine(qwen_model, settings) as engine:
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for i in range(10):
            messages += [{"role": "user", "content": f"Tell me fact number {i} about the ocean, please."},
                         {"role": "assistant", "content": f"Fact {i}: the ocean is deep, wide and salty."}]
        messages.append({"role": "user", "content": "Now summarise in one word."})
        tokenizer = chat_tokenizer(engine)
        system = tokenizer.encode(messages[:1], add_generation_prompt=False)
        full = tokenizer.encode(messages)
        assert len(full) + 16 > engine.context_limit
        assert full[: len(system)] == system
        # An earlier call left the start of this conversation in the cache: the KV the shift moves.
        earlier = engine.context_limit - 16
        assert engine.submit(full[:earlier], greedy(1)).collect().usage.evaluated_tokens == earlier
        submitted = []
        submit = engine.submit

        def spy(prompt_tokens, sampling=None, **options):
            submitted.append((list(prompt_tokens), options.get("shift")))
            return submit(prompt_tokens, sampling, **options)

        monkeypatch.setattr(engine, "submit", spy)
        stream = complete(engine, messages, sampling=greedy(16), overflow="shift")
        reply = stream.collect()
        [(prompt, shift)] = submitted
        # The engine got the shortened prompt, and it starts with the system prompt, whole.
        assert shift is not None and shift.original == tuple(full) and shift.n_drop > 0
        assert shift.n_keep == len(system) and prompt == list(shift.prompt)
        assert prompt[: len(system)] == system and prompt[len(system):] == full[len(system) + shift.n_drop:]
        assert stream.prompt_tokens == len(prompt) and stream.prompt_tokens + 16 <= engine.context_limit
        # Its KV is the earlier KV shifted: the system prompt's cells kept in place (not dropped, not
        # evaluated again), the cut removed and the rest moved back.
        assert engine.stats().shifts == 1
        assert reply.usage.cached_tokens == earlier - shift.n_drop
        assert reply.usage.finish_reason in ("stop", "length")
        assert_idle(engine)
