"""Anthropic's Messages API (``/v1/messages``) with the official ``anthropic`` client,
unchanged, against a real uvicorn over Qwen2.5-Coder 0.5B (prefix cache on): plain
and streamed messages, a conversation whose second turn reads the first from the
cache, a forced tool call and its result, stop sequences, max_tokens, keys given as
``x-api-key`` or bearer, refusals and errors in Anthropic's shape, count_tokens
against a real call's usage, concurrent clients, and Claude Code's default request
(no temperature, max_tokens 32000). One server for the module; every generation
is short."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from helpers import assert_idle
from http_server import RunningServer

from kvchat import Engine
from kvchat.chat import ChatRuntime
from kvchat.server import ServerSettings, create_app
from kvchat.server.messages_api import CountTokensRequest, chat_request

MODEL = "qwen-messages"
ALIAS = "claude-sonnet-4-5"
KEY = "sk-ant-local"
GREEDY = {"temperature": 0}  # sent as extra fields: this client version no longer has sampling parameters
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
SYSTEM = (
    "You are a helpful assistant for a travel agency. You answer questions about cities, their weather, "
    "their museums and their food. Keep every answer short: one sentence at most, unless asked otherwise. "
) * 2


@pytest.fixture(scope="module")
def server(qwen_engine: Engine) -> Iterator[RunningServer]:
    # No max_tokens_limit: a large max_tokens is clamped to the room the prompt leaves in the context.
    settings = ServerSettings(model_name=MODEL, model_aliases=(ALIAS,), api_keys=(KEY,), max_tokens_limit=None)
    with RunningServer(create_app(qwen_engine, settings)) as running:
        yield running


@pytest.fixture
def client(server: RunningServer, qwen_engine: Engine) -> Iterator[anthropic.Anthropic]:
    yield anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
    assert_idle(qwen_engine)


def total_input(usage: Any) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_a_plain_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=ALIAS,
        max_tokens=6,
        messages=[{"role": "user", "content": "What is the capital of France? Answer with one word."}],
        extra_body=GREEDY,
    )
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == ALIAS  # the id the request named
    assert [block.type for block in message.content] == ["text"] and "paris" in text_of(message).lower()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens > 10 and 0 < usage.output_tokens <= 6
    assert usage.cache_creation_input_tokens == 0


def test_a_streamed_message_assembles_its_deltas(client: anthropic.Anthropic) -> None:
    kinds: list[str] = []
    pieces: list[str] = []
    with client.messages.stream(
        model=MODEL,
        max_tokens=8,
        system="Answer briefly.",
        messages=[{"role": "user", "content": "Name a large river."}],
        extra_body=GREEDY,
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                pieces.append(event.delta.text)
        final = stream.get_final_message()
    raw = [kind for kind in kinds if kind not in ("text",)]
    assert raw[:2] == ["message_start", "content_block_start"] and raw[-3:] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert set(raw[2:-3]) == {"content_block_delta"} and pieces
    assert text_of(final) == "".join(pieces) and final.model == MODEL
    assert final.stop_reason in ("end_turn", "max_tokens") and 0 < final.usage.output_tokens <= 8
    assert total_input(final.usage) > 10


def test_the_second_turn_reads_the_first_from_the_cache(client: anthropic.Anthropic) -> None:
    asked = {"role": "user", "content": "Which city is the capital of Italy? One word."}
    first = client.messages.create(model=MODEL, max_tokens=4, system=SYSTEM, messages=[asked], extra_body=GREEDY)
    history = [
        asked,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": "And of Spain? One word."},
    ]
    second = client.messages.create(model=MODEL, max_tokens=4, system=SYSTEM, messages=history, extra_body=GREEDY)
    assert "madrid" in text_of(second).lower()
    assert second.usage.cache_read_input_tokens >= total_input(first.usage)  # the first prompt, at least
    new = total_input(second.usage) - total_input(first.usage)
    assert 0 < second.usage.input_tokens <= new < total_input(first.usage) // 4


def test_a_forced_tool_call_streamed_and_its_result(client: anthropic.Anthropic) -> None:
    asked = {"role": "user", "content": "What is the weather in Paris?"}
    partial: list[str] = []
    with client.messages.stream(
        model=MODEL,
        max_tokens=48,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[asked],
        extra_body=GREEDY,
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial.append(event.delta.partial_json)
        called = stream.get_final_message()
    assert called.stop_reason == "tool_use"
    (use,) = [block for block in called.content if block.type == "tool_use"]
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    assert use.input == json.loads("".join(partial)) and "paris" in use.input["city"].lower()
    result = {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "Sunny, 24 C"}]}
    answer = client.messages.create(
        model=MODEL,
        max_tokens=12,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=[asked, {"role": "assistant", "content": called.content}, {"role": "user", "content": [result]}],
        extra_body=GREEDY,
    )
    assert answer.stop_reason in ("end_turn", "max_tokens") and [b.type for b in answer.content] == ["text"]
    assert "24" in text_of(answer) or "sunny" in text_of(answer).lower()
    assert answer.usage.cache_read_input_tokens >= total_input(called.usage)  # it continues the call's prompt


def test_a_stop_sequence_ends_the_reply(client: anthropic.Anthropic) -> None:
    asked = [{"role": "user", "content": "Count from 1 to 10, separated by commas and spaces. Numbers only."}]
    message = client.messages.create(
        model=MODEL, max_tokens=12, messages=asked, stop_sequences=["3"], extra_body=GREEDY
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "3"
    assert "2" in text_of(message) and "3" not in text_of(message)
    # Of two sequences, the first to end in the text: "2, " ends before "3" does.
    with client.messages.stream(
        model=MODEL, max_tokens=12, messages=asked, stop_sequences=["3", "2, "], extra_body=GREEDY
    ) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", "2, ")
    assert "1" in text_of(streamed) and "2" not in text_of(streamed)


def test_max_tokens_ends_the_reply(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL,
        max_tokens=3,
        messages=[{"role": "user", "content": "Write a long poem about rivers."}],
        extra_body=GREEDY,
    )
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_keys_by_x_api_key_or_bearer_and_401_in_anthropics_shape(
    server: RunningServer, client: anthropic.Anthropic
) -> None:
    asked = [{"role": "user", "content": "Hi"}]
    bearer = anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model=MODEL, max_tokens=2, messages=asked).content
    wrong = anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        wrong.messages.create(model=MODEL, max_tokens=2, messages=asked)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid or missing API key"},
    }
    bare = httpx.post(f"{server.url}/v1/messages?beta=true", json={"model": MODEL, "max_tokens": 2, "messages": asked})
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                            },
                        ],
                    }
                ]
            },
            anthropic.BadRequestError,
            "messages[0].content[1]: image blocks are not supported",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
            anthropic.BadRequestError,
            "tools[0]: server tools",
        ),
        ({"model": "claude-opus-4-1"}, anthropic.NotFoundError, "model: the model 'claude-opus-4-1' does not exist"),
    ],
)
def test_refusals_are_raised_by_the_client(
    client: anthropic.Anthropic, fields: dict, error: type, message: str
) -> None:
    request = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], **fields}
    with pytest.raises(error) as info:
        client.messages.create(**request)
    assert info.value.body["type"] == "error" and info.value.body["error"]["message"].startswith(message)


def test_count_tokens_is_the_input_of_a_real_call(client: anthropic.Anthropic) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "system": [{"type": "text", "text": "You check the weather.", "cache_control": {"type": "ephemeral"}}],
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": "Is it raining in Oslo? Answer yes or no."}],
    }
    counted = client.messages.count_tokens(**request)
    real = client.messages.create(max_tokens=1, extra_body=GREEDY, **request)
    assert counted.input_tokens == total_input(real.usage) > 50
    # tool_choice "none" hides the tools (there is no tool result to answer): fewer tokens
    hidden = client.messages.count_tokens(**request, tool_choice={"type": "none"})
    assert 0 < hidden.input_tokens < counted.input_tokens


def test_eight_concurrent_requests_from_one_key(server: RunningServer, qwen_engine: Engine) -> None:
    async def ask_all() -> list[Any]:
        async with anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.messages.create(
                        model=MODEL,
                        max_tokens=4,
                        extra_body=GREEDY,
                        messages=[{"role": "user", "content": f"Say the number {n} in words."}],
                    )
                    for n in range(8)
                )
            )

    replies = asyncio.run(ask_all())
    assert len(replies) == 8 and all(text_of(reply) and reply.usage.output_tokens > 0 for reply in replies)
    assert len({reply.id for reply in replies}) == 8
    assert_idle(qwen_engine)


def test_claude_codes_default_request_is_clamped_and_answered(client: anthropic.Anthropic) -> None:
    # No temperature, max_tokens 32000 (more than the whole context), streamed: Claude Code's request.
    with client.messages.stream(
        model=ALIAS,
        max_tokens=32000,
        system=[{"type": "text", "text": "Reply with one short word.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}],
        metadata={"user_id": "user_local"},
        extra_body={"thinking": {"type": "disabled"}},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and text_of(final).strip()
    assert final.usage.output_tokens < 200


CAPTURED = Path(__file__).parent / "data" / "claude_request.json"


def test_claude_codes_captured_request_counts_overflows_and_its_follow_up_extends_it(
    client: anthropic.Anthropic, qwen_engine: Engine
) -> None:
    captured = json.loads(CAPTURED.read_text())
    prompt = {key: captured[key] for key in ("system", "messages", "tools")}
    counted = client.messages.count_tokens(model=MODEL, **prompt).input_tokens
    assert 8_000 < counted < 16_000  # tests/data/README.md: about 11,700 with Qwen's tokenizer and template
    # More than this server's context (8192): refused before any work, in the words Claude Code compacts on.
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=ALIAS, max_tokens=captured["max_tokens"], **prompt)
    assert info.value.body["error"]["message"] == f"prompt is too long: {counted} tokens > 8191 maximum"
    # Claude Code's next request: the system message as a string, the call and its result after it.
    environment = captured["messages"][1]["content"][0]["text"]
    call = {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "cat notes.txt"}}
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": "kumquat",
        "is_error": False,
        "cache_control": {"type": "ephemeral"},
    }
    follow_up = [
        captured["messages"][0],
        {"role": "system", "content": environment},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [result]},
    ]
    tokenizer = ChatRuntime.shared(qwen_engine).tokenizer
    first = chat_request(CountTokensRequest.model_validate({"model": MODEL, **prompt}))
    later = chat_request(CountTokensRequest.model_validate({"model": MODEL, **prompt, "messages": follow_up}))
    first_tokens = tokenizer.encode(first.messages, tools=first.tools)
    later_tokens = tokenizer.encode(later.messages, tools=later.tools)
    assert len(first_tokens) == counted and later_tokens[: len(first_tokens)] == first_tokens
