"""The Agent Framework chat client on the real Qwen model: replies, streaming, tools through
the framework's function-invocation layer, structured output, options, an Agent session
whose cached tokens grow turn over turn, cancellation and bad input."""

from __future__ import annotations

import asyncio
import gc
from typing import Annotated, Any

import pytest

pytest.importorskip("agent_framework")

import itertools

from agent_framework import ChatContext, Content, Message, chat_middleware, tool
from helpers import assert_idle
from pydantic import BaseModel, Field

from kvchat import Engine, EngineSettings, InvalidRequestError
from kvchat.integrations.agent_framework import KVChatClient
from kvchat.llama import Model


@pytest.fixture(scope="module")
def engine(qwen_model: Model) -> Engine:
    with Engine(qwen_model, EngineSettings(n_ctx=8192, max_running=4, n_seq_max=8)) as engine:
        yield engine


@pytest.fixture
def client(engine: Engine) -> KVChatClient:
    """A client on the module's engine (one round of tool calls, then the answer), left idle."""
    yield KVChatClient(engine, function_invocation_configuration={"max_iterations": 1})
    assert_idle(engine)


@pytest.fixture
def prompts(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The text of every prompt submitted to the engine, in order."""
    submitted: list[str] = []
    submit = engine.submit

    def spy(prompt_tokens, *args, **kwargs):
        submitted.append(engine.model.detokenize(list(prompt_tokens), special=True))
        return submit(prompt_tokens, *args, **kwargs)

    monkeypatch.setattr(engine, "submit", spy)
    return submitted


class Calculator:
    """Python tools that record their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

        @tool(name="add", description="Add two integers and return their sum.")
        def add(a: Annotated[int, Field(description="first addend")],
                b: Annotated[int, Field(description="second addend")]) -> int:
            self.calls.append(("add", a, b))
            return a + b

        @tool(name="multiply", description="Multiply two integers and return their product.")
        def multiply(a: Annotated[int, Field(description="first factor")],
                     b: Annotated[int, Field(description="second factor")]) -> int:
            self.calls.append(("multiply", a, b))
            return a * b

        self.add = add
        self.multiply = multiply


def greedy(max_tokens: int = 24, **options: Any) -> dict[str, Any]:
    return {"temperature": 0.0, "max_tokens": max_tokens, **options}


def ask(text: str) -> list[Message]:
    return [Message("user", [text])]


def contents_of(response: Any, kind: str) -> list[Content]:
    return [c for m in response.messages for c in m.contents if c.type == kind]


def test_reply_without_streaming(client: KVChatClient) -> None:
    messages = ask("What is the capital of France? Answer with one word.")
    response = asyncio.run(client.get_response(messages, options=greedy(8)))
    assert "Paris" in response.text
    assert [m.role for m in response.messages] == ["assistant"]
    assert response.model == client.model and response.response_id
    assert response.finish_reason in ("stop", "length")
    usage = response.usage_details
    assert usage["input_token_count"] > 10 and 0 < usage["output_token_count"] <= 8
    assert usage["total_token_count"] == usage["input_token_count"] + usage["output_token_count"]
    assert usage["cache_read_input_token_count"] + usage["prompt/evaluated_tokens"] == usage["input_token_count"]


def test_streaming_updates_concatenate_to_the_non_streaming_reply(client: KVChatClient) -> None:
    messages = ask("Count from one to ten in words, separated by commas.")

    async def run() -> tuple[Any, list[Any], Any]:
        # Separate cache keys: both prompts are evaluated cold, in the same batch split.
        whole = await client.get_response(messages, options=greedy(32, cache_key="whole"))
        stream = client.get_response(messages, stream=True, options=greedy(32, cache_key="streamed"))
        updates = [update async for update in stream]
        return whole, updates, await stream.get_final_response()

    whole, updates, final = asyncio.run(run())
    texts = [update.text for update in updates if update.text]
    assert len(texts) > 3
    assert "".join(texts) == whole.text == final.text
    assert "three" in whole.text.lower()
    assert final.usage_details["output_token_count"] == whole.usage_details["output_token_count"]
    assert final.finish_reason == whole.finish_reason


def test_auto_tool_is_called_and_its_result_answers(client: KVChatClient, prompts: list[str]) -> None:
    calc = Calculator()
    messages = [Message("system", ["You are a calculator. Use the tools to compute."]),
                Message("user", ["What is 1234 plus 4321?"])]
    response = asyncio.run(client.get_response(
        messages, options=greedy(64, tools=[calc.add, calc.multiply], tool_choice="auto")))
    assert calc.calls == [("add", 1234, 4321)]
    (call,) = contents_of(response, "function_call")
    (result,) = contents_of(response, "function_result")
    assert call.name == "add" and call.call_id and result.call_id == call.call_id and result.result == "5555"
    # Two model calls: the first asked for the tool; the second was sent its result and answered.
    assert len(prompts) == 2 and "5555" not in prompts[0] and "5555" in prompts[1]
    assert "5555" in response.text.replace(",", "")


def test_required_tool_choice_forces_a_call(client: KVChatClient) -> None:
    calc = Calculator()
    messages = ask("Compute 17 plus 25.")
    response = asyncio.run(client.get_response(
        messages, options=greedy(64, tools=[calc.add], tool_choice="required")))
    assert calc.calls == [("add", 17, 25)]
    assert [c.result for c in contents_of(response, "function_result")] == ["42"]


def test_required_named_function_is_the_one_called(client: KVChatClient) -> None:
    calc = Calculator()
    messages = ask("What is 6 plus 7?")  # an addition, but the caller forces multiply
    choice = {"mode": "required", "required_function_name": "multiply"}
    asyncio.run(client.get_response(
        messages, options=greedy(64, tools=[calc.add, calc.multiply], tool_choice=choice)))
    assert [name for name, *_ in calc.calls] == ["multiply"]


def test_none_tool_choice_makes_no_call(client: KVChatClient, prompts: list[str]) -> None:
    calc = Calculator()
    messages = [Message("system", ["You are a calculator. Use the tools to compute."]),
                Message("user", ["What is 1234 plus 4321?"])]
    response = asyncio.run(client.get_response(
        messages, options=greedy(32, tools=[calc.add], tool_choice="none")))
    assert calc.calls == [] and contents_of(response, "function_call") == []
    assert response.text and response.finish_reason != "tool_calls"
    assert len(prompts) == 1 and '"add"' not in prompts[0]  # the tools are not shown to the model


class Capital(BaseModel):
    city: str
    country: str


def test_structured_output_with_a_pydantic_type(client: KVChatClient) -> None:
    messages = ask("What is the capital of France? Reply in JSON.")
    response = asyncio.run(client.get_response(messages, options=greedy(48, response_format=Capital)))
    assert isinstance(response.value, Capital)
    assert response.value.city == "Paris"


def test_structured_output_with_a_json_schema_dict_streamed(client: KVChatClient) -> None:
    schema = {"title": "sum", "type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    messages = ask("What is 2 plus 3? Reply in JSON.")

    async def run() -> Any:
        stream = client.get_response(messages, stream=True, options=greedy(32, response_format=schema))
        async for _ in stream:
            pass
        return await stream.get_final_response()

    response = asyncio.run(run())
    assert set(response.value) == {"answer"} and isinstance(response.value["answer"], int)


def test_stop_and_max_tokens_are_honoured(client: KVChatClient) -> None:
    count = ask("Count from 1 to 10, separated by commas.")

    async def run() -> list[Any]:
        return [await client.get_response(count, options=options)
                for options in (greedy(40), greedy(40, stop=["5"]), greedy(3))]

    free, stopped, short = asyncio.run(run())
    assert "4" in free.text and "5" in free.text
    assert "4" in stopped.text and "5" not in stopped.text and stopped.finish_reason == "stop"
    assert short.usage_details["output_token_count"] == 3 and short.finish_reason == "length"


def test_seed_makes_sampling_reproducible(qwen_model: Model) -> None:
    # A cold engine: each request is evaluated afresh in the same KV cells, so a sample
    # depends on the seed alone (not on where the cache put an earlier request).
    settings = EngineSettings(n_ctx=1024, max_running=1, n_seq_max=2, prefix_cache=False, speculation="off")
    with Engine(qwen_model, settings) as cold:
        client = KVChatClient(cold)

        async def run() -> list[str]:
            options = {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0, "top_k": 0, "max_tokens": 12}
            return [(await client.get_response(ask("Write one sentence about a cat."),
                                               options={**options, "seed": seed})).text
                    for seed in (7, 7, 8)]

        first, again, other = asyncio.run(run())
        assert first == again != other
        assert_idle(cold)


def test_agent_session_of_ten_turns_reuses_the_cache(client: KVChatClient) -> None:
    agent = client.as_agent(instructions="You are a helpful assistant. Answer in one short sentence.",
                            default_options=greedy(24))

    async def run() -> list[dict[str, int]]:
        session = agent.create_session()
        usages = []
        for turn in range(10):
            response = await agent.run(f"Name one animal whose name starts with the letter {'BCDFGHKLMP'[turn]}.",
                                       session=session)
            assert response.text
            usages.append(dict(response.usage_details))
        return usages

    usages = asyncio.run(run())
    cached = [usage["cache_read_input_token_count"] for usage in usages]
    assert all(a < b for a, b in itertools.pairwise(cached)), cached
    for previous, usage in itertools.pairwise(usages):
        assert usage["cache_read_input_token_count"] >= previous["input_token_count"]  # the whole previous prompt
        assert usage["prompt/evaluated_tokens"] < 40, usage  # little more than the new question


def test_agent_calls_its_tool_and_the_next_turn_reuses_the_cache(client: KVChatClient) -> None:
    calc = Calculator()
    calls: list[dict[str, int]] = []  # the usage of every model call, in order

    @chat_middleware
    async def record_usage(context: ChatContext, call_next: Any) -> None:
        await call_next()
        calls.append(dict(context.result.usage_details))

    agent = client.as_agent(instructions="You are a calculator. Use the tools to compute.", tools=[calc.add],
                            default_options=greedy(64), middleware=[record_usage])

    async def run() -> None:
        session = agent.create_session()
        response = await agent.run("What is 1234 plus 4321?", session=session)
        assert calc.calls == [("add", 1234, 4321)]
        assert [c.result for c in contents_of(response, "function_result")] == ["5555"]
        assert len(calls) == 2  # the call asking for the tool, then the answer
        await agent.run("Thanks. Now say goodbye.", session=session)

    asyncio.run(run())
    asked, follow_up = calls[0], calls[2]
    # The follow-up's prompt starts with the first call's (the same tools, history and call): all reused.
    # (The call itself is rendered by the template, which may write it otherwise than the model did.)
    assert follow_up["cache_read_input_token_count"] >= asked["input_token_count"]


def test_streamed_agent_run_calls_its_tool(client: KVChatClient) -> None:
    calc = Calculator()
    agent = client.as_agent(instructions="You are a calculator. Use the tools to compute.", tools=[calc.add],
                            default_options=greedy(64))

    async def run() -> tuple[list[str], Any]:
        stream = agent.run("What is 1234 plus 4321?", session=agent.create_session(), stream=True)
        kinds = [content.type async for update in stream for content in update.contents]
        return kinds, await stream.get_final_response()

    kinds, final = asyncio.run(run())
    assert calc.calls == [("add", 1234, 4321)]
    assert kinds.index("function_call") < kinds.index("function_result") < kinds.index("text")
    assert [c.result for c in contents_of(final, "function_result")] == ["5555"]
    assert final.usage_details["output_token_count"] > 0


LONG = ask("Write a long story about a dragon.")


async def active_after(engine: Engine, timeout: float = 5.0) -> int:
    """Requests still running once they have had `timeout` seconds to end, measured inside the
    event loop (leaving `asyncio.run` would close every open generator, and so cancel anyway)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while engine.stats().active and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return engine.stats().active


def endless(engine: Engine, **options: Any) -> dict[str, Any]:
    """Options for a reply that cannot end early (end-of-generation tokens banned): 4000 tokens,
    far more than the engine generates in the seconds a cancelled request is given to end."""
    banned = {token: -100.0 for token in range(engine.model.n_vocab) if engine.model.is_end_of_generation(token)}
    return greedy(4000, logit_bias=banned, **options)


def test_closing_a_stream_early_cancels_the_request(client: KVChatClient, engine: Engine) -> None:
    async def run() -> None:
        stream = client.get_response(LONG, stream=True, options=endless(engine))
        async for update in stream:
            if update.text:
                break
        assert engine.stats().active == 1
        await stream.close()
        assert await active_after(engine) == 0

    asyncio.run(run())


def test_cancelling_the_task_cancels_the_request(client: KVChatClient, engine: Engine) -> None:
    async def run() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for update in client.get_response(LONG, stream=True, options=endless(engine)):
                if update.text:
                    started.set()

        streaming = asyncio.create_task(consume())
        whole = asyncio.create_task(client.get_response(LONG, options=endless(engine, cache_key="whole")))
        await started.wait()
        while engine.stats().active < 2:
            await asyncio.sleep(0.01)
        streaming.cancel()
        whole.cancel()
        for task in (streaming, whole):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await active_after(engine) == 0

    asyncio.run(run())


def test_an_abandoned_stream_is_cancelled_when_collected(client: KVChatClient, engine: Engine) -> None:
    async def run() -> None:
        stream = client.get_response(LONG, stream=True, options=endless(engine))
        async for update in stream:
            if update.text:
                break
        assert engine.stats().active == 1
        del stream, update
        gc.collect()  # the event loop then closes the abandoned generators
        assert await active_after(engine) == 0

    asyncio.run(run())


def test_calls_run_concurrently_and_batched(client: KVChatClient, engine: Engine) -> None:
    most_active = 0

    async def watch(done: asyncio.Event) -> None:
        nonlocal most_active
        while not done.is_set():
            most_active = max(most_active, engine.stats().active)
            await asyncio.sleep(0.002)

    async def run() -> list[Any]:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        replies = await asyncio.gather(*(
            client.get_response(ask(f"Name a color that starts with the letter {letter}."), options=greedy(16))
            for letter in "BRGY"))
        done.set()
        await watcher
        return replies

    replies = asyncio.run(run())
    assert all(reply.text for reply in replies)
    assert most_active >= 2  # the event loop kept running while the engine generated


def test_unsupported_content_is_a_typed_error_and_queues_nothing(client: KVChatClient, prompts: list[str]) -> None:
    image = Message("user", ["What is in this picture?", Content.from_uri("https://example.com/a.png",
                                                                         media_type="image/png")])
    with pytest.raises(InvalidRequestError) as error:
        asyncio.run(client.get_response([image], options=greedy(8)))
    assert error.value.field == "messages" and "'uri'" in str(error.value)

    async def stream() -> None:
        async for _ in client.get_response([image], stream=True, options=greedy(8)):
            pass

    with pytest.raises(InvalidRequestError):
        asyncio.run(stream())
    assert prompts == []


@pytest.mark.parametrize(("options", "field"), [
    ({"temprature": 0.5}, "temprature"),  # a typo is an error, not a silently ignored option
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": 5}, "stop"),
    ({"tool_choice": "always"}, "tool_choice"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"model": "gpt-4o"}, "model"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
])
def test_invalid_options_are_typed_errors(client: KVChatClient, prompts: list[str], options: dict[str, Any],
                                          field: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        asyncio.run(client.get_response(ask("Hello."), options=options))
    assert error.value.field == field
    assert prompts == []


@pytest.mark.parametrize("bias", [
    lambda n_vocab: {"abc": 5},  # not a number
    lambda n_vocab: {"1.5": 5},
    lambda n_vocab: {"": 5},
    lambda n_vocab: {"²": 5},  # a digit to str.isdigit, not to int()
    lambda n_vocab: {"-3": 5},  # negative ids
    lambda n_vocab: {-3: 5},
    lambda n_vocab: {True: 5},
    lambda n_vocab: {str(n_vocab): 5},  # ids past the vocabulary
    lambda n_vocab: {n_vocab: 5},
    lambda n_vocab: {"9" * 5000: 5},  # more digits than int() reads
    lambda n_vocab: {"1": float("nan")},  # non-finite biases
    lambda n_vocab: {"1": float("inf")},
    lambda n_vocab: {1: float("-inf")},
    lambda n_vocab: {"1": 10**400},  # an int too large for a float
    lambda n_vocab: {"1": "5"},
    lambda n_vocab: [("1", 5)],  # not a mapping
], ids=["abc", "decimal", "empty", "superscript", "negative-text", "negative", "bool", "vocab-size-text",
        "vocab-size", "5000-digits", "nan", "inf", "minus-inf", "huge-int", "text-value", "list"])
def test_bad_logit_bias_is_a_typed_error_and_queues_nothing(
    client: KVChatClient, engine: Engine, prompts: list[str], bias: Any
) -> None:
    options = greedy(4, logit_bias=bias(engine.model.n_vocab))
    with pytest.raises(InvalidRequestError) as error:
        asyncio.run(client.get_response(ask("Hello."), options=options))
    assert error.value.field == "logit_bias"

    async def stream() -> None:
        async for _ in client.get_response(ask("Hello."), stream=True, options=options):
            pass

    with pytest.raises(InvalidRequestError) as error:
        asyncio.run(stream())
    assert error.value.field == "logit_bias"
    assert prompts == []


def test_logit_bias_takes_token_ids_as_text_or_integers(client: KVChatClient, engine: Engine) -> None:
    [a] = engine.model.tokenize("a")
    last = engine.model.n_vocab - 1
    for key in (str(a), a, f"00{a}"):
        reply = asyncio.run(client.get_response(ask("Say hello."), options=greedy(3, logit_bias={key: 100, last: -1})))
        assert reply.text == "aaa"


def test_client_needs_exactly_one_of_engine_or_model(engine: Engine) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        KVChatClient()
    with pytest.raises(ValueError, match="exactly one"):
        KVChatClient(engine, model="qwen2.5-coder-0.5b-instruct")
    with pytest.raises(ValueError, match="engine_settings"):
        KVChatClient(engine, engine_settings=EngineSettings())
