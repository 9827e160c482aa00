"""Anthropic's Messages API without a model: the translation of requests to chat
(tables of every block type, tool choices, system forms, refusals naming their
field), a property test at the extremes (huge strings, deep nesting, many blocks:
a typed error or a valid history, never a crash), the usage and stop-reason
mapping, the stop-sequence scanner, and, through an app over a fake engine, the
error shapes, `x-api-key`, and the model aliases and `any_model` of every route."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_kv import FakeBackend, FakeModel
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from starlette.requests import Request
from typer.testing import CliRunner

from kvchat import Engine, EngineSettings
from kvchat.chat import ChatDelta, ToolCall
from kvchat.cli import app as cli_app
from kvchat.cli.runtime import Runtime
from kvchat.engine import SamplingParams, Usage
from kvchat.errors import InvalidRequestError
from kvchat.server import ServerSettings, create_app
from kvchat.server.errors import APIError, anthropic_error_body, anthropic_error_type, speaks_anthropic
from kvchat.server.messages_api import (
    MAX_JSON_DEPTH,
    CountTokensRequest,
    MessagesRequest,
    anthropic_usage,
    chat_request,
    sampling,
    start_usage,
    stop_reason,
    stop_sequences,
)
from kvchat.server.routes.messages import MessageBuilder, ping_event
from kvchat.server.stop_scanner import StopScanner

WEATHER = {
    "name": "get_weather",
    "description": "The weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CHAT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": WEATHER["input_schema"],
    },
}
USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
CALL = {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ASKED = {"role": "user", "content": "Weather in Paris?"}


def request(messages: list[dict[str, Any]], **fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 16, "messages": messages, **fields})


def translated(messages: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    return chat_request(request(messages, **fields)).messages


# -- translation tables ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}]),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
                        {"type": "text", "text": "b"},
                    ],
                }
            ],
            [{"role": "user", "content": "a\nb"}],
        ),
        ([{"role": "user", "content": []}], [{"role": "user", "content": ""}]),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
            ],
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
            ],
        ),
        (  # text and a call; the result answers it, with text after it
            [
                ASKED,
                {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}, USE]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                        {"type": "text", "text": "And tomorrow?"},
                    ],
                },
            ],
            [
                ASKED,
                {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "toolu_1", "name": "get_weather", "content": "Sunny"},
                {"role": "user", "content": "And tomorrow?"},
            ],
        ),
        (  # a call alone; the result's content as text blocks; an error result
            [
                ASKED,
                {"role": "assistant", "content": [USE, {**USE, "id": "toolu_2", "input": {}}]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "Sun"}, {"type": "text", "text": "20 C"}],
                        },
                        {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no city", "is_error": True},
                    ],
                },
            ],
            [
                ASKED,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        CALL,
                        {**CALL, "id": "toolu_2", "function": {"name": "get_weather", "arguments": "{}"}},
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_1", "name": "get_weather", "content": "Sun\n20 C"},
                {"role": "tool", "tool_call_id": "toolu_2", "name": "get_weather", "content": "Error: no city"},
            ],
        ),
        (  # text before a result stays before it; a result without content is empty
            [
                ASKED,
                {"role": "assistant", "content": [USE]},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "note"}, {"type": "tool_result", "tool_use_id": "toolu_1"}],
                },
            ],
            [
                ASKED,
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "user", "content": "note"},
                {"role": "tool", "tool_call_id": "toolu_1", "name": "get_weather", "content": ""},
            ],
        ),
        (  # thinking blocks sent back are dropped; a message of thinking only goes with them
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": "s"},
                        {"type": "text", "text": "hello"},
                    ],
                },
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
                {"role": "user", "content": "bye"},
            ],
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"},
                {"role": "user", "content": "bye"},
            ],
        ),
    ],
)
def test_messages_become_chat_messages(messages: list, expected: list) -> None:
    assert translated(messages) == expected


def test_a_system_message_inside_messages_stays_where_it_is() -> None:
    # Claude Code sends one after the first user message: blocks first, a plain string later.
    environment = "# Environment\nPrimary working directory: /work"
    first = translated(
        [
            ASKED,
            {
                "role": "system",
                "content": [{"type": "text", "text": environment, "cache_control": {"type": "ephemeral"}}],
            },
        ],
        system="Be brief.",
    )
    later = translated([ASKED, {"role": "system", "content": environment}], system="Be brief.")
    assert (
        first
        == later
        == [{"role": "system", "content": "Be brief."}, ASKED, {"role": "system", "content": environment}]
    )


def test_deferred_tools_stay_out_until_a_tool_reference_loads_them() -> None:
    search = {"name": "ToolSearch", "input_schema": {"type": "object"}}
    deferred = {**WEATHER, "defer_loading": True}
    assert chat_request(request([ASKED], tools=[search, deferred])).tools == [
        {"type": "function", "function": {"name": "ToolSearch", "parameters": {"type": "object"}}}
    ]
    assert chat_request(request([ASKED], tools=[deferred])).tools is None
    found = {"type": "tool_use", "id": "toolu_s", "name": "ToolSearch", "input": {"query": "weather"}}
    reference = {
        "type": "tool_result",
        "tool_use_id": "toolu_s",
        "content": [{"type": "tool_reference", "tool_name": "get_weather"}],
    }
    chat = chat_request(
        request(
            [ASKED, {"role": "assistant", "content": [found]}, {"role": "user", "content": [reference]}],
            tools=[search, deferred],
        )
    )
    assert [tool["function"]["name"] for tool in chat.tools or ()] == ["ToolSearch", "get_weather"]
    assert chat.messages[-1] == {
        "role": "tool",
        "tool_call_id": "toolu_s",
        "name": "ToolSearch",
        "content": "Tool loaded: get_weather",
    }


CAPTURED = Path(__file__).parent / "data" / "claude_request.json"


def test_claude_codes_captured_request_translates() -> None:
    body = MessagesRequest.model_validate(json.loads(CAPTURED.read_text()))
    chat = chat_request(body)
    assert [message["role"] for message in chat.messages] == ["system", "user", "system"]
    assert chat.messages[0]["content"].startswith("x-anthropic-billing-header")
    names = [tool["function"]["name"] for tool in chat.tools or ()]
    assert len(names) == 11 and "Bash" in names and "DeferredToolPlaceholder" not in names
    assert chat.tool_choice is None and chat.max_calls is None
    assert sampling(body, 4096).max_tokens == 4096 and stop_sequences(body.stop_sequences) == ()


@pytest.mark.parametrize(
    ("system", "content"),
    [
        ("Be brief.", "Be brief."),
        (
            [
                {"type": "text", "text": "You are a CLI.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Be brief."},
            ],
            "You are a CLI.\nBe brief.",
        ),
        ([], ""),
    ],
)
def test_the_system_prompt_comes_first(system: Any, content: str) -> None:
    assert translated([{"role": "user", "content": "hi"}], system=system) == [
        {"role": "system", "content": content},
        {"role": "user", "content": "hi"},
    ]


@pytest.mark.parametrize(
    ("tools", "choice", "expected_tools", "expected_choice", "max_calls"),
    [
        ([WEATHER], None, [CHAT_WEATHER], None, None),
        (
            [{**WEATHER, "type": "custom", "cache_control": {"type": "ephemeral"}}],
            {"type": "auto"},
            [CHAT_WEATHER],
            "auto",
            None,
        ),
        ([WEATHER], {"type": "any"}, [CHAT_WEATHER], "required", None),
        (
            [WEATHER],
            {"type": "tool", "name": "get_weather"},
            [CHAT_WEATHER],
            {"type": "function", "function": {"name": "get_weather"}},
            None,
        ),
        ([WEATHER], {"type": "none"}, [CHAT_WEATHER], "none", None),
        ([WEATHER], {"type": "auto", "disable_parallel_tool_use": True}, [CHAT_WEATHER], "auto", 1),
        ([{"name": "now"}], None, [{"type": "function", "function": {"name": "now"}}], None, None),
        (None, {"type": "auto"}, None, None, None),  # nothing to choose from
        ([], {"type": "none"}, None, None, None),
        (None, {"type": "any"}, None, "required", None),  # refused by the chat layer: it needs tools
    ],
)
def test_tools_and_tool_choice_become_chat_ones(
    tools: Any, choice: Any, expected_tools: Any, expected_choice: Any, max_calls: int | None
) -> None:
    chat = chat_request(request([ASKED], tools=tools, tool_choice=choice))
    assert (chat.tools, chat.tool_choice, chat.max_calls) == (expected_tools, expected_choice, max_calls)


def test_hints_and_fields_kvchat_ignores_are_accepted() -> None:
    body = request(
        [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        thinking={"type": "enabled", "budget_tokens": 1024},
        context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
        output_config={"effort": "low"},
        service_tier="auto",
        metadata={"user_id": "user_abc"},
        cache_control={"type": "ephemeral"},
        anthropic_future_field=[1, 2],
    )
    assert chat_request(body).messages == [{"role": "user", "content": "hi"}]
    for kind in ("disabled", "adaptive"):
        assert chat_request(request([ASKED], thinking={"type": kind})).messages == [ASKED]


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "source": {}}]}
                ]
            },
            "messages[0].content[1]",
            "image blocks are not supported",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": [{"type": "document", "source": {}}]},
                ]
            },
            "messages[2].content[0]",
            "document blocks are not supported",
        ),
        (
            {
                "messages": [
                    ASKED,
                    {"role": "assistant", "content": [USE]},
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_1",
                                "content": [{"type": "image", "source": {}}],
                            }
                        ],
                    },
                ]
            },
            "messages[2].content[0].content[0]",
            "image blocks are not supported",
        ),
        (
            {
                "messages": [
                    ASKED,
                    {
                        "role": "assistant",
                        "content": [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}],
                    },
                    ASKED,
                ]
            },
            "messages[1].content[0]",
            "'server_tool_use' blocks are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "web_search_tool_result", "content": []}]}]},
            "messages[0].content[0]",
            "'web_search_tool_result' blocks are not supported",
        ),
        ({"messages": [{"role": "user", "content": [USE]}]}, "messages[0].content[0]", "'tool_use' blocks"),
        (
            {"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]},
            "messages[0].content[0]",
            "'thinking' blocks",
        ),
        (
            {
                "messages": [
                    ASKED,
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]},
                    ASKED,
                ]
            },
            "messages[1].content[0]",
            "'tool_result' blocks",
        ),
        ({"messages": [ASKED, {"role": "assistant", "content": "The answer is"}]}, "messages[1]", "prefill"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'user', 'assistant' or 'system'"),
        (
            {"messages": [{"role": "system", "content": [{"type": "image"}]}, ASKED]},
            "messages[0].content[0]",
            "image blocks are not supported",
        ),
        (
            {
                "messages": [
                    ASKED,
                    {"role": "assistant", "content": [USE]},
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "tool_reference"}]}
                        ],
                    },
                ]
            },
            "messages[2].content[0].content[0].tool_name",
            "must be a string",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "a string or a list of blocks"),
        ({"messages": [{"role": "user", "content": ["text"]}]}, "messages[0].content[0]", "must be a block"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
            "must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}]},
            "messages[0].content[0].tool_use_id",
            "no tool_use",
        ),
        (
            {"messages": [ASKED, {"role": "assistant", "content": [{**USE, "name": ""}]}, ASKED]},
            "messages[1].content[0].name",
            "1 to 256 characters",
        ),
        (
            {"messages": [ASKED, {"role": "assistant", "content": [{**USE, "name": "n" * 257}]}, ASKED]},
            "messages[1].content[0].name",
            "1 to 256 characters",
        ),
        (
            {"messages": [ASKED, {"role": "assistant", "content": [{**USE, "id": ""}]}, ASKED]},
            "messages[1].content[0].id",
            "1 to 256",
        ),
        (  # a tool the model made up, as kvchat's parser returned it: it comes back in the history
            {"messages": [ASKED, {"role": "assistant", "content": [{**USE, "name": "cat notes.txt"}]}, ASKED]},
            None,
            None,
        ),
        (
            {"messages": [ASKED, {"role": "assistant", "content": [{**USE, "input": "city=Paris"}]}, ASKED]},
            "messages[1].content[0].input",
            "an object",
        ),
        (
            {"messages": [ASKED, {"role": "assistant", "content": [{**USE, "input": {"a": [[[[]]]]}}]}, ASKED]},
            None,
            None,
        ),  # shallow nesting is fine
        ({"system": [{"type": "image", "source": {}}]}, "system[0]", "image blocks are not supported"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}, "tools[0]", "server tools"),
        ({"tools": [WEATHER, {"type": "bash_20250124", "name": "bash"}]}, "tools[1]", "server tools"),
        (
            {"tools": [{"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}]},
            "tools[0]",
            "server tools",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.type", "'auto', 'any', 'tool'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice.name", "name a tool"),
    ],
)
def test_refusals_name_their_field(fields: dict, field: str | None, message: str | None) -> None:
    body = MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": [ASKED], **fields})
    if field is None:
        chat_request(body)
        return
    with pytest.raises(InvalidRequestError) as info:
        chat_request(body)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:") or str(info.value).startswith(f"{field} ")
    assert message in str(info.value)


@pytest.mark.parametrize("where", ["tool_use", "input_schema"])
def test_json_nested_too_deep_is_refused_at_any_depth(where: str) -> None:
    def nested(depth: int) -> dict:
        value: dict = {}
        for _ in range(depth):
            value = {"a": value}
        return value

    for depth, refused in ((MAX_JSON_DEPTH - 1, False), (MAX_JSON_DEPTH + 1, True), (200_000, True)):
        if where == "tool_use":
            fields: dict = {
                "messages": [ASKED, {"role": "assistant", "content": [{**USE, "input": nested(depth)}]}, ASKED]
            }
        else:
            fields = {"tools": [{**WEATHER, "input_schema": nested(depth)}]}
        body = MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": [ASKED], **fields})
        if refused:
            with pytest.raises(InvalidRequestError, match="deeper than"):
                chat_request(body)
        else:
            chat_request(body)


@pytest.mark.parametrize(
    ("fields", "location"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
        ({"model": "m" * 300}, "model"),
        ({"model": "claude-\ud800"}, "model"),
        ({"stop_sequences": "END"}, "stop_sequences"),
    ],
)
def test_the_schema_refuses(fields: dict, location: str) -> None:
    body = {"model": "m", "max_tokens": 8, "messages": [ASKED], **fields}
    body = {key: value for key, value in body.items() if value is not None}
    with pytest.raises(ValidationError) as info:
        MessagesRequest.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == location


def test_count_tokens_needs_no_max_tokens() -> None:
    body = CountTokensRequest.model_validate({"model": "m", "messages": [ASKED], "tools": [WEATHER]})
    assert chat_request(body).tools == [CHAT_WEATHER]


# -- sampling, stop sequences, stop reasons, usage --------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "limit", "expected"),
    [
        ({"max_tokens": 32000}, 4096, {"max_tokens": 4096}),
        ({"max_tokens": 32000}, None, {"max_tokens": 32000}),
        (
            {"max_tokens": 10, "temperature": 0, "top_p": 0.5, "top_k": 7},
            4096,
            {"max_tokens": 10, "temperature": 0.0, "top_p": 0.5, "top_k": 7},
        ),
    ],
)
def test_max_tokens_is_clamped_to_the_servers_limit(fields: dict, limit: int | None, expected: dict) -> None:
    params = sampling(request([ASKED], **fields), limit)
    assert {name: getattr(params, name) for name in expected} == expected
    assert params.stop == ()  # stop sequences are matched by the route, not the engine


def test_unset_sampling_options_keep_kvchats_defaults() -> None:
    params, defaults = sampling(request([ASKED]), None), SamplingParams()
    assert (params.temperature, params.top_p, params.top_k) == (defaults.temperature, defaults.top_p, defaults.top_k)


def test_the_servers_default_temperature_fills_in_an_unset_one() -> None:
    assert sampling(request([ASKED]), None, {"temperature": 0.0}).temperature == 0.0
    assert sampling(request([ASKED], temperature=0.7), None, {"temperature": 0.0}).temperature == 0.7


@pytest.mark.parametrize("temperature", [-0.1, 2.01, float("nan"), float("inf")])
def test_a_default_temperature_outside_0_to_2_is_refused(temperature: float) -> None:
    with pytest.raises(InvalidRequestError, match="temperature"):
        ServerSettings(model_name="m", temperature=temperature)


@pytest.mark.parametrize(
    ("values", "field"),
    [(["a"] * 17, "stop_sequences"), (["ok", ""], "stop_sequences[1]"), (["x" * 1001], "stop_sequences[0]")],
)
def test_bad_stop_sequences_are_refused(values: list[str], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        stop_sequences(values)
    assert info.value.field == field
    assert stop_sequences(["END", "\n\n"]) == ("END", "\n\n") and stop_sequences(None) == ()


def scan(stops: list[str], pieces: list[str]) -> tuple[str, str | None]:
    scanner = StopScanner(stops)
    shown = "".join(scanner.feed(piece) for piece in pieces)
    return shown + scanner.flush(), scanner.matched


@pytest.mark.parametrize(
    ("stops", "pieces", "shown", "matched"),
    [
        ([], ["Hello", " world"], "Hello world", None),
        (["END"], ["one two"], "one two", None),
        (["END"], ["one E", "N", "D two"], "one ", "END"),
        (["END"], ["one EN", "x END"], "one ENx ", "END"),  # a false start is shown when it fails
        (["abab"], ["aba", "bab"], "", "abab"),
        (["aab"], ["aaab"], "a", "aab"),  # the matcher falls back inside a partial match
        (["b", "ab"], ["xab"], "x", "ab"),  # two end on the same character: the longer counts
        (["cd", "bcde"], ["abcdef"], "ab", "cd"),  # the first to end counts
        (["\n\n"], ["a\n", "\nb"], "a", "\n\n"),
        (["END"], ["ab", "EN"], "abEN", None),  # held text comes out at the end
    ],
)
def test_the_stop_scanner_finds_the_first_sequence(
    stops: list[str], pieces: list[str], shown: str, matched: str | None
) -> None:
    assert scan(stops, pieces) == (shown, matched)


def test_the_stop_scanner_is_linear_in_a_long_text() -> None:
    scanner = StopScanner(["a" * 999 + "b", "x" * 1000])
    text = "a" * 200_000
    shown = "".join(scanner.feed(text[i : i + 7]) for i in range(0, len(text), 7))
    assert len(shown) == 200_000 - 999 and scanner.matched is None
    assert scanner.feed("b") == "" and scanner.matched == "a" * 999 + "b"
    assert scanner.feed("more") == ""


def test_a_flush_forgets_a_partial_match() -> None:
    scanner = StopScanner(["END"])
    assert scanner.feed("xEN") == "x" and scanner.flush() == "EN"
    assert scanner.feed("D") == "D" and scanner.matched is None


@pytest.mark.parametrize(
    ("finish", "sequence", "reason"),
    [
        ("stop", None, "end_turn"),
        ("length", None, "max_tokens"),
        ("tool_calls", None, "tool_use"),
        ("cancelled", None, "end_turn"),
        ("cancelled", "END", "stop_sequence"),
        ("length", "END", "stop_sequence"),
    ],
)
def test_stop_reasons(finish: str, sequence: str | None, reason: str) -> None:
    assert stop_reason(finish, sequence) == reason


def test_usage_counts_evaluated_tokens_as_input_and_the_cache_as_read() -> None:
    usage = Usage(
        prompt_tokens=120,
        cached_tokens=100,
        evaluated_tokens=20,
        completion_tokens=7,
        time_to_first_token=0.1,
        finish_reason="stop",
    )
    mapped = anthropic_usage(usage)
    assert mapped == {
        "input_tokens": 20,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 100,
        "output_tokens": 7,
    }
    total = mapped["input_tokens"] + mapped["cache_read_input_tokens"] + mapped["cache_creation_input_tokens"]
    assert total == usage.prompt_tokens
    start = start_usage(120)
    assert start["input_tokens"] + start["cache_read_input_tokens"] == 120 and start["output_tokens"] == 0


# -- the property test: any request gives a typed error or a valid history --------------------------


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` seven times in eight, `bad` otherwise: most requests pass the schema and reach the translation."""
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda ok: good if ok else bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _nested(depth: int) -> Any:
    value: Any = {}
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


