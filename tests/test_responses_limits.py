"""The Responses API never stores what it cannot return (issue 29).

What a response echoes of its request (``metadata``, ``user``, ``instructions``,
``tools``, ``tool_choice``, ``text``, ``previous_response_id``) is checked on the
way in: a lone surrogate anywhere (JSON's ``\\ud800`` escape), OpenAI's metadata
limits, nesting and size bounds. Bad input is a 400 naming the field, before
anything is queued or generated, streamed or not; nothing is stored and the
server serves the next request. Behind that, a response that still cannot be
written as JSON is never stored (a typed 500, or the stream's error event), and
a stored response is read back as the very bytes checked when it was stored.

The first part needs no model (the store, the events, the labels); the second
runs a real uvicorn over the shared Gemma engine, with raw HTTP where the body
must carry what the official `openai` client cannot send (it encodes UTF-8, so
no lone surrogate), and with the client otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from helpers import wait_idle
from http_server import RunningServer
from openai import OpenAI
from pydantic import ValidationError

from kvchat import Engine
from kvchat.chat.complete import ChatDelta
from kvchat.chat.tool_calls import ToolCall
from kvchat.server import ServerSettings, create_app
from kvchat.server.errors import APIError
from kvchat.server.middleware import endpoint_label
from kvchat.server.response_objects import EventCounter, OutputBuilder, ResponseFrame
from kvchat.server.response_store import ResponseStore, UnencodableResponseError, encode_response
from kvchat.server.responses_api import MAX_JSON_DEPTH, ResponsesRequest, response_frame

MODEL = "gemma-responses"
SURROGATE = "\ud800"
TOOL = {"type": "function", "name": "lookup", "description": "Look a word up.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}


def nested_schema(depth: int) -> str:
    """A JSON schema whose objects nest `depth` levels (each level two JSON containers),
    as JSON text: built as text, since json.dumps itself cannot write 10,000 levels."""
    return '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth


# -- no model: the store, the events, the labels ------------------------------------------------


@pytest.mark.parametrize("body", [
    {"metadata": {"k": SURROGATE}},
    {"metadata": {SURROGATE: "v"}},
    {"temperature": float("nan")},
    {"value": {1, 2}},
])
def test_the_store_refuses_a_body_it_cannot_encode_and_keeps_what_it_had(body: dict) -> None:
    store = ResponseStore(max_entries=10, max_bytes=1_000_000, ttl=60.0)
    assert store.put("a", "resp_1", {"id": "resp_1"}, [])
    with pytest.raises(UnencodableResponseError):
        store.put("a", "resp_1", {"id": "resp_1", **body}, [])
    with pytest.raises(UnencodableResponseError):
        store.put("a", "resp_2", {"id": "resp_2", **body}, [])
    assert len(store) == 1 and store.get("a", "resp_2") is None
    assert store.get("a", "resp_1").body == {"id": "resp_1"}  # the entry it had, unchanged


def test_the_store_refuses_a_body_nested_too_deep_to_encode() -> None:
    deep: Any = "x"
    for _ in range(10_000):
        deep = [deep]
    store = ResponseStore(max_entries=10, max_bytes=10_000_000, ttl=60.0)
    with pytest.raises(UnencodableResponseError):
        store.put("a", "resp_1", {"id": "resp_1", "deep": deep}, [])
    assert len(store) == 0 and store.bytes == 0


def test_a_stored_response_is_the_bytes_it_was_encoded_to() -> None:
    body = {"id": "resp_1", "metadata": {"é": "ü"}, "temperature": 0.5}
    store = ResponseStore(max_entries=10, max_bytes=1_000_000, ttl=60.0)
    assert store.put("a", "resp_1", body, [])
    stored = store.get("a", "resp_1")
    assert stored.content == encode_response(body) and stored.body == body
    assert stored.content.decode("utf-8") == '{"id":"resp_1","metadata":{"é":"ü"},"temperature":0.5}'


def test_an_event_that_cannot_be_encoded_is_a_typed_500_and_uses_no_sequence_number() -> None:
    counter = EventCounter()
    with pytest.raises(APIError) as info:
        counter.event({"type": "response.created", "response": {"metadata": {"k": SURROGATE}}})
    assert info.value.status == 500 and info.value.code == "response_not_serializable"
    assert info.value.type == "server_error"
    event = json.loads(counter.event({"type": "response.in_progress"})["data"])
    assert event["sequence_number"] == 0


def test_tool_call_arguments_with_a_lone_surrogate_are_written_with_its_escape() -> None:
    builder = OutputBuilder()
    events = builder.add(ChatDelta(tool_calls=(ToolCall("call_1", "lookup", {"word": f"a{SURROGATE}", "n": "é"}),)))
    item = builder.items[0]
    item["arguments"].encode("utf-8")  # valid Unicode
    assert json.loads(item["arguments"]) == {"word": f"a{SURROGATE}", "n": "é"}  # the same value
    counter = EventCounter()
    for payload in events:
        counter.event(payload).get("data", "").encode("utf-8")
    plain = OutputBuilder()
    plain.add(ChatDelta(tool_calls=(ToolCall("call_2", "lookup", {"word": "é"}),)))
    assert plain.items[0]["arguments"] == '{"word": "é"}'  # without a surrogate, characters as they are


@pytest.mark.parametrize("path, label", [
    ("/v1/responses", "/v1/responses"),
    ("/v1/responses/resp_0123abcd", "/v1/responses/{id}"),
    ("/v1/responses/anything-else", "/v1/responses/{id}"),
    ("/v1/responses/resp_1/input_items", "other"),
    ("/v1/responses/", "other"),
    ("/v1/responsesX", "other"),
    ("/v1/models/gemma", "/v1/models/{model}"),
])
def test_responses_paths_get_bounded_endpoint_labels(path: str, label: str) -> None:
    assert endpoint_label(path) == label


def test_the_request_model_checks_what_is_echoed() -> None:
    def refused(**fields: Any) -> str:
        with pytest.raises(ValidationError) as info:
            ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})
        return ".".join(map(str, info.value.errors()[0]["loc"]))

    assert refused(metadata={"k": SURROGATE}) == "metadata"
    assert refused(tool_choice={"type": "function", "name": SURROGATE}) == "tool_choice"
    assert refused(previous_response_id="r" * 257) == "previous_response_id"
    assert refused(user="u" * 257) == "user"
    assert refused(tools=[{**TOOL, "parameters": {"minimum": float("inf")}}]) == "tools"
    deep: Any = {}
    for _ in range(MAX_JSON_DEPTH):
        deep = {"a": deep}
    assert refused(text={"format": deep}) == "text"  # `text` itself is one more level
    ResponsesRequest.model_validate({"model": "m", "input": "hi", "text": deep["a"], "user": "u" * 256,
                                     "metadata": {"k" * 64: "v" * 512}})  # at the bounds: accepted


# -- a real server over Gemma --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(gemma_engine: Engine) -> Iterator[RunningServer]:
    app = create_app(gemma_engine, ServerSettings(model_name=MODEL, max_tokens_limit=64, max_tools=4))
    with RunningServer(app) as running:
        running.app = app
        yield running


@pytest.fixture
def client(server: RunningServer, idle_engine: Engine) -> OpenAI:
    return server.client()


def stored_count(server: RunningServer) -> int:
    return len(server.app.state.kvchat.responses)


def engine_work(engine: Engine) -> tuple[int, int]:
    """The engine's prompt and completion token counters, once it is idle."""
    stats = wait_idle(engine)
    return stats.prompt_tokens, stats.completion_tokens


