"""OpenAI's Responses API (``/v1/responses``).

The first part needs no model: the response store (bounds, expiry and tenants,
with an injected clock) and its `kvchat serve` options, the translation of items, tools and formats to chat
(tables, and a property test at the extremes: typed errors or valid histories,
never a crash), the output builder's events, and the response objects checked
against the official `openai` client's own types. The second runs a real uvicorn
over Qwen2.5-Coder 0.5B (prefix cache on) with the official client and with Agent
Framework's OpenAI clients, unchanged, pointed at it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from helpers import assert_idle
from http_server import RunningServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from typer.testing import CliRunner

from kvchat import Engine, EngineSettings
from kvchat.chat import chat_tokenizer
from kvchat.chat.complete import ChatDelta
from kvchat.chat.tool_calls import ToolCall
from kvchat.cli import app as cli_app
from kvchat.cli.runtime import Runtime
from kvchat.engine import Usage
from kvchat.errors import InvalidRequestError
from kvchat.llama import Model
from kvchat.server import ServerSettings, create_app
from kvchat.server.errors import APIError
from kvchat.server.response_objects import EventCounter, OutputBuilder, ResponseFrame, response_usage
from kvchat.server.response_store import ResponseStore, approximate_size
from kvchat.server.responses_api import (
    ResponsesRequest,
    chat_tools,
    check_supported,
    input_messages,
    response_format,
)

MODEL = "qwen-responses"
KEY_A, KEY_B = "key-a", "key-b"

# -- the store (no model) ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(clock: Clock | None = None, **options: Any) -> ResponseStore:
    settings = {"max_entries": 10, "max_bytes": 1_000_000, "ttl": 60.0, **options}
    return ResponseStore(clock=clock or Clock(), **settings)


HISTORY = [{"role": "user", "content": "hi"}]


def test_a_stored_response_expires_after_its_time_limit() -> None:
    clock = Clock()
    responses = store(clock)
    assert responses.put("a", "resp_1", {"id": "resp_1"}, HISTORY)
    clock.now += 59
    stored = responses.get("a", "resp_1")
    assert stored is not None and stored.body == {"id": "resp_1"} and list(stored.history) == HISTORY
    clock.now += 1  # counted from when it was stored, not from the last read
    assert responses.get("a", "resp_1") is None
    assert len(responses) == 0 and responses.bytes == 0


def test_expired_entries_make_room_before_live_ones_are_evicted() -> None:
    clock = Clock()
    responses = store(clock, max_entries=2)
    responses.put("a", "old", {}, HISTORY)
    clock.now += 30
    responses.put("a", "live", {}, HISTORY)
    clock.now += 31  # "old" expired
    responses.put("a", "new", {}, HISTORY)
    assert responses.get("a", "live") is not None and responses.get("a", "new") is not None
    assert not responses.delete("a", "old")


def test_the_least_recently_used_go_first_beyond_the_count() -> None:
    responses = store(max_entries=3)
    for name in ("r1", "r2", "r3"):
        responses.put("a", name, {}, HISTORY)
    assert responses.get("a", "r1") is not None  # r2 is now the least recently used
    responses.put("a", "r4", {}, HISTORY)
    assert [name for name in ("r1", "r2", "r3", "r4") if responses.get("a", name)] == ["r1", "r3", "r4"]
    assert len(responses) == 3


def test_the_bytes_are_bounded_too() -> None:
    big = [{"role": "user", "content": "x" * 1000}]
    size = approximate_size({}) + approximate_size(big)
    responses = store(max_bytes=3 * size)
    for name in ("r1", "r2", "r3", "r4"):
        assert responses.put("a", name, {}, big)
    assert len(responses) == 3 and responses.bytes == 3 * size
    assert responses.get("a", "r1") is None
    assert not responses.put("a", "huge", {}, [{"role": "user", "content": "x" * (4 * size)}])  # never fits
    assert len(responses) == 3


def test_tenants_never_see_each_others_responses() -> None:
    responses = store()
    responses.put("a", "resp_1", {"owner": "a"}, HISTORY)
    assert responses.get("b", "resp_1") is None
    assert not responses.delete("b", "resp_1")
    assert responses.get("a", "resp_1") is not None  # b's attempts changed nothing
    responses.put("b", "resp_1", {"owner": "b"}, HISTORY)  # the same id under another key is another entry
    assert responses.get("a", "resp_1").body == {"owner": "a"}
    assert responses.delete("a", "resp_1") and responses.get("a", "resp_1") is None
    assert responses.get("b", "resp_1").body == {"owner": "b"}


def test_with_a_key_share_one_tenant_evicts_its_own_responses_first() -> None:
    responses = store(max_entries=4, key_share=0.5)
    responses.put("b", "b1", {}, HISTORY)
    for index in range(5):
        responses.put("a", f"a{index}", {}, HISTORY)
    assert responses.get("b", "b1") is not None
    assert [name for name in ("a0", "a1", "a2", "a3", "a4") if responses.get("a", name)] == ["a3", "a4"]


def test_a_store_of_size_zero_keeps_nothing() -> None:
    responses = store(max_entries=0)
    assert not responses.put("a", "r", {}, HISTORY) and responses.get("a", "r") is None


def test_approximate_size_measures_any_depth() -> None:
    deep: Any = "x"
    for _ in range(100_000):
        deep = [deep]
    assert approximate_size(deep) > 100_000
    assert approximate_size({"content": "y" * 5000}) > 5000


def test_server_settings_validate_the_store_bounds() -> None:
    for options in ({"responses_store_max": -1}, {"responses_store_bytes": 0}, {"responses_store_ttl": 0},
                    {"responses_store_ttl": float("nan")}):
        with pytest.raises(InvalidRequestError) as info:
            ServerSettings(model_name="m", **options)
        assert info.value.field == next(iter(options))


@pytest.mark.parametrize("args, env, expected", [
    ([], {}, (1024, 64 * 1024 * 1024, 21600.0)),
    (["--responses-store-max", "5", "--responses-store-bytes", "1M", "--responses-store-ttl", "60"], {},
     (5, 1024 * 1024, 60.0)),
    ([], {"KVCHAT_RESPONSES_STORE_MAX": "0", "KVCHAT_RESPONSES_STORE_TTL": "30"}, (0, 64 * 1024 * 1024, 30.0)),
])
def test_serve_passes_the_store_bounds(args: list[str], env: dict, expected: tuple) -> None:
    seen: dict = {}
    runtime = Runtime(serve=lambda model, **options: seen.update(options))
    result = CliRunner().invoke(cli_app, ["serve", *args], env=env, obj=runtime)
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert (settings.responses_store_max, settings.responses_store_bytes, settings.responses_store_ttl) == expected


# -- items, tools and formats (no model) ----------------------------------------------------------

CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
CHAT_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize("items, messages", [
    ("Hello", [{"role": "user", "content": "Hello"}]),
    ([{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Hello"}]),
    ([{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
      {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                      {"type": "input_text", "text": "b"}]}],
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]),
    ([{"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
       "content": [{"type": "output_text", "text": "Hi!", "annotations": []}]}],
     [{"role": "assistant", "content": "Hi!"}]),
    ([{"role": "user", "content": "Weather?"}, CALL,
      {"type": "function_call_output", "call_id": "call_1", "output": '{"celsius": 21}'}],
     [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [CHAT_CALL]},
      {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"celsius": 21}'}]),
    ([{"role": "assistant", "content": "Let me look."}, CALL, {**CALL, "call_id": "call_2"},
      {"type": "function_call_output", "call_id": "call_2",
       "output": [{"type": "input_text", "text": "sunny"}]}],
     [{"role": "assistant", "content": "Let me look.",
       "tool_calls": [CHAT_CALL, {**CHAT_CALL, "id": "call_2"}]},
      {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "sunny"}]),
], ids=["string", "easy-message", "parts-and-developer", "output-message", "tool-round-trip", "calls-join-text"])
def test_input_items_become_chat_messages(items: Any, messages: list) -> None:
    assert input_messages(items) == messages


def test_a_call_of_a_tool_the_model_made_up_comes_back_as_it_was_sent() -> None:
    # kvchat's parser returns a call to any name the model wrote (the client answers
    # "no such tool"); the next request carries it back and must be accepted.
    made_up = {**CALL, "name": "cat notes.txt"}
    messages = input_messages([made_up, {"type": "function_call_output", "call_id": "call_1", "output": "no such tool"}])
    assert messages[0]["tool_calls"][0]["function"]["name"] == "cat notes.txt"
    assert messages[1] == {"role": "tool", "tool_call_id": "call_1", "name": "cat notes.txt", "content": "no such tool"}


def test_an_output_may_answer_a_call_of_the_stored_conversation() -> None:
    output = {"type": "function_call_output", "call_id": "call_9", "output": "ok"}
    assert input_messages([output], calls={"call_9": "f"}) == [
        {"role": "tool", "tool_call_id": "call_9", "name": "f", "content": "ok"}]


@pytest.mark.parametrize("items, field", [
    ({"role": "user"}, "input"),
    ([7], "input[0]"),
    ([{"content": "no role or type"}], "input[0].type"),
    ([{"type": "item_reference", "id": "msg_1"}], "input[0].type"),
    ([{"role": "tool", "content": "x"}], "input[0].role"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}], "input[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "input_text", "text": 5}]}], "input[0].content[0].text"),
    ([{"role": "user", "content": {"text": "x"}}], "input[0].content"),
    ([{"role": "user", "content": None}], "input[0].content"),
    ([{"type": "function_call_output", "call_id": "call_x", "output": "x"}], "input[0].call_id"),
    ([{**CALL, "call_id": ""}], "input[0].call_id"),
    ([{**CALL, "call_id": "c" * 257}], "input[0].call_id"),
    ([{**CALL, "name": ""}], "input[0].name"),
    ([{**CALL, "name": "n" * 257}], "input[0].name"),
    ([{**CALL, "arguments": {"city": "Paris"}}], "input[0].arguments"),
    ([CALL, {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_file"}]}],
     "input[1].output[0].type"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_items_are_invalid_requests_naming_the_param(items: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        input_messages(items)
    assert info.value.field == field


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": True}
CHAT_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                                 "parameters": WEATHER["parameters"]}}


@pytest.mark.parametrize("choice, expected_tools, expected_choice", [
    (None, [CHAT_WEATHER], None),
    ("auto", [CHAT_WEATHER], "auto"),
    ("required", [CHAT_WEATHER], "required"),
    ("none", [CHAT_WEATHER], "none"),
    ({"type": "function", "name": "get_weather"}, [CHAT_WEATHER],
     {"type": "function", "function": {"name": "get_weather"}}),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]},
     [CHAT_WEATHER], "required"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "other"}]}, None, "none"),
])
def test_function_tools_and_tool_choice_become_chat_ones(choice: Any, expected_tools: Any,
                                                        expected_choice: Any) -> None:
    offer = chat_tools([WEATHER], choice)
    assert (offer.tools, offer.tool_choice, offer.omitted) == (expected_tools, expected_choice, ())


def test_chat_shaped_tools_are_taken_too() -> None:
    offer = chat_tools([CHAT_WEATHER], None)
    assert (offer.tools, offer.tool_choice) == ([CHAT_WEATHER], None)


@pytest.mark.parametrize("tools, choice, field", [
    (["get_weather"], None, "tools[0].type"),
    ([WEATHER, {"name": "untyped"}], None, "tools[1].type"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([WEATHER], {"type": "web_search_preview"}, "tool_choice"),
    ([WEATHER, {"type": "file_search", "vector_store_ids": []}], {"type": "file_search"}, "tool_choice"),
    ([WEATHER], {"type": "allowed_tools", "mode": "never", "tools": []}, "tool_choice"),
])
def test_other_tools_and_choices_are_refused(tools: list, choice: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        chat_tools(tools, choice)
    assert info.value.field == field


def test_text_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert response_format(None) is None
    assert response_format({"verbosity": "low"}) is None
    assert response_format({"format": {"type": "text"}}) == {"type": "text"}
    assert response_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert response_format({"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}}) == {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    with pytest.raises(InvalidRequestError) as info:
        response_format({"format": "json"})
    assert info.value.field == "text.format"


def body(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest(model=MODEL, input="hi", **fields)


@pytest.mark.parametrize("fields, param", [
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"reasoning": {"effort": 3}}, "reasoning.effort"),
    ({"reasoning": {"summary": ["auto"]}}, "reasoning.summary"),
])
def test_unsupported_fields_are_refused(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_supported(body(**fields))
    assert info.value.field == param


def test_fields_kvchat_ignores_are_accepted() -> None:
    check_supported(body(background=False, include=["reasoning.encrypted_content"], reasoning={"effort": None},
                         service_tier="auto", prompt_cache_key="k", safety_identifier="s", metadata={"a": "b"}))
    # The models do not reason: reasoning is accepted (OpenAI's Codex CLI sends it) and ignored.
    check_supported(body(reasoning={"effort": "high", "summary": "auto"}, client_metadata={"turn_id": "t"}))


# -- the property test: any items give a typed error or a valid history ----------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
texts = st.text(max_size=30) | st.just("<|im_start|>system\n") | st.just("x" * 100_000)
parts = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "text", "input_image", "refusal"]),
                               "text": texts | json_values})
call_ids = st.sampled_from(["call_1", "call_2", "", "c" * 300]) | st.text(max_size=10)
deep_arguments = st.integers(min_value=1, max_value=50_000).map(lambda depth: "[" * depth + "]" * depth)
items = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "x"]),
                           "content": texts | st.lists(parts, max_size=4) | json_values}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": call_ids,
                           "name": st.sampled_from(["get_weather", "f-1", "bad name", "", "n" * 257]),
                           "arguments": texts | deep_arguments | json_values}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": call_ids,
                           "output": texts | st.lists(parts, max_size=3) | json_values}),
    json_values,
)


def check_history(messages: list[dict[str, Any]]) -> None:
    """A history complete() can take: known roles, text content, calls answered after they are made."""
    made: set[str] = set()
    for message in messages:
        assert message["role"] in ("user", "assistant", "system", "tool")
        assert isinstance(message["content"], str) or (message["content"] is None and message.get("tool_calls"))
        for call in message.get("tool_calls", ()):
            assert message["role"] == "assistant" and call["type"] == "function"
            assert isinstance(call["function"]["arguments"], str) and call["id"]
            made.add(call["id"])
        if message["role"] == "tool":
            assert message["tool_call_id"] in made


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(items, max_size=12))
def test_any_items_give_a_typed_error_or_a_valid_history(drawn: list) -> None:
    try:
        messages = input_messages(drawn)
    except InvalidRequestError as exc:
        assert exc.field and exc.field.startswith("input")
        return
    check_history(messages)


def test_many_items_and_huge_strings_convert() -> None:
    many = [{"role": "user", "content": [{"type": "input_text", "text": "x" * 1000}] * 10}] * 10_000
    assert len(input_messages(many)) == 10_000
    nested = "[" * 200_000 + "]" * 200_000
    calls = [{**CALL, "call_id": f"call_{i}", "arguments": nested} for i in range(100)]
    messages = input_messages([{"role": "user", "content": "go"}, *calls])
    check_history(messages)
    assert len(messages[1]["tool_calls"]) == 100


# -- output items, events and the openai client's types (no model) ---------------------------------

USAGE = Usage(prompt_tokens=30, cached_tokens=20, evaluated_tokens=10, completion_tokens=5,
              time_to_first_token=0.1, finish_reason="stop")
EVENTS = TypeAdapter(ResponseStreamEvent)


def frame(**fields: Any) -> ResponseFrame:
    values = {"id": "resp_1", "model": MODEL, "instructions": None, "previous_response_id": None, "tools": [],
              "tool_choice": "auto", "temperature": 0.0, "top_p": 1.0, "max_output_tokens": None,
              "max_tool_calls": None, "parallel_tool_calls": True, "store": True, "text": {"format": {"type": "text"}},
              "truncation": "disabled", "metadata": {}, "user": None, **fields}
    return ResponseFrame(**values)


def build(deltas: list[ChatDelta], status: str = "completed", **options: Any) -> tuple[OutputBuilder, list[dict]]:
    builder = OutputBuilder(**options)
    events = [event for delta in deltas for event in builder.add(delta)]
    return builder, events + builder.finish(status)


WEATHER_CALL = ToolCall("call_abc", "get_weather", {"city": "Paris"})


def test_text_then_a_call_make_two_items_announced_in_order() -> None:
    builder, events = build([ChatDelta("It is "), ChatDelta("sunny."), ChatDelta(tool_calls=(WEATHER_CALL,))])
    assert [event["type"] for event in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    message, call = builder.items
    assert message["content"][0]["text"] == "It is sunny." and message["status"] == "completed"
    assert call["call_id"] == "call_abc" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert [event["output_index"] for event in events] == [0] * 7 + [1] * 4
    counter = EventCounter()
    for number, payload in enumerate(events):
        sse = counter.event(payload)
        assert sse["event"] == payload["type"]
        parsed = EVENTS.validate_python(json.loads(sse["data"]))
        assert parsed.sequence_number == number


def test_a_reply_without_text_or_calls_is_an_empty_message_and_length_is_incomplete() -> None:
    builder, events = build([], "incomplete")
    assert [item["type"] for item in builder.items] == ["message"]
    assert [event["type"] for event in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done"]
    assert builder.items[0]["status"] == "incomplete" and builder.items[0]["content"][0]["text"] == ""
    usage = response_usage(USAGE, cache_writes=True)
    response = Response.model_validate(frame().body("incomplete", builder.items, usage))
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == ""


def test_max_calls_keeps_the_first_calls() -> None:
    second = ToolCall("call_def", "get_weather", {"city": "Oslo"})
    builder, _ = build([ChatDelta(tool_calls=(WEATHER_CALL, second))], max_calls=1)
    assert [item["call_id"] for item in builder.items] == ["call_abc"]


def test_the_response_object_parses_as_the_clients_response() -> None:
    builder, _ = build([ChatDelta("Paris.")])
    body = frame(tools=[{**WEATHER, "description": None}], instructions="Be brief.", metadata={"k": "v"}).body(
        "completed", builder.items, response_usage(USAGE, cache_writes=True))
    response = Response.model_validate(body)
    assert response.output_text == "Paris." and response.id == "resp_1"
    assert response.usage.input_tokens == 30 and response.usage.input_tokens_details.cached_tokens == 20
    assert response.usage.input_tokens_details.cache_write_tokens == 10
    assert response.usage.output_tokens_details.reasoning_tokens == 0 and response.usage.total_tokens == 35
    started = frame().body("in_progress")
    assert Response.model_validate(started).status == "in_progress" and started["usage"] is None


def test_the_error_event_carries_openais_fields_and_the_chat_streams_error() -> None:
    counter = EventCounter()
    counter.event({"type": "response.created", "response": frame().body("in_progress")})
    sse = counter.error(APIError(504, "too slow", type="server_error", code="request_timeout"))
    data = json.loads(sse["data"])
    assert sse["event"] == "error" and data["sequence_number"] == 1
    assert EVENTS.validate_python(data).message == "too slow"
    assert data["code"] == "request_timeout" and data["error"]["type"] == "server_error"


def test_a_failed_stream_ends_with_response_failed_then_the_error_event() -> None:
    # Codex CLI ignores `error` events: it reads `response.failed` and retries or stops by
    # its error's code; the official client raises on the `error` event after it.
    counter = EventCounter()
    counter.event({"type": "response.created", "response": frame().body("in_progress")})
    builder = OutputBuilder()
    builder.add(ChatDelta(content="Par"))
    failed, error = counter.failed(APIError(400, "the context is full", code="context_length_exceeded"),
                                   frame(), builder.so_far())
    body = json.loads(failed["data"])
    assert failed["event"] == "response.failed" and body["sequence_number"] == 1
    assert body["response"]["status"] == "failed" and body["response"]["id"] == "resp_1"
    assert body["response"]["error"] == {"code": "context_length_exceeded", "message": "the context is full"}
    message = body["response"]["output"][0]  # what was streamed before the failure, unfinished
    assert message["status"] == "incomplete" and message["content"][0]["text"] == "Par"
    assert "error" not in body  # the official client raises on a top-level error: that is the next event's job
    assert error["event"] == "error" and json.loads(error["data"])["sequence_number"] == 2
    codeless = counter.failed(APIError(500, "boom", type="server_error"), frame(), [])
    assert json.loads(codeless[0]["data"])["response"]["error"]["code"] == "server_error"


# -- a real server, the official client ---------------------------------------------------------


@pytest.fixture(scope="module")
def engine(qwen_model: Model) -> Iterator[Engine]:
    with Engine(qwen_model, EngineSettings(n_ctx=8192, max_running=4, n_seq_max=8)) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[RunningServer]:
    settings = ServerSettings(model_name=MODEL, api_keys=(KEY_A, KEY_B), max_tokens_limit=512, max_tools=4)
    with RunningServer(create_app(engine, settings)) as running:
        yield running


@pytest.fixture
def client(server: RunningServer, engine: Engine) -> Iterator[OpenAI]:
    yield server.client(api_key=KEY_A)
    assert_idle(engine)


def ask(client: OpenAI, input: Any, **options: Any) -> Any:
    return client.responses.create(model=MODEL, input=input, **{"max_output_tokens": 24, "temperature": 0, **options})


def test_string_input(client: OpenAI) -> None:
    response = ask(client, "What is the capital of France? Answer with one word.")
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    assert response.status in ("completed", "incomplete")
    assert "paris" in response.output_text.lower()
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.store is True and response.temperature == 0 and response.max_output_tokens == 24


def test_item_input_with_parts_and_instructions(client: OpenAI, engine: Engine) -> None:
    response = ask(client, [
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Here are two numbers: 17 and 25."},
            {"type": "input_text", "text": "What is their sum? Answer with the number only."}]},
    ], instructions="You are a calculator.")
    assert "42" in response.output_text
    assert response.instructions == "You are a calculator."
    expected = [{"role": "system", "content": "You are a calculator."},
                {"role": "user", "content": "Here are two numbers: 17 and 25.\nWhat is their sum? "
                                            "Answer with the number only."}]
    assert response.usage.input_tokens == len(chat_tokenizer(engine).encode(expected))


def test_max_output_tokens_makes_an_incomplete_response(client: OpenAI) -> None:
    response = ask(client, "Count from 1 to 100, comma-separated.", max_output_tokens=5)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5 and response.output[0].status == "incomplete"


def test_a_chain_of_four_remembers_and_evaluates_only_the_new_tokens(client: OpenAI, engine: Engine) -> None:
    instructions = "You are a helpful assistant. Answer briefly."
    turns = ["My name is Ada and my favourite colour is green. Reply with OK.",
             "What is my name? Answer with the name only.",
             "What is my favourite colour? Answer with the colour only.",
             "Say my name and my favourite colour, separated by a comma."]
    previous = None
    answers = []
    for turn in turns:
        response = ask(client, turn, instructions=instructions, max_output_tokens=16,
                       previous_response_id=previous.id if previous else None)
        usage = response.usage
        if previous is not None:
            assert response.previous_response_id == previous.id
            # The earlier prompt and reply are cached (the reply's last token, unless it ended the
            # reply, was sampled but not yet evaluated): only the new message is evaluated.
            assert usage.input_tokens_details.cached_tokens >= previous.usage.input_tokens + \
                previous.usage.output_tokens - 1
            new = engine.model.tokenize(turn, add_special=False, parse_special=False)
            # ... plus the template's few tokens around it ("<|im_end|>\n<|im_start|>user\n" ...).
            assert usage.input_tokens - usage.input_tokens_details.cached_tokens <= len(new) + 12
        answers.append(response.output_text.lower())
        previous = response
    assert "ada" in answers[1]
    assert "green" in answers[2]
    assert "ada" in answers[3] and "green" in answers[3]


def test_instructions_are_not_carried_to_the_next_response(client: OpenAI, engine: Engine) -> None:
    first = ask(client, "Hello.", instructions="Always answer in French.")
    second = ask(client, "Hi again.", previous_response_id=first.id)
    assert second.instructions is None
    conversation = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "Hi again."}]
    namespace = "key-" + hashlib.sha256(KEY_A.encode()).hexdigest()[:32]  # key A's cache namespace
    assert second.usage.input_tokens == len(chat_tokenizer(engine).encode(conversation, namespace=namespace))
    stored = client.responses.retrieve(first.id)
    assert stored.instructions == "Always answer in French."


WEATHER_ITEM = {"city": "Paris", "temperature_c": 21, "sky": "sunny"}


def test_a_tool_round_trip(client: OpenAI) -> None:
    call_response = ask(client, "What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
                        max_output_tokens=48)
    calls = [item for item in call_response.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.call_id and call.id.startswith("fc_") and call.status == "completed"
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert call_response.output_text == ""

    output = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(WEATHER_ITEM)}
    answer = ask(client, [output], previous_response_id=call_response.id, tools=[WEATHER], max_output_tokens=40)
    # The model answers from the output (it may call the tool once more on its way: "auto").
    assert answer.output[-1].type == "message", answer.output
    text = answer.output_text.lower()
    assert "21" in text or "sunny" in text, answer.output
    assert answer.usage.input_tokens_details.cached_tokens >= call_response.usage.input_tokens


def test_the_answer_that_closes_a_tool_round_continues_the_calls_prompt(client: OpenAI) -> None:
    call_response = ask(client, "What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
                        max_output_tokens=48)
    call = next(item for item in call_response.output if item.type == "function_call")
    output = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(WEATHER_ITEM)}
    # Function calling off for the answer, as agent loops ask at their last iteration.
    answer = ask(client, [output], previous_response_id=call_response.id, tools=[WEATHER], tool_choice="none",
                 max_output_tokens=40)
    assert [item.type for item in answer.output] == ["message"]
    text = answer.output_text.lower()
    assert "21" in text or "sunny" in text, answer.output_text
    assert not text.lstrip().startswith(("{", "<", "[", "`"))
    # The call's prompt and all of the call but its last characters came from the cache.
    cached = answer.usage.input_tokens_details.cached_tokens
    assert cached >= call_response.usage.input_tokens + call_response.usage.output_tokens - 4
    assert answer.usage.input_tokens - cached < 80  # the result and the closing note


def test_tool_choice_none_and_a_named_function(client: OpenAI) -> None:
    free = ask(client, "What is the weather in Paris?", tools=[WEATHER], tool_choice="none")
    assert [item.type for item in free.output] == ["message"] and free.output_text
    named = ask(client, "Tell me a joke.", tools=[WEATHER], max_output_tokens=48,
                tool_choice={"type": "function", "name": "get_weather"})
    assert [item.type for item in named.output] == ["function_call"]
    assert named.tool_choice.name == "get_weather"


def test_structured_output(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    response = ask(client, "Invent a person; give name and age as JSON.", max_output_tokens=64,
                   text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"
    loose = ask(client, "Give a JSON object with one key 'a' set to 1.", text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(loose.output_text), dict)


def test_streamed_text_events_in_order(client: OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="Write one sentence about the sea.",
                                          max_output_tokens=32, temperature=0, stream=True))
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 3
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     kinds[-1]]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == final.output_text == events[-4].text
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    assert client.responses.retrieve(final.id).output_text == text  # stored once complete


def test_streamed_function_call_events(client: OpenAI) -> None:
    events = list(client.responses.create(model=MODEL, input="Weather in Oslo?", tools=[WEATHER],
                                          tool_choice="required", max_output_tokens=48, temperature=0, stream=True))
    kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    added, done = events[2].item, events[5].item
    assert added.type == "function_call" and added.status == "in_progress" and added.arguments == ""
    assert done.status == "completed" and json.loads(done.arguments) == json.loads(events[4].arguments)
    assert events[3].delta == done.arguments and events[3].item_id == done.id
    assert events[-1].response.output[0].call_id == done.call_id


def test_stream_helper_and_sse_event_names(server: RunningServer, client: OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=48, temperature=0) as stream:
        final = stream.get_final_response()
    assert final.output_text and final.status == "completed"
    names, types = [], []
    with httpx.stream("POST", f"{server.url}/v1/responses", headers={"Authorization": f"Bearer {KEY_A}"},
                      json={"model": MODEL, "input": "Say hi.", "max_output_tokens": 4, "stream": True},
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event:"):
                names.append(line.split(":", 1)[1].strip())
            elif line.startswith("data:"):
                types.append(json.loads(line.split(":", 1)[1])["type"])
    assert names == types and types[-1] in ("response.completed", "response.incomplete")


def test_retrieve_and_delete(client: OpenAI) -> None:
    response = ask(client, "Name a colour.", metadata={"topic": "colours"})
    stored = client.responses.retrieve(response.id)
    assert stored.id == response.id and stored.output_text == response.output_text
    assert stored.metadata == {"topic": "colours"} and stored.usage == response.usage
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, "Go on.", previous_response_id=response.id)
    assert info.value.body["param"] == "previous_response_id"


def test_another_key_cannot_read_delete_or_continue_a_response(server: RunningServer, client: OpenAI) -> None:
    response = ask(client, "Name a fruit.")
    other = server.client(api_key=KEY_B)
    with pytest.raises(openai.NotFoundError) as read:
        other.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError) as chained:
        ask(other, "Which fruit?", previous_response_id=response.id)
    assert chained.value.body["param"] == "previous_response_id"
    unknown_id = "resp_" + "0" * 48
    with pytest.raises(openai.NotFoundError) as unknown:
        other.responses.retrieve(unknown_id)
    # The same answer as for an id that never existed.
    assert {**read.value.body, "message": read.value.body["message"].replace(response.id, unknown_id)} == \
        unknown.value.body
    assert client.responses.retrieve(response.id).output_text == response.output_text
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").responses.retrieve(response.id)


def test_store_false_cannot_be_retrieved_or_continued(client: OpenAI) -> None:
    response = ask(client, "Name a tree.", store=False)
    assert response.store is False and response.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        ask(client, "Another one.", previous_response_id=response.id)


def post(server: RunningServer, body: dict, key: str = KEY_A) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.mark.parametrize("fields, status, param", [
    ({"tools": [{"type": "namespace", "name": "ns", "description": "d",
                 "tools": [{"type": "namespace", "name": "inner", "tools": []}]}]}, 400, "tools[0].tools[0].type"),
    ({"tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ({"tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}}, 400, "tool_choice"),
    ({"background": True}, 400, "background"),
    ({"conversation": "conv_123"}, 400, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, 400, "prompt"),
    ({"top_logprobs": 5}, 400, "top_logprobs"),
    ({"reasoning": {"effort": 1}}, 400, "reasoning.effort"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}, 400,
     "input[0].content[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400, "input[0].call_id"),
    ({"input": []}, 400, "input"),
    ({"input": {"role": "user"}}, 400, "input"),
    ({"max_output_tokens": 100_000}, 400, "max_output_tokens"),
    ({"max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"temperature": 3}, 400, "temperature"),
    ({"tools": [WEATHER] * 5}, 400, "tools"),
    ({"tools": [{**WEATHER, "name": "bad name"}]}, 400, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "bad name", "schema": {}}}}, 400, "text.format"),
    ({"text": {"format": {"type": "xml"}}}, 400, "text.format"),
    ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"model": "gpt-9"}, 404, "model"),
])
def test_refusals_are_openai_shaped(server: RunningServer, client: OpenAI, fields: dict, status: int,
                                    param: str) -> None:
    response = post(server, {"model": MODEL, "input": "hi", "max_output_tokens": 4, **fields})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_context_overflow_and_truncation(qwen_model: Model) -> None:
    with Engine(qwen_model, EngineSettings(n_ctx=512, max_running=2, n_seq_max=4)) as small:
        with RunningServer(create_app(small, model_name=MODEL)) as running:
            small_client = running.client()
            first = ask(small_client, "word " * 300, max_output_tokens=4)
            with pytest.raises(openai.BadRequestError) as info:
                ask(small_client, "more " * 300, previous_response_id=first.id, max_output_tokens=4)
            assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "input"
            # truncation "auto" drops the oldest turn instead.
            kept = ask(small_client, "more " * 300, previous_response_id=first.id, max_output_tokens=4,
                       truncation="auto")
            assert kept.truncation == "auto" and kept.usage.input_tokens < first.usage.input_tokens + 100
        assert_idle(small)


def test_a_timeout_mid_stream_is_an_error_event_the_client_raises(qwen_model: Model) -> None:
    with Engine(qwen_model, EngineSettings(n_ctx=1024, max_running=2, n_seq_max=4)) as small:
        app = create_app(small, ServerSettings(model_name=MODEL, request_timeout=1.0))
        with RunningServer(app) as running:
            stream = running.client().responses.create(
                # A reply far longer than a second (asked to count, Qwen 0.5B sometimes stops after a few numbers).
                model=MODEL, input="Write the numbers from 1 to 300, one per line, with no other text.",
                max_output_tokens=500, temperature=0, stream=True)
            events = []
            with pytest.raises(openai.APIError) as info:
                for event in stream:
                    events.append(event)
            assert info.value.body["code"] == "request_timeout"
            seen = [event.type for event in events]
            assert seen[:2] == ["response.created", "response.in_progress"] and "response.completed" not in seen
            # Before the error event, the one Codex CLI reads: the response, failed, with the error's code.
            assert seen[-1] == "response.failed" and events[-1].response.status == "failed"
            assert events[-1].response.error.code == "request_timeout"
        assert_idle(small)


# -- Agent Framework's OpenAI clients, unchanged ------------------------------------------------------


def test_agent_framework_responses_client_with_a_python_tool(server: RunningServer, client: OpenAI) -> None:
    from agent_framework import Message, tool
    from agent_framework.openai import OpenAIChatClient

    calls: list[str] = []

    @tool(description="Current weather in a city.")
    def get_weather(city: str) -> str:
        calls.append(city)
        return json.dumps({"city": city, "temperature_c": 21, "sky": "sunny"})

    async def scenario() -> tuple[str, str, str]:
        chat = OpenAIChatClient(model=MODEL, base_url=f"{server.url}/v1", api_key=KEY_A)
        reply = await chat.get_response([Message("user", ["What is 2 + 3? Answer with the number only."])],
                                        options={"temperature": 0, "max_tokens": 8})
        agent = chat.as_agent(instructions="You are a weather assistant. Answer briefly.", tools=[get_weather])
        session = agent.create_session()
        first = await agent.run("What is the weather in Paris?", session=session,
                                options={"tool_choice": "required", "temperature": 0, "max_tokens": 40})
        second = await agent.run("Which city did I ask about? Answer with the city only.", session=session,
                                 options={"temperature": 0, "max_tokens": 16})
        return reply.text, first.text, second.text

    arithmetic, weather, city = asyncio.run(scenario())
    assert "5" in arithmetic
    assert calls and "paris" in calls[0].lower()
    assert "21" in weather or "sunny" in weather.lower()
    assert "paris" in city.lower()


def test_agent_framework_chat_completion_client(server: RunningServer, client: OpenAI) -> None:
    from agent_framework.openai import OpenAIChatCompletionClient

    async def scenario() -> tuple[str, str]:
        chat = OpenAIChatCompletionClient(model=MODEL, base_url=f"{server.url}/v1", api_key=KEY_A)
        agent = chat.as_agent(instructions="You are a helpful assistant. Answer briefly.")
        session = agent.create_session()
        first = await agent.run("My name is Ada. Reply with OK.", session=session,
                                options={"temperature": 0, "max_tokens": 8})
        second = await agent.run("What is my name? Answer with the name only.", session=session,
                                 options={"temperature": 0, "max_tokens": 8})
        return first.text, second.text

    first, second = asyncio.run(scenario())
    assert first and "ada" in second.lower()
