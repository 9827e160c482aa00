"""Work the server stops or keeps off the event loop, over real HTTP: embeddings
bounded in tokens and time and cancelled by a disconnect, non-streaming replies
cancelled by a disconnect, a huge prompt that does not stall other requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from helpers import assert_idle, wait_idle
from http_server import RunningServer
from soak.driver import scrape_metrics

from kvchat import Engine, EngineSettings
from kvchat.server import ServerSettings, create_app

MODEL = "gemma-small"
COUNTING = "1, 2, 3, 4, 5,"
# Gemma 3's end tokens (<eos>, <end_of_turn>) banned: generation runs to max_tokens.
NO_END = {"1": -100, "106": -100}
SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank. "


@pytest.fixture(scope="module")
def one_slot_engine(gemma_model) -> Iterator[Engine]:
    """One request at a time; no prefix cache, a small context; unbounded requests stop at 8 tokens."""
    settings = EngineSettings(n_ctx=1024, max_running=1, n_seq_max=2, prefix_cache=False, open_max_tokens=8)
    with Engine(gemma_model, settings) as engine:
        yield engine


def serve(engine: Engine, **options) -> RunningServer:
    settings = ServerSettings(model_name=MODEL, **{"max_queued": 0, "max_tokens_limit": 512, **options})
    return RunningServer(create_app(engine, settings))


def embedding(texts: list[str]) -> dict:
    return {"model": MODEL, "input": texts}


LONG_EMBEDDING = embedding([SENTENCE * 8] * 24)  # 24 texts of about 130 tokens: many seconds on 2 cores


def in_flight(url: str) -> float:
    return scrape_metrics(url)[("kvchat_http_requests_in_flight", ())]


def test_embeddings_over_the_token_bound_are_refused(one_slot_engine: Engine) -> None:
    with serve(one_slot_engine, max_embedding_tokens=100) as server:
        response = httpx.post(f"{server.url}/v1/embeddings", json=embedding([SENTENCE * 4, SENTENCE * 4]), timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "input" and "100 tokens" in error["message"]
        assert httpx.post(f"{server.url}/v1/embeddings", json=embedding([SENTENCE]), timeout=60).status_code == 200


def test_embeddings_past_the_time_limit_end_with_504(one_slot_engine: Engine) -> None:
    with serve(one_slot_engine, request_timeout=1.0) as server:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/embeddings", json=LONG_EMBEDDING, timeout=120)
        assert response.status_code == 504, response.text[:200]
        error = response.json()["error"]
        assert error["code"] == "request_timeout" and set(error) == {"message", "type", "param", "code"}
        assert time.monotonic() - started < 10  # stopped between two texts, not after all of them
        assert in_flight(server.url) == 0
        assert httpx.post(f"{server.url}/v1/embeddings", json=embedding(["hi"]), timeout=60).status_code == 200


def test_a_client_that_leaves_mid_embedding_frees_its_slot(one_slot_engine: Engine) -> None:
    with serve(one_slot_engine) as server:  # one slot in all: the next request is 429 while it is held
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/embeddings", json=LONG_EMBEDDING, timeout=httpx.Timeout(60, read=1.0))
        deadline = time.monotonic() + 8
        while in_flight(server.url) != 0:
            assert time.monotonic() < deadline, "the abandoned embedding still holds its slot"
            time.sleep(0.05)
        # The embedding thread is free again too: a short request is answered at once.
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/embeddings", json=embedding(["hi"]), timeout=60)
        assert response.status_code == 200 and time.monotonic() - started < 8
        reply = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                           timeout=60)
        assert reply.status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count from 1 to 1000."}]}),
    ("/v1/completions", {"prompt": COUNTING}),
], ids=["chat", "completions"])
def test_a_non_streaming_client_that_leaves_cancels_its_request(one_slot_engine: Engine, path: str,
                                                                body: dict) -> None:
    request = {"model": MODEL, "max_tokens": 500, "temperature": 0, "logit_bias": NO_END, **body}
    with serve(one_slot_engine) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}{path}", json=request, timeout=httpx.Timeout(60, read=1.0))
        left = time.monotonic()
        stats = wait_idle(one_slot_engine, timeout=8)
        assert stats.active == 0 and stats.queued == 0, "the abandoned request still runs"
        assert time.monotonic() - left < 8  # 500 tokens take far longer
        assert in_flight(server.url) == 0
        counts = scrape_metrics(server.url)
        assert counts[("kvchat_http_requests_total", (("endpoint", path), ("status", "499")))] == 1
    assert_idle(one_slot_engine)


def test_a_huge_completion_prompt_does_not_stall_other_requests(one_slot_engine: Engine) -> None:
    prompt = "hello world, " * 240_000  # 3 MB, 720,000 tokens: seconds of tokenizing
    tokenizing = time.monotonic()
    one_slot_engine.model.tokenize(prompt, add_special=True, parse_special=True)
    tokenizing = time.monotonic() - tokenizing
    with serve(one_slot_engine, max_body_bytes=8 * 1024 * 1024) as server:
        answers: list[httpx.Response] = []
        huge = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{server.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}, timeout=120)))
        waits = []
        huge.start()
        while huge.is_alive():
            asked = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
            waits.append(time.monotonic() - asked)
            time.sleep(0.02)
        huge.join()
        assert answers[0].status_code == 400 and answers[0].json()["error"]["code"] == "context_length_exceeded"
        # /health kept answering while the prompt was tokenized, far sooner than the tokenizing took.
        assert len(waits) > 3 and max(waits) < tokenizing / 3, (max(waits), tokenizing)
    assert_idle(one_slot_engine)
