"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
from helpers import assert_idle, wait_idle
from http_server import RunningServer
from openai import OpenAI

from kvchat import Engine, EngineSettings
from kvchat.chat import ChatRuntime, chat_tokenizer
from kvchat.server import create_app

MODEL = "qwen-test"


@pytest.fixture(scope="module")
def server(qwen_engine: Engine) -> Iterator[RunningServer]:
    with RunningServer(create_app(qwen_engine, model_name=MODEL)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> OpenAI:
    return server.client()


def assert_serves(client: OpenAI) -> None:
    """The server still answers a normal request."""
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0)
    assert reply.choices[0].message.content


def test_non_streaming_chat(client: OpenAI, qwen_engine: Engine) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": [{"type": "text", "text": "What is 2+2? Answer with a number."}]}],
        max_tokens=16, temperature=0, seed=1, stop=["\n\n"], user="u1", logit_bias={"0": 0},
        presence_penalty=0.1, frequency_penalty=0.1, top_p=0.9,
        extra_body={"unknown_field": 1, "logprobs": False},
    )
    choice = reply.choices[0]
    assert choice.message.content
    # The prompt is the chat template's rendering of the messages, the content parts joined as text.
    plain = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": "What is 2+2? Answer with a number."}]
    assert reply.usage.prompt_tokens == len(chat_tokenizer(qwen_engine).encode(plain))
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == MODEL and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0


def test_max_tokens_ends_with_length(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 100, comma-separated."}],
        max_completion_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_streaming_chat_with_usage(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0, stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_conversation_reuses_cached_history(client: OpenAI) -> None:
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    previous_prompt = 0
    questions = ["Name a fruit.", "Name a colour.", "Name an animal.", "Name a city.", "Name a river.",
                 "Name a planet."]
    for turn, question in enumerate(questions):  # six turns, the whole history each time
        messages.append({"role": "user", "content": question})
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        usage = reply.usage
        if turn > 0:
            # Everything sent before (prompt and reply) is still in the KV cache.
            assert usage.prompt_tokens_details.cached_tokens >= previous_prompt
        previous_prompt = usage.prompt_tokens
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_required_tool_call(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL], tool_choice="required", max_tokens=64, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str)

    # The tool's result goes back in the next request.
    follow = client.chat.completions.create(
        model=MODEL, max_tokens=24, temperature=0, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "What is the weather in Paris?"},
                  choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}])
    assert follow.choices[0].message.content


def test_streamed_tool_call(client: OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}], stream=True,
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64, temperature=0))
    calls = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert "city" in json.loads(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_response(client: OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person; give name and age as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        max_tokens=64, temperature=0)
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_n_above_one_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    assert info.value.body["param"] == "n"
    assert_serves(client)


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"
    assert_serves(client)


def test_invalid_request_from_kvchat_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       logit_bias={"not-a-token": 1})
    assert info.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=[WEATHER_TOOL], tool_choice={"type": "function",
                                                                          "function": {"name": "nope"}})
    assert_serves(client)


def test_context_overflow_is_400(qwen_model, client: OpenAI) -> None:
    with Engine(qwen_model, EngineSettings(n_ctx=256, max_running=2, n_seq_max=4)) as small:
        with RunningServer(create_app(small, model_name=MODEL)) as running:
            small_client = running.client()
            with pytest.raises(openai.BadRequestError) as info:
                small_client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "word " * 400}], max_tokens=8)
            assert info.value.body["code"] == "context_length_exceeded"
            assert info.value.body["type"] == "invalid_request_error"
            assert_serves(small_client)


def test_malformed_json_is_openai_shaped(server: RunningServer, client: OpenAI) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text

    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": "nope"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert_serves(client)


def test_models_and_health(server: RunningServer, client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


# Qwen2.5's end tokens (<|endoftext|>, <|im_end|>) banned: generation runs to max_tokens.
NO_END = {"151643": -100, "151645": -100}


def test_disconnect_mid_stream_cancels(server: RunningServer, qwen_engine: Engine, client: OpenAI) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
            "stream": True, "max_tokens": 4000, "temperature": 0, "logit_bias": NO_END}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = 0
        for line in lines:
            if line.startswith("data:"):
                received += 1
                if received >= 5:
                    break
    started = time.monotonic()
    stats = wait_idle(qwen_engine, timeout=30)
    assert stats.active == 0 and stats.queued == 0
    assert_idle(qwen_engine)  # its sequence is free or parked again, nothing locked
    # Far sooner than 4000 tokens would take: the request was cancelled.
    assert time.monotonic() - started < 5
    assert_serves(client)


def test_api_keys(qwen_engine: Engine) -> None:
    with RunningServer(create_app(qwen_engine, model_name=MODEL, api_keys=["secret"])) as running:
        with pytest.raises(openai.AuthenticationError) as info:
            running.client("wrong").chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert info.value.status_code == 401
        assert httpx.get(f"{running.url}/v1/models").status_code == 401
        assert httpx.get(f"{running.url}/health").status_code == 200
        assert_serves(running.client("secret"))


class BrokenChatRuntime(ChatRuntime):
    """A chat runtime that fails as a bug would, with internals in its message."""

    def complete(self, *args, **kwargs):
        raise RuntimeError("secret internals")


def test_unexpected_error_is_generic_500(qwen_engine: Engine, client: OpenAI) -> None:
    app = create_app(qwen_engine, model_name=MODEL, chat_runtime=BrokenChatRuntime(qwen_engine))
    with RunningServer(app) as broken:
        response = httpx.post(f"{broken.url}/v1/chat/completions",
                              json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert "secret internals" not in response.text and "Traceback" not in response.text
        assert httpx.get(f"{broken.url}/v1/models").status_code == 200  # the app serves on
    assert_idle(qwen_engine)
    assert_serves(client)


def test_long_generation_would_outlast_the_cancel_check(client: OpenAI) -> None:
    """Guards test_disconnect_mid_stream_cancels: the prompt really generates on and on."""
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 1000."}], max_tokens=24, temperature=0,
        logit_bias=NO_END)
    assert reply.choices[0].finish_reason == "length"


def test_semantic_kernels_openai_connector_chats_through_the_server(server: RunningServer) -> None:
    """The multi-process path: Semantic Kernel's own OpenAI connector, unchanged, against kvchat."""
    import asyncio

    from openai import AsyncOpenAI
    from semantic_kernel.connectors.ai.open_ai import OpenAIChatCompletion, OpenAIChatPromptExecutionSettings
    from semantic_kernel.contents import ChatHistory

    async def chat() -> list:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused")
        service = OpenAIChatCompletion(ai_model_id=MODEL, async_client=client)
        settings = OpenAIChatPromptExecutionSettings(max_tokens=16, temperature=0.0)
        history = ChatHistory(system_message="Answer with one short sentence.")
        replies = []
        for question in ("Name a planet.", "Name a moon of that planet."):
            history.add_user_message(question)
            reply = await service.get_chat_message_content(history, settings)
            history.add_message(reply)
            replies.append(reply)
        await client.close()
        return replies

    first, second = asyncio.run(chat())
    assert first.content and second.content
    # The second call re-sent the whole history; the server reused all of the first call's prompt.
    first_usage, second_usage = first.inner_content.usage, second.inner_content.usage
    assert second_usage.prompt_tokens_details.cached_tokens >= first_usage.prompt_tokens
