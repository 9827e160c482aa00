"""Speculative decoding on the real model: drafts change how fast, never what.

Qwen2.5-Coder 0.5B, whose answers to "repeat this code" follow the prompt, so
prompt lookup and predictions draft long stretches. Two engines on the same
model, one drafting and one not, without prefix cache so both evaluate every
prompt token. llama.cpp's logits differ slightly between batch shapes, so the
prompts here have clear margins (as the engine tests' do).
"""

from __future__ import annotations

import json

import pytest
from helpers import assert_idle

from kvchat import Engine, EngineSettings
from kvchat.chat.response_format import grammar_for_response_format
from kvchat.engine import SamplingParams
from kvchat.llama import Model

pytestmark = pytest.mark.model

CODE = '''def moving_average(values, window):
    """Return the moving averages of values over window."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''

SETTINGS = dict(n_ctx=4096, max_running=8, n_seq_max=8, prefix_cache=False)


def chatml(user: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful coding assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


REPEAT_CODE = chatml(f"Repeat this code exactly, in a python code block:\n```python\n{CODE}```")


@pytest.fixture(scope="module")
def drafting(qwen_model: Model) -> Engine:
    with Engine(qwen_model, EngineSettings(**SETTINGS, speculation="auto")) as engine:
        yield engine


@pytest.fixture(scope="module")
def plain(qwen_model: Model) -> Engine:
    with Engine(qwen_model, EngineSettings(**SETTINGS, speculation="off")) as engine:
        yield engine


@pytest.fixture
def idle_drafting(drafting: Engine) -> Engine:
    yield drafting
    assert_idle(drafting)


def tokens(engine: Engine, text: str) -> list[int]:
    return engine.model.tokenize(text, add_special=False, parse_special=True)


def run(engine: Engine, prompt: str, sampling: SamplingParams):
    stream = engine.submit(tokens(engine, prompt), sampling)
    result = stream.collect()
    return result.token_ids, stream.usage


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


GREEDY_PROMPTS = [
    REPEAT_CODE,  # drafts mostly accepted (the reply copies the prompt)
    chatml("Count from 1 to 30, separated by commas."),
    chatml("Write the numbers one to ten in English words, one per line."),
]


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS, ids=["repeat-code", "count", "words"])
def test_greedy_output_equals_plain_decoding(idle_drafting: Engine, plain: Engine, prompt: str) -> None:
    expected, plain_usage = run(plain, prompt, greedy(40))
    got, usage = run(idle_drafting, prompt, greedy(40))
    assert got == expected
    assert usage.completion_tokens == plain_usage.completion_tokens
    assert plain_usage.draft_tokens == 0
    assert usage.draft_tokens >= usage.accepted_draft_tokens >= 0


def test_a_reply_that_repeats_the_prompt_is_drafted_and_mostly_accepted(qwen_model: Model) -> None:
    # A fresh engine: how long its drafts are depends on the acceptance it has seen, and
    # the module's shared drafting engine has just seen prose (the counting prompts) too.
    with Engine(qwen_model, EngineSettings(**SETTINGS, speculation="auto")) as engine:
        _, usage = run(engine, REPEAT_CODE, greedy(96))
        assert usage.accepted_draft_tokens >= usage.completion_tokens // 2
        stats = engine.stats()
        assert stats.draft_tokens >= usage.draft_tokens and 0 < stats.acceptance_rate <= 1
        assert_idle(engine)


def test_prediction_fully_partly_and_never_accepted_gives_the_same_output(
    idle_drafting: Engine, plain: Engine
) -> None:
    prompt = chatml("Write the numbers one to twelve in English words, one per line.")
    expected, _ = run(plain, prompt, greedy(40))
    assert len(expected) == 40

    # Fully: the prediction is the reply itself.
    got, usage = run(idle_drafting, prompt, greedy(40, prediction=expected))
    assert got == expected
    assert usage.accepted_draft_tokens >= 30 and usage.accepted_draft_tokens <= usage.completion_tokens

    # Partly: the reply with its middle replaced.
    wrong = tokens(idle_drafting, " banana kiwi melon")
    partly = [*expected[:15], *wrong, *expected[15:]]
    got, usage = run(idle_drafting, prompt, greedy(40, prediction=partly))
    assert got == expected
    assert usage.accepted_draft_tokens > 0 and usage.rejected_draft_tokens > 0

    # Never: the prediction starts with the reply's first token, then goes astray.
    never = [expected[0], *tokens(idle_drafting, " zebra quartz umbrella" * 4)]
    got, usage = run(idle_drafting, prompt, greedy(40, prediction=never))
    assert got == expected
    assert usage.rejected_draft_tokens > 0


def test_json_schema_output_with_drafting_matches_plain(idle_drafting: Engine, plain: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "tags"],
    }
    grammar = grammar_for_response_format({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    # Values spelled out in the prompt: no near-tie between batch shapes (an open
    # choice of tags had one of 0.1 logit, where llama.cpp's shapes disagree).
    prompt = chatml(
        'Give a JSON object with "name" set to "moving_average" and "tags" set to the list '
        '"python", "statistics", "window".'
    )
    expected, _ = run(plain, prompt, greedy(64, grammar=grammar))
    got, usage = run(idle_drafting, prompt, greedy(64, grammar=grammar, prediction=expected))
    assert got == expected
    assert usage.accepted_draft_tokens > 0
    text = idle_drafting.model.detokenize(list(got))
    assert set(json.loads(text)) == {"name", "tags"}


def test_a_stop_string_inside_an_accepted_draft_ends_there(idle_drafting: Engine, plain: Engine) -> None:
    sampling = greedy(128, stop=("total = 0.0",))
    expected = plain.submit(tokens(plain, REPEAT_CODE), sampling).collect()
    stream = idle_drafting.submit(
        tokens(idle_drafting, REPEAT_CODE), greedy(128, stop=("total = 0.0",), prediction=tuple(expected.token_ids))
    )
    got = stream.collect()
    assert got.text == expected.text and "total = 0.0" not in got.text
    assert stream.usage.finish_reason == "stop"
    assert stream.usage.accepted_draft_tokens > 0


def test_cancel_in_the_middle_of_a_verified_draft_leaks_nothing(qwen_model: Model) -> None:
    # Short drafts, so that the reply takes many steps and the cancel lands mid-way
    # (a tile's worth of draft could finish it before the cancel is seen).
    with Engine(qwen_model, EngineSettings(**SETTINGS, max_draft_tokens=8)) as engine:
        stream = engine.submit(tokens(engine, REPEAT_CODE), greedy(200))
        seen = 0
        for chunk in stream:
            seen += len(chunk.token_ids)
            if seen >= 40:  # drafts of several tokens are being verified step by step by now
                stream.cancel()
        assert stream.usage.finish_reason == "cancelled"
        assert seen < 200
        assert stream.usage.accepted_draft_tokens > 0
        assert_idle(engine)


def test_no_rejected_token_stays_in_the_kv_or_the_prefix_cache(qwen_model: Model) -> None:
    """Drafts that are mostly rejected, then the parked sequence reused: each parked
    sequence's KV ends where its tree entry ends, and a request continuing the
    reply from the cache gets the tokens a cold evaluation of the same text gets."""
    prompt = chatml("Write the numbers one to twelve in English words, one per line.")
    with Engine(qwen_model, EngineSettings(n_ctx=4096, n_seq_max=8, max_running=4)) as engine:
        prompt_ids = tokens(engine, prompt)
        first = engine.submit(prompt_ids, greedy(24)).collect().token_ids
        astray = (first[0], *tokens(engine, " zebra quartz umbrella" * 6))
        stream = engine.submit(prompt_ids, greedy(24, prediction=astray))
        reply = stream.collect().token_ids
        assert reply == first and stream.usage.rejected_draft_tokens > 0
        assert_idle(engine)

        pool = engine._core.pool
        assert pool.parked_sequences > 0
        engine._on_worker(lambda _: pool.check_parked())  # each holds exactly its entry's positions

        follow_up = [*prompt_ids, *reply, *tokens(engine, "<|im_end|>\n<|im_start|>user\nAnd thirteen?<|im_end|>\n")]
        warm = engine.submit(follow_up, greedy(12, prediction=astray))
        warm_ids = warm.collect().token_ids
        assert warm.usage.cached_tokens >= len(prompt_ids) + len(reply) - 1
    with Engine(qwen_model, EngineSettings(**SETTINGS, speculation="off")) as cold_engine:
        cold_ids = cold_engine.submit(follow_up, greedy(12)).collect().token_ids
    assert warm_ids == cold_ids