deep = st.integers(min_value=1, max_value=20_000).map(_nested)
texts = st.text(max_size=30) | st.just("<|im_start|>system\n") | st.just("x" * 100_000) | st.just("\ud800")
ids = mostly(st.sampled_from(["toolu_1", "toolu_2"]), st.sampled_from(["", "t" * 300]) | st.text(max_size=6))
names = mostly(st.sampled_from(["get_weather", "f-1"]), st.sampled_from(["bad name", ""]))
text_block = st.fixed_dictionaries(
    {"type": st.just("text"), "text": mostly(texts, json_values)},
    optional={"cache_control": st.just({"type": "ephemeral"})},
)
tool_use = st.fixed_dictionaries(
    {
        "type": st.just("tool_use"),
        "id": ids,
        "name": names,
        "input": mostly(st.dictionaries(st.text(max_size=8), json_values, max_size=4), json_values | deep),
    }
)
tool_reference = st.fixed_dictionaries({"type": st.just("tool_reference"), "tool_name": mostly(names, json_values)})
tool_result = st.fixed_dictionaries(
    {"type": st.just("tool_result"), "tool_use_id": ids},
    optional={
        "content": mostly(
            texts | st.lists(text_block | tool_reference, max_size=3), st.lists(json_values, max_size=3) | json_values
        ),
        "is_error": st.booleans(),
    },
)
other_blocks = st.fixed_dictionaries(
    {"type": st.sampled_from(["image", "document", "server_tool_use", "search_result", "x"]) | json_values}
)
thinking = st.fixed_dictionaries({"type": st.sampled_from(["thinking", "redacted_thinking"])})
blocks = mostly(st.one_of(text_block, tool_use, tool_result, thinking), other_blocks | json_values)
messages = st.fixed_dictionaries(
    {
        "role": mostly(st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["tool"]) | json_values),
        "content": mostly(texts | st.lists(blocks, max_size=6), json_values),
    }
)


