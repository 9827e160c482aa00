"""The server's other endpoints (text completions, embeddings, metrics) and many
streaming clients at once, over real HTTP with the official `openai` client."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from helpers import assert_idle
from http_server import RunningServer
from openai import OpenAI
from soak.driver import parse_metrics

from kvchat import Engine, SamplingParams
from kvchat.server import create_app

MODEL = "gemma-test"
COUNTING = "1, 2, 3, 4, 5,"  # a prompt whose greedy continuation is unambiguous


@pytest.fixture(scope="module")
def server(gemma_engine: Engine) -> Iterator[RunningServer]:
    with RunningServer(create_app(gemma_engine, model_name=MODEL)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> OpenAI:
    return server.client()


# -- /v1/completions -----------------------------------------------------------------


def test_text_completion(client: OpenAI, gemma_engine: Engine) -> None:
    reply = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "text_completion" and reply.model == MODEL
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 6
    # The prompt is tokenized with the model's BOS, and the text is the engine's own reply to it.
    prompt = gemma_engine.model.tokenize(COUNTING, add_special=True)
    assert reply.usage.prompt_tokens == len(prompt)
    assert choice.text == gemma_engine.submit(prompt, SamplingParams(temperature=0, max_tokens=6)).collect().text
    assert_idle(gemma_engine)


def test_text_completion_default_max_tokens_is_16(client: OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=COUNTING, temperature=0)
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"


def test_streamed_text_completion_matches_the_whole_reply(client: OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    # The second request found the whole prompt cached (all but the one token evaluated).
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_several_prompts_echo_and_token_ids(client: OpenAI, gemma_engine: Engine) -> None:
    ids = gemma_engine.model.tokenize("10, 11, 12,", add_special=True)
    reply = client.completions.create(model=MODEL, prompt=[COUNTING, "a, b, c, d,"], max_tokens=4,
                                      temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=[COUNTING, "a, b, c, d,"], max_tokens=4, temperature=0)
    assert [c.index for c in reply.choices] == [c.index for c in plain.choices] == [0, 1]
    # Each choice answers its own prompt; with `echo`, after that prompt's text.
    assert [c.text for c in reply.choices] == [COUNTING + plain.choices[0].text, "a, b, c, d," + plain.choices[1].text]
    assert plain.choices[0].text != plain.choices[1].text
    assert reply.usage.completion_tokens == 8
    # Token ids are the prompt as given: the same reply as their text (BOS included).
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="10, 11, 12,", max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert_idle(gemma_engine)


@pytest.mark.parametrize("options, param", [
    ({"n": 2}, "n"),
    ({"suffix": "end"}, "suffix"),
    ({"logprobs": 2}, "logprobs"),
    ({"best_of": 3}, "best_of"),
    ({"prompt": ["a", "b"], "stream": True}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"max_tokens": 10**6}, "max_tokens"),
])
def test_text_completion_refusals(client: OpenAI, options: dict, param: str) -> None:
    request = {"model": MODEL, "prompt": COUNTING, "max_tokens": 2, **options}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_echoing_token_ids_outside_the_vocabulary_is_a_400_and_the_server_stays_up(
    client: OpenAI, gemma_engine: Engine, stream: bool
) -> None:
    # `echo` turns the prompt's ids back into text before the engine sees them; llama.cpp
    # aborts the whole process on an id it does not know, so the ids are checked first.
    n_vocab = gemma_engine.model.n_vocab
    for prompt in ([-1], [5, n_vocab], [2**31 - 1], [2, 10**12]):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, stream=stream)
        assert info.value.body["param"] == "prompt" and str(n_vocab) in info.value.body["message"]
    ids = gemma_engine.model.tokenize("10, 11, 12,", add_special=True)
    echoed = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("10, 11, 12,")
    assert_idle(gemma_engine)


# -- /v1/embeddings --------------------------------------------------------------------


def test_embeddings_float_and_base64(client: OpenAI, gemma_engine: Engine) -> None:
    texts = ["The cat sat on the mat.", "A kitten rested on the rug.", "Stock prices fell sharply."]
    as_base64 = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    as_float = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    n_embd = gemma_engine.model.n_embd
    for reply in (as_base64, as_float):
        assert [d.index for d in reply.data] == [0, 1, 2]
        vectors = np.array([d.embedding for d in reply.data])
        assert vectors.shape == (3, n_embd)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
        assert reply.usage.prompt_tokens > 0
    a, b = np.array(as_float.data[0].embedding), np.array(as_base64.data[0].embedding)
    assert np.allclose(a, b, atol=1e-6)
    vectors = np.array([d.embedding for d in as_float.data])
    # Two sentences about a cat are closer to each other than to the stock market.
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    single = client.embeddings.create(model=MODEL, input="one text", encoding_format="float")
    assert len(single.data) == 1 and len(single.data[0].embedding) == n_embd


@pytest.mark.parametrize("options, param", [({"input": []}, "input"), ({"dimensions": 7}, "dimensions")])
def test_embedding_refusals(client: OpenAI, options: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(**{"model": MODEL, "input": "x", **options})
    assert info.value.body["param"] == param


# -- /metrics --------------------------------------------------------------------------


def scrape(server: RunningServer) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics``: (name, sorted labels) -> value."""
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


def test_metrics_expose_the_counters_and_they_move(server: RunningServer, client: OpenAI) -> None:
    chat_ok = ("kvchat_http_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    before = scrape(server)
    messages = [{"role": "user", "content": "Say one word."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "Again."}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    after = scrape(server)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved(*chat_ok) == 2
    assert moved("kvchat_time_to_first_token_seconds_count") == 2
    assert moved("kvchat_time_per_output_token_seconds_count") >= 1
    assert moved("kvchat_prompt_tokens_total") >= first.usage.prompt_tokens
    assert moved("kvchat_cached_tokens_total") >= first.usage.prompt_tokens - 1  # turn 2 reused turn 1
    assert moved("kvchat_evaluated_tokens_total") > 0 and moved("kvchat_completion_tokens_total") >= 2
    assert 0 < after[("kvchat_cache_hit_rate", ())] <= 1
    assert after[("kvchat_kv_cells_used", ())] > 0
    assert after[("kvchat_cache_resident_tokens", (("tier", "kv"),))] > 0
    for gauge in ("kvchat_requests_active", "kvchat_requests_queued", "kvchat_http_requests_in_flight"):
        assert after[(gauge, ())] == 0
    client.models.list()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    final = scrape(server)
    assert final[("kvchat_http_requests_total", (("endpoint", "/v1/models"), ("status", "200")))] >= 1
    assert final[("kvchat_http_requests_total", (("endpoint", "/v1/models/{model}"), ("status", "404")))] >= 1


# -- many users ------------------------------------------------------------------------


def test_sixteen_concurrent_streaming_clients(server: RunningServer, gemma_engine: Engine) -> None:
    results: dict[int, tuple[str, str | None]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def user(index: int) -> None:
        try:
            client = server.client()
            start.wait()
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"User {index}: count to ten."}],
                max_tokens=24, temperature=0.7, seed=index, stream=True)
            text, finish = [], None
            for chunk in stream:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            results[index] = ("".join(text), finish)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(results) == list(range(16))
    assert all(finish in ("stop", "length") for _, finish in results.values())
    assert sum(1 for text, _ in results.values() if text) >= 15
    assert_idle(gemma_engine)