def post_raw(server: RunningServer, body: dict | str | bytes) -> httpx.Response:
    """POST /v1/responses with `body` as JSON text: json.dumps writes a lone surrogate
    as its escape (``\\ud800``), which the server's parser turns back into one."""
    content = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    return httpx.post(f"{server.url}/v1/responses", content=content,
                      headers={"content-type": "application/json"}, timeout=120)


def request(**fields: Any) -> dict:
    return {"model": MODEL, "input": "Say hi.", "max_output_tokens": 4, "temperature": 0, **fields}


def assert_refused(response: httpx.Response, param: str | None) -> dict:
    """A 400 with OpenAI's error shape (and `param`), as JSON: not a stream."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error


def test_a_lone_surrogate_in_metadata_is_a_400_nothing_is_stored_and_the_server_serves_on(
        server: RunningServer, client: OpenAI, idle_engine: Engine) -> None:
    stored, work = stored_count(server), engine_work(idle_engine)
    response = post_raw(server, b'{"model": "gemma-responses", "input": "hi", "max_output_tokens": 3, '
                                b'"metadata": {"k": "\\ud800"}}')  # the reproduction, byte for byte
    error = assert_refused(response, "metadata")
    assert "not valid Unicode" in error["message"]
    assert stored_count(server) == stored and engine_work(idle_engine) == work  # nothing stored, nothing generated
    answer = client.responses.create(**request(metadata={"k": "v"}))  # the next request is served and stored
    assert answer.status in ("completed", "incomplete") and answer.metadata == {"k": "v"}
    assert client.responses.retrieve(answer.id).id == answer.id
    assert stored_count(server) == stored + 1


@pytest.mark.parametrize("fields, param", [
    ({"metadata": {f"key{SURROGATE}": "v"}}, "metadata"),
    ({"user": f"user-{SURROGATE}"}, "user"),
    ({"instructions": f"Be brief.{SURROGATE}"}, "instructions"),
    ({"tools": [{**TOOL, "parameters": {"type": "object", "properties": {
        "word": {"type": "string", "description": f"a word {SURROGATE}"}}}}]}, "tools"),
    ({"tools": [{**TOOL, "parameters": {"type": "object", "properties": {SURROGATE: {"type": "string"}}}}]}, "tools"),
    ({"text": {"format": {"type": "json_schema", "name": "answer", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "enum": [SURROGATE]}}}}}}, "text"),
    ({"tool_choice": {"type": "function", "name": SURROGATE}, "tools": [TOOL]}, "tool_choice"),
    ({"previous_response_id": f"resp_{SURROGATE}"}, "previous_response_id"),
])
def test_a_lone_surrogate_in_any_echoed_field_is_a_400_naming_it_before_any_work(
        server: RunningServer, idle_engine: Engine, fields: dict, param: str) -> None:
    stored, work = stored_count(server), engine_work(idle_engine)
    error = assert_refused(post_raw(server, request(**fields)), param)
    assert "not valid Unicode" in error["message"]
    assert stored_count(server) == stored and engine_work(idle_engine) == work


@pytest.mark.parametrize("metadata, detail", [
    ({f"k{index}": "v" for index in range(17)}, "at most 16 key-value pairs"),
    ({"k" * 65: "v"}, "keys are at most 64 characters"),
    ({"k": "v" * 513}, "values are at most 512 characters"),
])
def test_metadata_past_openais_limits_is_a_400(server: RunningServer, client: OpenAI, idle_engine: Engine,
                                               metadata: dict, detail: str) -> None:
    stored, work = stored_count(server), engine_work(idle_engine)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**request(metadata=metadata))
    assert info.value.body["param"] == "metadata" and detail in info.value.body["message"]
    assert stored_count(server) == stored and engine_work(idle_engine) == work


def test_metadata_at_openais_limits_is_echoed_and_stored(client: OpenAI) -> None:
    metadata = {f"{index:02d}" + "k" * 62: "v" * 512 for index in range(16)}
    response = client.responses.create(**request(metadata=metadata))
    assert response.metadata == metadata
    assert client.responses.retrieve(response.id).metadata == metadata


def deep_request(field: str, depth: int, stream: bool = False) -> str:
    schema = nested_schema(depth)
    extra = (f'"text": {{"format": {{"type": "json_schema", "name": "deep", "schema": {schema}}}}}'
             if field == "text" else
             f'"tools": [{{"type": "function", "name": "deep", "parameters": {schema}}}]')
    return (f'{{"model": "{MODEL}", "input": "hi", "max_output_tokens": 3, "stream": {json.dumps(stream)}, '
            f'{extra}}}')


@pytest.mark.parametrize("field", ["text", "tools"])
def test_a_schema_nested_10000_deep_is_a_400_not_a_500(server: RunningServer, idle_engine: Engine,
                                                       field: str) -> None:
    stored, work = stored_count(server), engine_work(idle_engine)
    assert_refused(post_raw(server, deep_request(field, 10_000)), None)  # deeper than the JSON parser goes
    assert stored_count(server) == stored and engine_work(idle_engine) == work


@pytest.mark.parametrize("field", ["text", "tools"])
def test_a_schema_nested_past_the_bound_is_a_400_naming_the_field(server: RunningServer, idle_engine: Engine,
                                                                  field: str) -> None:
    stored, work = stored_count(server), engine_work(idle_engine)
    error = assert_refused(post_raw(server, deep_request(field, 300)), field)  # parses; fails the depth bound
    assert f"deeper than {MAX_JSON_DEPTH} levels" in error["message"]
    assert stored_count(server) == stored and engine_work(idle_engine) == work


def test_a_schema_nested_within_the_bound_is_served_stored_and_read_back(server: RunningServer,
                                                                         idle_engine: Engine) -> None:
    response = post_raw(server, deep_request("tools", 40))
    assert response.status_code == 200, response.text
    read = httpx.get(f"{server.url}/v1/responses/{response.json()['id']}", timeout=30)
    assert read.status_code == 200 and read.content == response.content  # the very bytes stored


@pytest.mark.parametrize("body, param", [
    (request(stream=True, metadata={"k": SURROGATE}), "metadata"),
    (request(stream=True, metadata={f"k{index}": "v" for index in range(17)}), "metadata"),
    (request(stream=True, metadata={"k" * 65: "v"}), "metadata"),
    (request(stream=True, metadata={"k": "v" * 513}), "metadata"),
    (request(stream=True, instructions=SURROGATE), "instructions"),
    (deep_request("text", 300, stream=True), "text"),
    (deep_request("tools", 300, stream=True), "tools"),
    (deep_request("tools", 10_000, stream=True), None),
])
def test_streamed_requests_get_the_same_400_before_the_stream_starts(server: RunningServer, idle_engine: Engine,
                                                                     body: Any, param: str | None) -> None:
    stored, work = stored_count(server), engine_work(idle_engine)
    content = (body if isinstance(body, str) else json.dumps(body)).encode()
    with httpx.stream("POST", f"{server.url}/v1/responses", content=content,
                      headers={"content-type": "application/json"}, timeout=120) as response:
        response.read()
    assert_refused(response, param)  # a JSON error, not an event stream
    assert stored_count(server) == stored and engine_work(idle_engine) == work


def test_the_official_client_streaming_gets_the_400_as_an_exception(server: RunningServer, client: OpenAI,
                                                                    idle_engine: Engine) -> None:
    stored = stored_count(server)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**request(stream=True, metadata={f"k{index}": "v" for index in range(17)}))
    assert info.value.body["param"] == "metadata"
    assert stored_count(server) == stored


class UnencodableWhenDone(ResponseFrame):
    """A frame whose finished response echoes metadata that cannot be encoded, as if
    a check on the way in had let it through (the in-progress one is fine, so a
    stream starts)."""

    def body(self, status: str, output: Any = (), usage: dict | None = None, **extra: Any) -> dict[str, Any]:
        body = super().body(status, output, usage, **extra)
        return body if status == "in_progress" else {**body, "metadata": {"k": SURROGATE}}


def unencodable_frame(*args: Any) -> ResponseFrame:
    return UnencodableWhenDone(**response_frame(*args).__dict__)


@pytest.fixture
def bad_frame_server(gemma_engine: Engine, idle_engine: Engine) -> Iterator[RunningServer]:
    """A server of its own whose finished responses echo what cannot be encoded (the
    app's `response_frame`, replaced)."""
    app = create_app(gemma_engine, ServerSettings(model_name=MODEL, max_tokens_limit=64, max_tools=4))
    app.state.kvchat.response_frame = unencodable_frame
    with RunningServer(app) as running:
        running.app = app
        yield running


def test_a_response_that_cannot_be_encoded_is_a_typed_500_and_is_not_stored(bad_frame_server: RunningServer) -> None:
    response = post_raw(bad_frame_server, request())
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "response_not_serializable"
    assert "not stored" in error["message"]
    assert stored_count(bad_frame_server) == 0
    bad_frame_server.app.state.kvchat.response_frame = response_frame  # fixed: the server serves on
    created = bad_frame_server.client().responses.create(**request())
    assert created.status in ("completed", "incomplete") and stored_count(bad_frame_server) == 1


def test_a_streamed_response_that_cannot_be_encoded_ends_with_the_error_event_and_is_not_stored(
        bad_frame_server: RunningServer) -> None:
    with httpx.stream("POST", f"{bad_frame_server.url}/v1/responses", json=request(stream=True),
                      timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    events = [json.loads(line.removeprefix("data:")) for line in lines]
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "error"
    # Nor response.failed: it would echo the same metadata, so the error event alone says it.
    assert not any(kind in ("response.completed", "response.incomplete", "response.failed") for kind in kinds)
    assert events[-1]["code"] == "response_not_serializable" and events[-1]["error"]["type"] == "server_error"
    assert stored_count(bad_frame_server) == 0
    with pytest.raises(openai.NotFoundError):
        bad_frame_server.client().responses.retrieve(events[0]["response"]["id"])


def test_metrics_label_responses_requests_without_their_ids(server: RunningServer, client: OpenAI) -> None:
    created = client.responses.create(**request())
    client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    requests = [line for line in metrics.splitlines() if line.startswith("kvchat_http_requests_total{")]
    assert any('endpoint="/v1/responses",status="200"' in line for line in requests), requests
    assert any('endpoint="/v1/responses/{id}",status="200"' in line for line in requests), requests
    assert any('endpoint="/v1/responses/{id}",status="404"' in line for line in requests), requests
    assert created.id not in metrics and "resp_unknown" not in metrics