def _round(use: dict[str, Any], result: dict[str, Any], answers: bool) -> list[dict[str, Any]]:
    """A tool round: the assistant's call, and the user's result (for that call, if `answers`)."""
    answer = {**result, "tool_use_id": use["id"]} if answers else result
    return [{"role": "assistant", "content": [use]}, {"role": "user", "content": [answer]}]


rounds = st.builds(_round, tool_use, tool_result, st.sampled_from([True] * 7 + [False]))
conversations = st.lists(mostly(rounds, messages.map(lambda message: [message])), max_size=6).map(
    lambda turns: [message for turn in turns for message in turn]
)


def ending_with_a_user_message(drawn: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most drawn conversations end with the user's turn, as valid ones do (a final
    assistant message is refused: the other tests draw that too)."""
    return drawn if drawn and len(drawn) % 4 == 0 else [*drawn, {"role": "user", "content": "go"}]


tools = st.fixed_dictionaries(
    {"name": mostly(names, json_values)},
    optional={
        "defer_loading": st.booleans() | json_values,
        "description": texts,
        "input_schema": json_values | deep,
        "type": st.sampled_from(["custom", "web_search_20250305", "bash_20250124", "text_editor_20250728"]),
        "cache_control": st.just({"type": "ephemeral"}),
    },
)
tool_choices = st.fixed_dictionaries(
    {"type": st.sampled_from(["auto", "any", "tool", "none", "function"]) | json_values},
    optional={"name": names | json_values, "disable_parallel_tool_use": st.booleans()},
)
bodies = st.fixed_dictionaries(
    {
        "model": mostly(st.sampled_from(["m", "claude-sonnet-4-5"]), texts),
        "max_tokens": mostly(st.integers(min_value=1, max_value=100_000), st.integers(max_value=0)),
        "messages": mostly(conversations.map(ending_with_a_user_message), json_values),
    },
    optional={
        "system": mostly(texts | st.lists(text_block, max_size=3), st.lists(blocks, max_size=3) | json_values),
        "tools": mostly(st.lists(tools, max_size=3), json_values),
        "tool_choice": mostly(tool_choices, json_values),
        "stop_sequences": mostly(st.lists(texts, max_size=3), json_values),
        "temperature": mostly(st.floats(min_value=0, max_value=1), json_values),
        "thinking": json_values,
        "stream": st.booleans(),
    },
)


def check_history(history: list[dict[str, Any]]) -> None:
    """A history complete() can take: known roles, text content, calls with JSON
    object arguments, answered after they are made."""
    made: set[str] = set()
    for message in history:
        assert message["role"] in ("user", "assistant", "system", "tool")
        assert isinstance(message["content"], str) or (message["content"] is None and message.get("tool_calls"))
        for call in message.get("tool_calls", ()):
            assert message["role"] == "assistant" and call["type"] == "function" and call["id"]
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
            made.add(call["id"])
        if message["role"] == "tool":
            assert message["tool_call_id"] in made and isinstance(message["name"], str)
    assert history and history[-1]["role"] in ("user", "tool", "system")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bodies)
def test_any_request_gives_a_typed_error_or_a_valid_history(drawn: dict) -> None:
    try:
        body = MessagesRequest.model_validate(drawn)
    except ValidationError:
        return
    try:
        chat = chat_request(body)
        stop_sequences(body.stop_sequences)
        sampling(body, 4096)
    except InvalidRequestError as exc:
        assert exc.field and exc.field.split("[")[0].split(".")[0] in (
            "messages",
            "system",
            "tools",
            "tool_choice",
            "stop_sequences",
        )
        assert str(exc).startswith(exc.field)
        return
    check_history(chat.messages)
    for tool in chat.tools or ():
        assert tool["type"] == "function" and isinstance(tool["function"], dict)


def test_many_blocks_and_huge_strings_convert() -> None:
    turn = [
        {"role": "assistant", "content": [{"type": "text", "text": "x" * 1000}, USE]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "y" * 1000}] * 20},
    ]
    many = [ASKED, *turn * 2_000]
    history = translated(many)
    assert len(history) == 1 + 2_000 * 21
    check_history(history)


# -- error shapes, keys, model ids: an app over a fake engine (no model) -------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "overloaded_error"),
        (504, "timeout_error"),
        (529, "overloaded_error"),
        (502, "api_error"),
    ],
)
def test_anthropic_error_types_follow_the_status(status: int, kind: str) -> None:
    assert anthropic_error_type(status) == kind


def test_the_anthropic_error_body_names_the_param_once() -> None:
    error = APIError(400, "must be a string", param="messages[0].content")
    assert anthropic_error_body(error) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "messages[0].content: must be a string"},
    }
    named = APIError(400, "messages[0].content[1]: image blocks are not supported", param="messages[0].content[1]")
    assert anthropic_error_body(named)["error"]["message"] == named.message
    assert anthropic_error_body(APIError(500, "bad \ud800"))["error"]["message"] == "bad \\ud800"


@pytest.mark.parametrize(
    ("path", "anthropic"),
    [
        ("/v1/messages", True),
        ("/v1/messages/count_tokens", True),
        ("/v1/messages/other", True),
        ("/v1/messagesx", False),
        ("/v1/chat/completions", False),
        ("/v1/models", False),
    ],
)
def test_the_messages_paths_speak_anthropic(path: str, anthropic: bool) -> None:
    assert speaks_anthropic(path) is anthropic


KEY = "sk-local"


@pytest.fixture
def fake_engine() -> Iterator[Engine]:
    backend = FakeBackend(n_ctx=256, n_seq_max=4)
    with Engine(FakeModel(), EngineSettings(cache_ram_bytes=0), memory=backend, runner=backend) as engine:
        yield engine


def app_client(engine: Engine, **options: Any) -> TestClient:
    settings = ServerSettings(**{"model_name": "served", "api_keys": (KEY,), "max_body_bytes": 4096, **options})
    return TestClient(create_app(engine, settings), base_url="http://127.0.0.1")


def messages_body(**fields: Any) -> dict[str, Any]:
    return {"model": "served", "max_tokens": 8, "messages": [ASKED], **fields}


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "kind", "message"),
    [
        ("/v1/messages", messages_body(), {}, 401, "authentication_error", "API key"),
        ("/v1/messages", messages_body(), {"x-api-key": "wrong"}, 401, "authentication_error", "API key"),
        (
            "/v1/messages",
            {"model": "served", "messages": [ASKED]},
            {"x-api-key": KEY},
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            "/v1/messages",
            messages_body(model="claude-opus-4-1"),
            {"x-api-key": KEY},
            404,
            "not_found_error",
            "claude-opus-4-1",
        ),
        (
            "/v1/messages",
            messages_body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
            {"x-api-key": KEY},
            400,
            "invalid_request_error",
            "messages[0].content[0]: image blocks are not supported",
        ),
        (
            "/v1/messages",
            messages_body(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            {"x-api-key": KEY},
            400,
            "invalid_request_error",
            "tools[0]: server tools",
        ),
        (
            "/v1/messages",
            messages_body(tools=[WEATHER] * 3),
            {"x-api-key": KEY},
            400,
            "invalid_request_error",
            "tools: 3 tools",
        ),
        (
            "/v1/messages/count_tokens",
            {"model": "served"},
            {"Authorization": f"Bearer {KEY}"},
            400,
            "invalid_request_error",
            "messages",
        ),
        ("/v1/messages", messages_body(system="x" * 5000), {"x-api-key": KEY}, 413, "request_too_large", "4096"),
        ("/v1/messages/nope", messages_body(), {"x-api-key": KEY}, 404, "not_found_error", "Not Found"),
    ],
)
def test_errors_on_the_messages_paths_are_anthropic_shaped(
    fake_engine: Engine, path: str, body: Any, headers: dict, status: int, kind: str, message: str
) -> None:
    response = app_client(fake_engine, max_tools=2).post(path, json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["type"] == "error" and set(response.json()) == {"type", "error"}
    assert response.json()["error"]["type"] == kind
    assert message in response.json()["error"]["message"]


def test_a_bad_body_is_400_not_422_and_the_openai_routes_keep_their_shape(fake_engine: Engine) -> None:
    client = app_client(fake_engine, max_body_bytes=1 << 20)
    broken = client.post(
        "/v1/messages", content=b"{not json", headers={"x-api-key": KEY, "content-type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
    deep = "[" * 100_000 + "]" * 100_000
    nested = client.post(
        "/v1/messages", content=deep.encode(), headers={"x-api-key": KEY, "content-type": "application/json"}
    )
    assert nested.status_code == 400 and nested.json()["type"] == "error"
    openai = client.post("/v1/chat/completions", json={"model": "served"}, headers={"Authorization": f"Bearer {KEY}"})
    assert openai.status_code == 400 and set(openai.json()) == {"error"} and openai.json()["error"]["param"]


def test_x_api_key_and_bearer_are_the_same_key(fake_engine: Engine) -> None:
    client = app_client(fake_engine, api_keys=(KEY, "other"))
    for headers in (
        {"x-api-key": KEY},
        {"Authorization": f"Bearer {KEY}"},
        {"x-api-key": "unused", "Authorization": f"Bearer {KEY}"},
    ):
        assert client.get("/v1/models", headers=headers).status_code == 200, headers
    for headers in ({}, {"x-api-key": ""}, {"Authorization": KEY}, {"x-api-key": "nope", "Authorization": "Bearer no"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", headers
    state = client.app.state.kvchat

    def tenant(headers: dict[str, str]) -> Any:
        raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        return state.authorize(Request({"type": "http", "headers": raw}))

    assert tenant({"x-api-key": KEY}) == tenant({"Authorization": f"Bearer {KEY}"}) != tenant({"x-api-key": "other"})


def test_model_aliases_are_served_and_listed(fake_engine: Engine) -> None:
    client = app_client(fake_engine, model_aliases=("claude-sonnet-4-5", "served", "claude-sonnet-4-5", "gpt-4o"))
    headers = {"x-api-key": KEY}
    listed = client.get("/v1/models", headers=headers).json()["data"]
    assert [card["id"] for card in listed] == ["served", "claude-sonnet-4-5", "gpt-4o"]
    assert client.get("/v1/models/gpt-4o", headers=headers).json()["id"] == "gpt-4o"
    assert client.get("/v1/models/claude-haiku", headers=headers).status_code == 404
    # An alias passes every route's model check: these fail later, on their bodies, not with a 404.
    for path, body in (
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": [ASKED], "n": 2}),
        ("/v1/messages", messages_body(model="claude-sonnet-4-5", tools=[{"type": "bash_20250124"}])),
        ("/v1/embeddings", {"model": "gpt-4o", "input": []}),
    ):
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 400, (path, response.text)
        response = client.post(path, json={**body, "model": "gpt-5"}, headers=headers)
        assert response.status_code == 404, (path, response.text)


def test_any_model_answers_every_id(fake_engine: Engine) -> None:
    client = app_client(fake_engine, any_model=True)
    headers = {"x-api-key": KEY}
    assert [card["id"] for card in client.get("/v1/models", headers=headers).json()["data"]] == ["served"]
    assert client.get("/v1/models/claude-opus-4-1", headers=headers).json()["id"] == "claude-opus-4-1"
    response = client.post(
        "/v1/messages", json=messages_body(model="claude-opus-4-1", tool_choice={"type": "x"}), headers=headers
    )
    assert response.status_code == 400 and "tool_choice.type" in response.json()["error"]["message"]


def test_server_settings_check_the_aliases() -> None:
    settings = ServerSettings(model_name="a", model_aliases=("b", "a", "b", "c"))
    assert settings.model_ids == ("a", "b", "c")
    assert settings.serves("c") and not settings.serves("d")
    assert ServerSettings(model_name="a", any_model=True).serves("d")
    with pytest.raises(InvalidRequestError) as info:
        ServerSettings(model_name="a", model_aliases=("",))
    assert info.value.field == "model_aliases"


@pytest.mark.parametrize(
    ("args", "env", "aliases", "any_model"),
    [
        ([], {}, (), False),
        (["--model-alias", "claude-sonnet-4-5", "--model-alias", "gpt-4o"], {}, ("claude-sonnet-4-5", "gpt-4o"), False),
        (["--any-model"], {}, (), True),
        ([], {"KVCHAT_MODEL_ALIAS": "x y", "KVCHAT_ANY_MODEL": "1"}, ("x", "y"), True),
    ],
)
def test_serve_passes_the_model_ids(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict, aliases: tuple, any_model: bool
) -> None:
    for name in [name for name in os.environ if name.startswith("KVCHAT_")]:
        monkeypatch.delenv(name)
    calls: list[dict[str, Any]] = []
    runtime = Runtime(serve=lambda model, **kwargs: calls.append(kwargs))
    result = CliRunner().invoke(cli_app, ["serve", *args], obj=runtime, env=env)
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert (call["settings"].model_aliases, call["settings"].any_model) == (aliases, any_model)


# -- the reply's blocks and stream events ------------------------------------------------------------


def built(deltas: list[ChatDelta], stops: tuple[str, ...] = (), max_calls: int | None = None) -> tuple[list, list]:
    builder = MessageBuilder("msg_1", "m", StopScanner(stops), max_calls)
    events = [event for delta in deltas for event in builder.add(delta)]
    return builder.blocks, events


def shape(events: list[dict[str, Any]]) -> list[tuple]:
    """Each event as (type, index, what it carries)."""
    out: list[tuple] = []
    for event in events:
        if event["type"] == "content_block_start":
            out.append(("start", event["index"], event["content_block"]["type"]))
        elif event["type"] == "content_block_delta":
            delta = event["delta"]
            out.append(("delta", event["index"], delta.get("text", delta.get("partial_json"))))
        else:
            out.append(("stop", event["index"]))
    return out


DONE = ChatDelta(
    usage=Usage(
        prompt_tokens=9,
        cached_tokens=0,
        evaluated_tokens=9,
        completion_tokens=5,
        time_to_first_token=0.1,
        finish_reason="stop",
    ),
    finish_reason="stop",
)


def test_text_then_calls_make_blocks_in_order() -> None:
    calls = (ToolCall("call_1", "get_weather", {"city": "Paris"}), ToolCall("call_2", "get_weather", {"city": "Oslo"}))
    blocks, events = built([ChatDelta("Let me "), ChatDelta("look."), ChatDelta(tool_calls=calls), DONE])
    assert blocks[0] == {"type": "text", "text": "Let me look."}
    assert [(b["type"], b["name"], b["input"]) for b in blocks[1:]] == [
        ("tool_use", "get_weather", {"city": "Paris"}),
        ("tool_use", "get_weather", {"city": "Oslo"}),
    ]
    assert all(block["id"].startswith("toolu_") for block in blocks[1:]) and blocks[1]["id"] != blocks[2]["id"]
    assert shape(events) == [
        ("start", 0, "text"),
        ("delta", 0, "Let me "),
        ("delta", 0, "look."),
        ("stop", 0),
        ("start", 1, "tool_use"),
        ("delta", 1, '{"city": "Paris"}'),
        ("stop", 1),
        ("start", 2, "tool_use"),
        ("delta", 2, '{"city": "Oslo"}'),
        ("stop", 2),
    ]
    assert events[4]["content_block"]["input"] == {} and events[4]["content_block"]["id"] == blocks[1]["id"]


def test_disable_parallel_tool_use_keeps_the_first_call() -> None:
    calls = (ToolCall("call_1", "f", {}), ToolCall("call_2", "g", {}))
    blocks, _ = built([ChatDelta(tool_calls=calls), DONE], max_calls=1)
    assert [block["name"] for block in blocks] == ["f"]


def test_a_stop_sequence_cuts_the_text_and_drops_what_follows() -> None:
    builder = MessageBuilder("msg_1", "m", StopScanner(("END",)), None)
    events = builder.add(ChatDelta("one E")) + builder.add(ChatDelta("ND two"))
    assert builder.stopped and builder.add(ChatDelta(tool_calls=(ToolCall("c", "f", {}),))) == []
    assert shape(events) == [("start", 0, "text"), ("delta", 0, "one "), ("stop", 0)]
    message = builder.message("cancelled", anthropic_usage(DONE.usage))
    assert (message["stop_reason"], message["stop_sequence"], message["content"]) == (
        "stop_sequence",
        "END",
        [{"type": "text", "text": "one "}],
    )
    assert message["model"] == "m" and message["id"] == "msg_1" and message["type"] == "message"


def test_held_text_comes_out_before_a_call_and_at_the_end() -> None:
    call = ToolCall("call_1", "f", {"a": 1})
    blocks, events = built([ChatDelta("x E"), ChatDelta(tool_calls=(call,)), ChatDelta("EN"), DONE], stops=("END",))
    assert [block.get("text") for block in blocks] == ["x E", None, "EN"]
    assert shape(events)[:3] == [("start", 0, "text"), ("delta", 0, "x "), ("delta", 0, "E")]
    assert shape(events)[-3:] == [("start", 2, "text"), ("delta", 2, "EN"), ("stop", 2)]


def test_an_empty_reply_has_no_blocks() -> None:
    blocks, events = built([DONE])
    assert blocks == [] and events == []


def test_the_ping_event_is_anthropics() -> None:
    assert ping_event().encode() == b'event: ping\r\ndata: {"type": "ping"}\r\n\r\n'
