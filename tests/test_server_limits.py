"""The server's limits and its answers to bad input: every refusal is a 4xx with
OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from helpers import assert_idle
from http_server import RunningServer

from kvchat import Engine, EngineSettings
from kvchat.server import ServerSettings, create_app

MODEL = "gemma-small"
COUNTING = "1, 2, 3, 4, 5,"


@pytest.fixture(scope="module")
def one_slot_engine(gemma_model) -> Iterator[Engine]:
    """One request at a time; no prefix cache, a small context; unbounded requests stop at 8 tokens."""
    settings = EngineSettings(n_ctx=1024, max_running=1, n_seq_max=2, prefix_cache=False, open_max_tokens=8)
    with Engine(gemma_model, settings) as engine:
        yield engine


def serve(engine: Engine, **options) -> RunningServer:
    settings = ServerSettings(model_name=MODEL, **{"max_queued": 0, "max_tokens_limit": 512, **options})
    return RunningServer(create_app(engine, settings))


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


def long_completion(url: str, **extra) -> dict:
    return {"model": MODEL, "prompt": COUNTING, "max_tokens": 400, "temperature": 0, **extra}


def test_full_server_answers_429_with_retry_after(one_slot_engine: Engine) -> None:
    with serve(one_slot_engine, retry_after=3) as server:
        with httpx.stream("POST", f"{server.url}/v1/completions",
                          json=long_completion(server.url, stream=True), timeout=60) as busy:
            lines = busy.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # the first request holds the only slot
            refused = httpx.post(f"{server.url}/v1/completions", json=long_completion(server.url), timeout=30)
            assert_openai_error(refused, 429, code="rate_limit_exceeded")
            assert refused.headers["retry-after"] == "3"
            with pytest.raises(openai.RateLimitError):
                server.client().completions.create(model=MODEL, prompt="hi", max_tokens=2)
        # The first stream was closed early: its slot comes back and requests are served again.
        deadline = time.monotonic() + 10
        while True:
            response = httpx.post(f"{server.url}/v1/completions",
                                  json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert response.status_code == 200
    assert_idle(one_slot_engine)


def test_request_time_limit(one_slot_engine: Engine) -> None:
    with serve(one_slot_engine, request_timeout=0.5) as server:
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/completions", json=long_completion(server.url), timeout=60)
        assert_openai_error(response, 504, code="request_timeout")
        assert time.monotonic() - started < 10  # cut short: 400 tokens take far longer
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Count to 500."}], "max_tokens": 400,
                "stream": True}) as stream:
            events = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        # No finish event was sent for the cut-short reply.
        assert all(not c["choices"] or c["choices"][0]["finish_reason"] is None
                   for c in map(json.loads, events[:-2]))
    assert_idle(one_slot_engine)


def test_max_tokens_limit_and_open_requests(one_slot_engine: Engine) -> None:
    with serve(one_slot_engine, max_tokens_limit=32) as server:
        client = server.client()
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=33)
        assert info.value.body["param"] == "max_tokens"
        # No max_tokens: the engine's open_max_tokens (8) bounds the reply.
        reply = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=None, temperature=0,
                                          extra_body={"max_tokens": None})
        assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"
    assert_idle(one_slot_engine)


def test_tools_limit(one_slot_engine: Engine) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with serve(one_slot_engine, max_tools=2) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [tool] * 3})
        assert_openai_error(response, 400, param="tools")


HUGE_ARRAY = {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000}
HUGE_PARAMETERS = {"type": "object", "required": ["tags"], "properties": {
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 100_000}, "maxItems": 100_000},
    "code": {"type": "string", "pattern": "^a{0,1000000}$"}}}
TAG = {"type": "function", "function": {"name": "tag", "parameters": HUGE_PARAMETERS}}
HUGE_GRAMMARS = [
    # (what, request options, how the reply starts): each grammar overflowed the C stack
    # of llama.cpp's GBNF sampler and ended the server; llguidance serves them.
    ("maxItems 100000", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "numbers", "schema": HUGE_ARRAY}}}, "["),
    ("pattern a{0,1000000}", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "code", "schema": {"type": "string", "pattern": "^a{0,1000000}$"}}}}, '"'),
    ("forced tool call, required", {"tools": [TAG], "tool_choice": "required"}, None),
    ("forced tool call, named", {"tools": [TAG], "tool_choice": {"type": "function", "function": {"name": "tag"}}},
     None),
]


@pytest.mark.parametrize("what, options, opening", HUGE_GRAMMARS, ids=[h[0] for h in HUGE_GRAMMARS])
def test_a_grammar_too_large_for_llama_cpps_sampler_is_served_and_the_server_keeps_serving(
    one_slot_engine: Engine, what: str, options: dict, opening: str | None
) -> None:
    messages = [{"role": "user", "content": "List some numbers."}]
    with serve(one_slot_engine) as server:
        client = server.client()
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **options)
        choice = reply.choices[0]
        if opening is None:  # a forced call: cut short, or a call to `tag` with valid arguments
            assert choice.finish_reason in ("length", "tool_calls")
            if choice.finish_reason == "tool_calls":
                call = choice.message.tool_calls[0].function
                assert call.name == "tag"
                jsonschema.validate(json.loads(call.arguments), HUGE_PARAMETERS)
        else:
            assert choice.message.content.startswith(opening)
            assert choice.finish_reason in ("length", "stop")
            if choice.finish_reason == "stop":  # a whole document, valid under its schema
                schema = options["response_format"]["json_schema"]["schema"]
                jsonschema.validate(json.loads(choice.message.content), schema)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, stream=True, **options))
        assert chunks[-1].choices[0].finish_reason in ("length", "stop", "tool_calls")
        plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        assert plain.usage.completion_tokens >= 1  # still serving
    assert_idle(one_slot_engine)


def test_cors_only_for_given_origins(one_slot_engine: Engine) -> None:
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    with serve(one_slot_engine) as server:
        response = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    with serve(one_slot_engine, cors_origins=["http://app.example"]) as server:
        response = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(f"{server.url}/v1/chat/completions",
                              headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


BAD_REQUESTS = [
    # (what, request options for httpx.post, status, code, param)
    ("malformed JSON", {"content": b'{"model": "x", "messages": [', "headers": {"content-type": "application/json"}},
     400, None, None),
    ("missing messages", {"json": {"model": MODEL}}, 400, None, "messages"),
    ("wrong type", {"json": chat(max_tokens="many")}, 400, None, "max_tokens"),
    ("wrong role", {"json": chat(messages=[{"role": "wizard", "content": "hi"}])}, 400, None, None),
    ("unknown model", {"json": chat(model="gpt-9")}, 404, "model_not_found", "model"),
    ("n=3", {"json": chat(n=3)}, 400, None, "n"),
    ("prompt + max_tokens over the context",
     {"json": chat(messages=[{"role": "user", "content": "word " * 700}], max_tokens=500)},
     400, "context_length_exceeded", None),
    ("body over the size limit", {"json": chat(messages=[{"role": "user", "content": "x" * 5000}])},
     413, "request_too_large", None),
    ("bad API key", {"json": chat(), "headers": {"Authorization": "Bearer wrong"}}, 401, "invalid_api_key", None),
    ("no API key", {"json": chat(), "headers": {"Authorization": ""}}, 401, "invalid_api_key", None),
    ("lone surrogate in content", {"content": b'{"model": "gemma-small", "max_tokens": 2, "messages": '
                                              b'[{"role": "user", "content": "a\\ud800b"}]}',
                                   "headers": {"content-type": "application/json"}}, 400, None, None),
    # The converter's error names the unresolved $ref, surrogate and all: it used to make rendering fail (500).
    ("lone surrogate echoed in the error", {"content": b'{"model": "gemma-small", "max_tokens": 2, "messages": '
                                                       b'[{"role": "user", "content": "hi"}], "response_format": '
                                                       b'{"type": "json_schema", "json_schema": {"name": "x", '
                                                       b'"schema": {"$ref": "#/$defs/\\ud800"}}}}',
                                            "headers": {"content-type": "application/json"}},
     400, None, "response_format"),
    ("temperature out of range", {"json": chat(temperature=9)}, 400, None, "temperature"),
    ("stop string too long", {"json": chat(stop=["\n", "x" * 1001])}, 400, None, "stop"),
    ("bad tool_choice", {"json": chat(tool_choice={"type": "function", "function": {"name": "nope"}})},
     400, None, None),
]


@pytest.mark.parametrize("what, http_options, status, code, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_an_openai_shaped_4xx(one_slot_engine: Engine, what, http_options, status, code, param) -> None:
    with serve(one_slot_engine, max_body_bytes=4000, api_keys=["sesame"]) as server:
        headers = {"Authorization": "Bearer sesame", **http_options.pop("headers", {})}
        response = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60, **http_options)
        assert_openai_error(response, status, code=code, param=param)
        ok = httpx.post(f"{server.url}/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sesame"},
                        timeout=60)
        assert ok.status_code == 200  # still serving
    assert_idle(one_slot_engine)


def test_body_limit_without_content_length(one_slot_engine: Engine) -> None:
    with serve(one_slot_engine, max_body_bytes=4000) as server:
        body = json.dumps(chat(messages=[{"role": "user", "content": "x" * 5000}])).encode()

        def chunks() -> Iterator[bytes]:  # a chunked upload: the size is not declared
            for start in range(0, len(body), 1000):
                yield body[start:start + 1000]

        response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(),
                              headers={"content-type": "application/json"})
        assert_openai_error(response, 413, code="request_too_large")


def test_lone_surrogate_in_an_error_message_keeps_its_escape(one_slot_engine: Engine) -> None:
    body = (b'{"model": "gemma-small", "max_tokens": 2, "stream": true, "messages": [{"role": "user", '
            b'"content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", '
            b'"schema": {"$ref": "#/$defs/\\ud800"}}}}')
    with serve(one_slot_engine) as server:
        response = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                              headers={"content-type": "application/json"}, timeout=60)
        assert_openai_error(response, 400, param="response_format")
        assert "\\ud800" in response.json()["error"]["message"]  # the text the client sent, escaped


# -- the Host header (DNS rebinding) --------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil",
                                  "[::2]:80", ""])
def test_a_foreign_host_header_is_refused(one_slot_engine: Engine, host: str) -> None:
    """A page whose name an attacker points at 127.0.0.1 (DNS rebinding) makes the browser send that name."""
    with serve(one_slot_engine) as server:
        for path in ("/health", "/metrics", "/v1/models"):
            response = httpx.get(f"{server.url}{path}", headers={"Host": host})
            assert_openai_error(response, 403, code="host_not_allowed")
        response = httpx.post(f"{server.url}/v1/completions", headers={"Host": host},
                              json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert_openai_error(response, 403, code="host_not_allowed")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1", "127.0.0.2:8000", "[::1]:8000",
                                  "localhost."])
def test_loopback_host_names_are_served(one_slot_engine: Engine, host: str) -> None:
    with serve(one_slot_engine) as server:
        assert httpx.get(f"{server.url}/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_adds_names(one_slot_engine: Engine) -> None:
    with serve(one_slot_engine, allowed_hosts=["models.lan", "*.corp.example"]) as server:
        for host in ("models.lan", "Models.LAN:8000", "gpu.corp.example", "localhost"):
            assert httpx.get(f"{server.url}/health", headers={"Host": host}).status_code == 200, host
        for host in ("corp.example", "evil.example"):
            assert_openai_error(httpx.get(f"{server.url}/health", headers={"Host": host}), 403)
    with serve(one_slot_engine, allowed_hosts=["*"]) as server:
        assert httpx.get(f"{server.url}/health", headers={"Host": "anything.example"}).status_code == 200


# -- one API key's share of the server --------------------------------------------------


@pytest.fixture(scope="module")
def two_slot_engine(gemma_model) -> Iterator[Engine]:
    """Two requests at a time; no prefix cache; unbounded requests stop at 8 tokens."""
    settings = EngineSettings(n_ctx=1024, max_running=2, n_seq_max=4, prefix_cache=False, open_max_tokens=8)
    with Engine(gemma_model, settings) as engine:
        yield engine


def hold_stream(url: str, key: str, started: list, stop: threading.Event) -> None:
    """A long streamed completion as `key`: its status goes to `started`; it reads until `stop`."""
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json=long_completion(url, stream=True)) as response:
        started.append(response.status_code)
        if response.status_code == 200:
            for _ in response.iter_lines():
                if stop.is_set():
                    break


def test_one_key_cannot_take_the_whole_server(two_slot_engine: Engine) -> None:
    """2 running places + 2 queue places; with two keys each may hold one of each (key_share 0.5)."""
    with serve(two_slot_engine, max_queued=2, api_keys=["alice", "bob"]) as server:
        stop = threading.Event()
        started: list = []
        flood = [threading.Thread(target=hold_stream, args=(server.url, "alice", started, stop)) for _ in range(4)]
        try:
            for thread in flood:
                thread.start()
            deadline = time.monotonic() + 30
            while len(started) < 3 and time.monotonic() < deadline:  # 1 streams, 2 refused, 1 waits for a place
                time.sleep(0.05)
            assert sorted(started) == [200, 429, 429], started
            refused = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": "Bearer alice"},
                                 json=long_completion(server.url), timeout=30)
            assert_openai_error(refused, 429, code="rate_limit_exceeded")
            assert "share" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"
            # Bob is taken in and runs at once beside Alice's stream, ahead of her waiting request.
            served = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": "Bearer bob"},
                                json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
            assert served.status_code == 200, served.text
            assert len(started) == 3  # Alice's second request still waits for her running place
        finally:
            stop.set()
            for thread in flood:
                thread.join(timeout=60)
        assert sorted(started) == [200, 200, 429, 429]
    assert_idle(two_slot_engine)


def test_without_keys_one_client_may_use_the_whole_server(two_slot_engine: Engine) -> None:
    """No API keys: one tenant, who gets every running and queue place, as before shares existed."""
    with serve(two_slot_engine, max_queued=2) as server:
        stop = threading.Event()
        started: list = []
        clients = [threading.Thread(target=hold_stream, args=(server.url, "x", started, stop)) for _ in range(4)]
        try:
            for thread in clients:
                thread.start()
            deadline = time.monotonic() + 30
            while two_slot_engine.stats().active + two_slot_engine.stats().queued < 4:
                assert time.monotonic() < deadline, started
                time.sleep(0.05)
            refused = httpx.post(f"{server.url}/v1/completions", json=long_completion(server.url), timeout=30)
            assert_openai_error(refused, 429, code="rate_limit_exceeded")
            assert "busy" in refused.json()["error"]["message"]
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=60)
        assert started == [200] * 4
    assert_idle(two_slot_engine)
