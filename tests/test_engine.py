"""Engine behaviour on the real Gemma 270M model: batching, cancel, stops, UTF-8, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from helpers import assert_idle, wait_idle

from kvchat import (
    ContextOverflowError,
    Engine,
    EngineClosedError,
    EngineSettings,
    InvalidRequestError,
    ModelLoadError,
    SamplingParams,
)
from kvchat.engine.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS
from kvchat.llama import Model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n",
    "My favourite recipe for pancakes:",
    "The quick brown fox",
    "In 1492, Columbus",
]


# llama.cpp's logits differ by up to ~1.0 between batch shapes (measured here, on
# the bare llama_decode loop too), so a greedy path with a near-tie flips whenever
# the batch composition changes, with or without kvchat. These prompts have a
# top-1 margin of at least 1.3 logits at each of their first 16 greedy tokens.
BATCH_PROMPTS = [
    "1\n2\n3\n4\n5\n",
    "ab ab ab ab ab ab ab",
    "1, 2, 3, 4, 5,",
    "0 1 2 3 4 5 6",
    "1. 2. 3. 4. 5.",
    "a b c d e f",
    "5, 10, 15, 20,",
    "A1 A2 A3 A4 A5",
]


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


def test_eight_concurrent_requests_match_each_request_alone(idle_cold_engine: Engine) -> None:
    # Without the prefix cache, so that both runs evaluate every prompt token.
    alone = [idle_cold_engine.generate(p, greedy(16)).collect().token_ids for p in BATCH_PROMPTS]
    streams = [idle_cold_engine.generate(p, greedy(16)) for p in BATCH_PROMPTS]
    iterators = [iter(s) for s in streams]
    firsts = [next(it).token_ids for it in iterators]  # every request has started generating
    active_mid_flight = idle_cold_engine.stats().active
    together = [first + tuple(t for chunk in it for t in chunk.token_ids) for first, it in zip(firsts, iterators)]
    assert active_mid_flight > 1, "requests were not decoded together"
    for prompt, a, t in zip(BATCH_PROMPTS, alone, together):
        assert len(a) == 16
        assert t == a, f"batched output differs for {prompt!r}"
    assert all(s.usage.finish_reason == "length" for s in streams)


def test_requests_without_max_tokens_run_together_and_match_each_alone(
    gemma_model: Model, idle_cold_engine: Engine
) -> None:
    """The official clients' default: no max_tokens. On a pool too small for all four
    at their full length, all four start at once; the pool fills, the youngest
    are preempted and resumed, and every output is still the one it gives alone."""
    # Counting: clear margins. 33 to 54 tokens each, so that all four are admitted at once
    # (4 x (prompt + the reservation step of 16) <= 256, the smallest pool llama.cpp makes)
    # and then outgrow the pool (4 x (prompt + 32) > 256) after a few tokens each.
    prompts = [
        ", ".join(str(i) for i in range(1, 15)) + ",",
        " ".join(str(i) for i in range(17)),
        "\n".join(str(i) for i in range(1, 15)) + "\n",
        ", ".join(str(i) for i in range(5, 75, 5)) + ",",
    ]
    length = 32
    alone = [idle_cold_engine.generate(p, greedy(length)).collect().token_ids for p in prompts]
    settings = EngineSettings(n_ctx=160, max_running=4, n_seq_max=8, open_max_tokens=length, reservation_step=16)
    with Engine(gemma_model, settings) as engine:
        streams = [engine.generate(p, greedy(None)) for p in prompts]
        first_at: list[float] = [0.0] * len(prompts)
        done_at: list[float] = [0.0] * len(prompts)
        outputs: list[tuple[int, ...]] = [()] * len(prompts)

        def consume(i: int) -> None:
            chunks = iter(streams[i])
            tokens = list(next(chunks).token_ids)
            first_at[i] = time.monotonic()
            tokens += [t for chunk in chunks for t in chunk.token_ids]
            done_at[i], outputs[i] = time.monotonic(), tuple(tokens)

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert max(first_at) < min(done_at), "a request waited for another to finish before it started"
        assert engine.stats().preemptions > 0  # the pool filled up: the youngest gave way and came back
        for prompt, together, by_itself in zip(prompts, outputs, alone):
            assert together == by_itself, f"output differs for {prompt!r}"
        assert all(s.usage.finish_reason == "length" and s.usage.completion_tokens == length for s in streams)
        assert_idle(engine)


def test_cancel_one_of_four_frees_its_sequence(idle_engine: Engine) -> None:
    streams = [idle_engine.generate(p, greedy(48)) for p in PROMPTS[:4]]
    iterators = [iter(s) for s in streams]
    for it in iterators:
        next(it)  # all four are generating
    assert idle_engine.stats().active == 4
    streams[0].cancel()
    rest = list(iterators[0])
    assert rest[-1].finish_reason == "cancelled"
    stats = idle_engine.stats()  # published before the final chunk was sent
    assert stats.active <= 3
    assert stats.free_sequences + stats.parked_sequences == idle_engine.settings.n_seq_max - stats.active
    for s, it in zip(streams[1:], iterators[1:]):
        chunks = list(it)
        assert chunks[-1].finish_reason == "length"
        assert s.usage.completion_tokens == 48
    assert streams[0].usage.completion_tokens < 48


def test_async_consumer_that_stops_early_cancels(idle_engine: Engine) -> None:
    async def consume() -> list[str]:
        stream = idle_engine.generate(PROMPTS[2], greedy(200))
        texts = []
        async for chunk in stream:
            texts.append(chunk.text)
            if len(texts) == 3:
                break
        return texts

    texts = asyncio.run(consume())
    assert len(texts) == 3
    stats = wait_idle(idle_engine)
    assert stats.active == 0  # the request was cancelled, not left to run 200 tokens


def test_async_iteration_gives_the_same_tokens_as_sync(idle_cold_engine: Engine) -> None:
    sync = idle_cold_engine.generate(PROMPTS[3], greedy(12)).collect()

    async def run():
        return await idle_cold_engine.generate(PROMPTS[3], greedy(12)).acollect()

    assert asyncio.run(run()).token_ids == sync.token_ids


def test_max_tokens_ends_with_length(idle_cold_engine: Engine) -> None:
    done = idle_cold_engine.generate(PROMPTS[0], greedy(5)).collect()
    assert done.usage.finish_reason == "length"
    assert done.usage.completion_tokens == len(done.token_ids) == 5
    assert done.usage.prompt_tokens == len(idle_cold_engine.model.tokenize(PROMPTS[0], add_special=True))
    assert done.usage.evaluated_tokens == done.usage.prompt_tokens
    assert done.usage.cached_tokens == 0
    assert done.usage.time_to_first_token is not None and done.usage.time_to_first_token > 0


def test_stop_string_across_tokens_ends_with_stop_and_never_leaks(idle_cold_engine: Engine) -> None:
    reference = idle_cold_engine.generate(PROMPTS[2], greedy(40)).collect()
    pieces = [idle_cold_engine.model.token_to_bytes(t).decode("utf-8", "replace") for t in reference.token_ids]
    # A stop string that starts inside token 5 and ends inside token 6.
    joined_before = "".join(pieces[:5])
    stop = (pieces[5] + pieces[6])[1:-1] if len(pieces[5] + pieces[6]) > 3 else pieces[5] + pieces[6]
    assert stop and stop in reference.text
    stream = idle_cold_engine.generate(PROMPTS[2], greedy(40, stop=[stop]))
    chunks = list(stream)
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert text == reference.text[: reference.text.find(stop)]
    assert stop not in text and text.startswith(joined_before[: len(text)])


def test_stop_token_id_ends_with_stop(idle_cold_engine: Engine) -> None:
    reference = idle_cold_engine.generate(PROMPTS[1], greedy(20)).collect()
    target = reference.token_ids[3]
    cut = reference.token_ids.index(target)
    done = idle_cold_engine.generate(PROMPTS[1], greedy(20, stop_token_ids=[target])).collect()
    assert done.usage.finish_reason == "stop"
    assert done.token_ids == reference.token_ids[:cut]


def test_multibyte_output_streams_only_valid_utf8(idle_engine: Engine) -> None:
    prompt = "中文诗歌：月亮🌙和星星✨。下一句是"
    chunks = list(idle_engine.generate(prompt, greedy(48)))
    tokens = [t for c in chunks for t in c.token_ids]
    full = b"".join(idle_engine.model.token_to_bytes(t) for t in tokens)
    streamed = "".join(c.text for c in chunks)
    assert any(ord(ch) > 0x2E80 for ch in streamed), "the model produced no multi-byte output to check"
    assert streamed == full.decode("utf-8", errors="replace")
    if "\ufffd" not in full.decode("utf-8", errors="replace"):
        assert all("\ufffd" not in c.text for c in chunks)
    for c in chunks:
        c.text.encode("utf-8")  # every delta is a whole-character string


def test_seeded_sampling_is_reproducible(idle_cold_engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24, seed=1234)
    a = idle_cold_engine.generate(PROMPTS[2], params).collect().token_ids
    b = idle_cold_engine.generate(PROMPTS[2], params).collect().token_ids
    other = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24, seed=99)
    c = [idle_cold_engine.generate(PROMPTS[2], other).collect().token_ids]
    assert a == b
    assert len(a) > 0 and c[0] != a


def test_logit_bias_forces_a_token(idle_engine: Engine) -> None:
    forced = idle_engine.model.tokenize(" banana")[0]
    done = idle_engine.generate(PROMPTS[0], greedy(6, logit_bias={forced: 100.0})).collect()
    assert done.token_ids == (forced,) * 6


def test_frequency_penalty_changes_a_repetitive_output(idle_engine: Engine) -> None:
    prompt = "one one one one one one one one"
    plain = idle_engine.generate(prompt, greedy(16)).collect().token_ids
    penalised = idle_engine.generate(prompt, greedy(16, frequency_penalty=2.0)).collect().token_ids
    assert len(set(penalised)) > len(set(plain))


# -- errors: each is raised for its bad input, and the engine keeps serving ------------------------

@pytest.mark.parametrize(
    "make_request, error, field",
    [
        (lambda e: e.submit([], greedy(4)), InvalidRequestError, "prompt"),
        (lambda e: e.submit([1, -5], greedy(4)), InvalidRequestError, "prompt"),
        (lambda e: e.submit([10**9], greedy(4)), InvalidRequestError, "prompt"),
        (lambda e: e.submit(["x"], greedy(4)), InvalidRequestError, "prompt"),
        (lambda e: e.generate("hi", SamplingParams(temperature=-1)), InvalidRequestError, "temperature"),
        (lambda e: e.generate("hi", SamplingParams(top_p=0)), InvalidRequestError, "top_p"),
        (lambda e: e.generate("hi", SamplingParams(max_tokens=0)), InvalidRequestError, "max_tokens"),
        (lambda e: e.generate("hi", SamplingParams(stop=[""])), InvalidRequestError, "stop"),
        (lambda e: e.generate("hi", SamplingParams(stop=["ok", "x" * (MAX_STOP_LENGTH + 1)])), InvalidRequestError,
         "stop"),
        (lambda e: e.generate("hi", SamplingParams(logit_bias={10**9: 1.0})), InvalidRequestError, "logit_bias"),
        (lambda e: e.generate("hi", SamplingParams(presence_penalty=float("nan"))), InvalidRequestError,
         "presence_penalty"),
        (lambda e: e.submit([2] * 8000, greedy(500)), ContextOverflowError, "messages"),
    ],
)
def test_bad_input_raises_typed_error_and_engine_keeps_serving(idle_engine, make_request, error, field) -> None:
    with pytest.raises(error) as caught:
        make_request(idle_engine)
    assert caught.value.field == field
    assert idle_engine.generate(PROMPTS[0], greedy(3)).collect().usage.completion_tokens == 3


def test_stop_strings_are_bounded_in_number_and_length() -> None:
    SamplingParams(stop=["x" * MAX_STOP_LENGTH] * MAX_STOP_STRINGS)  # at the bounds
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_STOP_LENGTH:,} characters") as info:
        SamplingParams(stop=["x" * (MAX_STOP_LENGTH + 1)])
    assert info.value.field == "stop"
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_STOP_STRINGS} stop strings"):
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))


def test_context_overflow_reports_the_numbers(idle_engine: Engine) -> None:
    with pytest.raises(ContextOverflowError) as caught:
        idle_engine.submit([2] * 8000, greedy(500))
    err = caught.value
    assert (err.prompt_tokens, err.max_tokens, err.context_limit) == (8000, 500, idle_engine.context_limit)
    assert "8000" in str(err) and "500" in str(err)


def test_missing_and_corrupt_model_files_raise_model_load_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError) as missing:
        Model(tmp_path / "nope.gguf")
    assert missing.value.path.endswith("nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        Model(bad)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError):
        Model(truncated)


def test_a_packaged_model_name_is_not_a_path_and_the_error_says_how_to_resolve_it() -> None:
    """The engine knows no model names: `kvchat.models.resolve` turns one into a file."""
    with pytest.raises(ModelLoadError, match=r"kvchat\.models\.resolve\('gemma-3-270m'\)") as err:
        Engine("gemma-3-270m")
    assert err.value.path == "gemma-3-270m"


def test_close_cancels_running_requests_and_refuses_new_ones(gemma_model: Model) -> None:
    engine = Engine(gemma_model, EngineSettings(n_ctx=1024, max_running=4, n_seq_max=4))
    streams = [engine.generate(p, greedy(400)) for p in PROMPTS[:6]]  # 2 of them wait in the queue
    first = iter(streams[0])
    next(first)
    engine.close()
    assert list(first)[-1].finish_reason == "cancelled"
    for s in streams[1:]:
        assert s.collect().usage.finish_reason == "cancelled"
    with pytest.raises(EngineClosedError):
        engine.generate("hello", greedy(2))
    engine.close()  # twice is fine


def test_grammar_constrains_the_output(idle_engine: Engine) -> None:
    params = greedy(8, grammar='root ::= "yes" | "no"')
    done = idle_engine.generate("Is the sky green? Answer:", params).collect()
    assert done.text in ("yes", "no")
    assert done.usage.finish_reason == "stop"  # nothing but end-of-generation fits after the grammar


def test_invalid_grammar_is_refused_before_queueing(idle_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        idle_engine.generate("hi", greedy(4, grammar="root ::= (unclosed"))
    assert caught.value.field == "grammar"
