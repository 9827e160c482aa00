"""`kvchat.chat.complete` (and `ChatRuntime.complete`) on the real Qwen model: stateless chat, tools,
JSON, overflow, cancellation; and, without a model, the overflow fitting's renders and result against
dropping one turn at a time."""

from __future__ import annotations

import asyncio
import math
import threading
import uuid
from types import SimpleNamespace

import jsonschema
import pytest
from helpers import assert_idle
from hypothesis import given, settings
from hypothesis import strategies as st

from kvchat import ContextOverflowError, Engine, EngineSettings, InvalidRequestError, SamplingParams
from kvchat.chat import ChatRuntime, ChatTokenizer, chat_tokenizer, complete
from kvchat.chat.fit import fit_prompt
from kvchat.chat.runtime import runtime_for
from kvchat.chat.template import CHATML_TEMPLATE, ChatTemplate
from kvchat.chat.tool_round import CLOSING_NOTE
from kvchat.llama import Model

ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


def test_stateless_chat_through_complete_evaluates_only_the_new_turn(qwen_model: Model, qwen_engine: Engine) -> None:
    tenant = f"complete-{uuid.uuid4()}"
    tokenizer = chat_tokenizer(qwen_engine)
    end_of_turn = len(qwen_model.tokenize("<|im_end|>\n", parse_special=True))
    messages: list[dict] = [{"role": "system", "content": "You are terse. Answer in one short sentence."}]
    previous = None
    for turn in range(10):
        messages.append({"role": "user", "content": f"Question {turn}: name one animal that starts with {'ABCDEFGHIJ'[turn]}."})
        reply = complete(qwen_engine, messages, sampling=greedy(20), cache_key=tenant).collect()
        usage = reply.usage
        if previous is None:
            assert usage.cached_tokens == 0
        else:
            with_reply = tokenizer.encode(messages[:-1], add_generation_prompt=False, namespace=tenant)
            n_new = usage.prompt_tokens - len(with_reply) + end_of_turn + (previous.finish_reason == "length")
            assert usage.cached_tokens == usage.prompt_tokens - n_new, (turn, usage)
        assert reply.content and not reply.tool_calls
        messages.append(reply.to_message())
        previous = reply
    assert_idle(qwen_engine)


def test_required_tool_choice_gives_a_parsed_call_with_integer_arguments(qwen_engine: Engine) -> None:
    messages = [{"role": "user", "content": "What is 17 plus 25? Use the tool."}]
    reply = complete(qwen_engine, messages, tools=[ADD_TOOL], tool_choice="required", sampling=greedy(64)).collect()
    assert reply.finish_reason == "tool_calls"
    assert len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert call.name == "add" and call.id.startswith("call_")
    assert isinstance(call.arguments["a"], int) and isinstance(call.arguments["b"], int)
    assert sorted([call.arguments["a"], call.arguments["b"]]) == [17, 25]
    message = reply.to_message()
    assert message["tool_calls"][0]["function"]["name"] == "add"


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_tool_result_reaches_the_final_answer(qwen_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[list[int]] = []
    submit = qwen_engine.submit

    outputs: list[list[int]] = []

    def spy(prompt_tokens, *args, **kwargs):
        prompts.append(list(prompt_tokens))
        outputs.append(output := [])
        stream = submit(prompt_tokens, *args, **kwargs)
        push = stream._push

        def record(item):
            output.extend(getattr(item, "token_ids", ()))
            push(item)

        stream._push = record
        return stream

    monkeypatch.setattr(qwen_engine, "submit", spy)
    tenant = f"tool-round-{uuid.uuid4()}"
    messages: list[dict] = [{"role": "user", "content": "What is 17 plus 25? Use the tool."}]
    first = complete(qwen_engine, messages, tools=[ADD_TOOL], tool_choice="required", sampling=greedy(64),
                     cache_key=tenant).collect()
    call_tokens = outputs[0]
    call = first.tool_calls[0]
    # The forced call is written with the model's own <tool_call> tokens, as its template renders it.
    tag_open, tag_close = (qwen_engine.model.tokenize(t, parse_special=True) for t in ("<tool_call>", "</tool_call>"))
    assert call_tokens[0] == tag_open[0] and tag_close[0] in call_tokens
    messages += [first.to_message(), {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    # tool_choice="none" after the tool round: the answer is text, made from the result.
    answer = complete(qwen_engine, messages, tools=[ADD_TOOL], tool_choice="none", sampling=greedy(40),
                      cache_key=tenant).collect()
    assert answer.finish_reason == "stop" and not answer.tool_calls
    assert "42" in answer.content and "{" not in answer.content
    # Its prompt keeps the tools and ends with the closing note, so it continues the prompt
    # and the call before it: only the result and the note are evaluated.
    tokenizer = chat_tokenizer(qwen_engine)
    closing = {"role": "system", "content": CLOSING_NOTE}
    assert len(prompts) == 2
    assert prompts[1] == tokenizer.encode([*messages, closing], tools=[ADD_TOOL], namespace=tenant)
    asked, answered = (qwen_engine.model.detokenize(p) for p in prompts)
    assert "42" not in asked and "42" in answered
    assert answer.usage.prompt_tokens == len(prompts[1])
    reused = common_prefix(prompts[1], prompts[0] + call_tokens)
    assert answer.usage.cached_tokens == reused
    # All of the call but its last characters: the template's "}}\n" is one token where
    # the model sampled "}}" and "\n".
    assert reused >= len(prompts[0]) + len(call_tokens) - 3
    # The next turn (tools shown, the answer in the history) continues the round too:
    # it evaluates only the answer's turn and the new message.
    answer_tokens = qwen_engine.model.tokenize(answer.content)
    messages += [answer.to_message(), {"role": "user", "content": "Thanks. And 5 plus 5?"}]
    after = complete(qwen_engine, messages, tools=[ADD_TOOL], sampling=greedy(1), cache_key=tenant).collect()
    assert len(prompts) == 3
    shared = common_prefix(prompts[2], prompts[1])
    assert after.usage.cached_tokens == shared
    closing_turn = tokenizer.encode([*messages[:-2], closing], tools=[ADD_TOOL], namespace=tenant)
    assert shared == common_prefix(closing_turn, prompts[2])  # up to where the closing note was
    assert len(prompts[2]) - shared <= len(answer_tokens) + 30


def test_tool_choice_none_hides_the_tools(qwen_engine: Engine) -> None:
    # Not after a tool round: Qwen 0.5B, shown tools, writes a call even when told not to.
    messages = [{"role": "user", "content": "Say hello."}]
    hidden = complete(qwen_engine, messages, tools=[ADD_TOOL], tool_choice="none", sampling=greedy(2))
    plain = complete(qwen_engine, messages, sampling=greedy(2))
    shown = complete(qwen_engine, messages, tools=[ADD_TOOL], sampling=greedy(2))
    assert hidden.prompt_tokens == plain.prompt_tokens < shown.prompt_tokens
    for stream in (hidden, plain, shown):
        stream.collect()


def test_json_schema_response_format_validates(qwen_engine: Engine) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Give the largest city of Japan and its population as JSON."}]
    reply = complete(qwen_engine, messages, sampling=greedy(60),
                     response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}).collect()
    import json

    jsonschema.validate(json.loads(reply.content), schema)
    assert reply.finish_reason == "stop"


def test_async_iteration_streams_deltas(qwen_engine: Engine) -> None:
    async def run():
        stream = complete(qwen_engine, [{"role": "user", "content": "Count from 1 to 5."}], sampling=greedy(16))
        return [d async for d in stream]

    deltas = asyncio.run(run())
    assert len(deltas) > 2 and deltas[-1].usage is not None and deltas[-1].finish_reason in ("stop", "length")
    assert "".join(d.content for d in deltas).strip()


@pytest.fixture(scope="module")
def small_qwen_engine(qwen_model: Model) -> Engine:
    with Engine(qwen_model, EngineSettings(n_ctx=256, max_running=2, n_seq_max=4)) as engine:
        yield engine


def long_history(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Tell me fact number {i} about the ocean, please, in detail."},
                     {"role": "assistant", "content": f"Fact {i}: the ocean is deep, wide, salty and full of life."}]
    messages.append({"role": "user", "content": "Now summarise in one word."})
    return messages


def test_overflow_error_reports_the_numbers(small_qwen_engine: Engine) -> None:
    with pytest.raises(ContextOverflowError) as caught:
        complete(small_qwen_engine, long_history(10), sampling=greedy(16))
    assert caught.value.context_limit == small_qwen_engine.context_limit
    assert caught.value.prompt_tokens + 16 > small_qwen_engine.context_limit


def test_overflow_truncate_oldest_keeps_the_system_prompt_and_the_last_turn(small_qwen_engine: Engine) -> None:
    messages = long_history(10)
    stream = complete(small_qwen_engine, messages, sampling=greedy(16), overflow="truncate_oldest")
    reply = stream.collect()
    assert reply.usage.prompt_tokens + 16 <= small_qwen_engine.context_limit
    assert reply.usage.finish_reason in ("stop", "length")
    # The prompt is the system message, the newest whole turns that fit, and the question.
    tokenizer = chat_tokenizer(small_qwen_engine)
    system, turns, question = messages[:1], messages[1:-1], messages[-1:]
    fits = [k for k in range(0, len(turns) + 1, 2)
            if len(tokenizer.encode(system + turns[k:] + question)) + 16 <= small_qwen_engine.context_limit]
    assert fits and stream.prompt_tokens == len(tokenizer.encode(system + turns[fits[0]:] + question))
    assert fits[0] > 0  # something was dropped
    assert len(messages) == 22  # the caller's list is not changed


def test_unknown_overflow_policy_is_refused(qwen_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        complete(qwen_engine, [{"role": "user", "content": "hi"}], overflow="shift-everything")
    assert caught.value.field == "overflow"


# -- overflow fitting: O(log n) renders, the same prompt as dropping one turn at a time ----------

ROLE_TOKENS = {"system": 1, "developer": 2, "user": 3, "assistant": 4, "tool": 5}


class CountingTokenizer:
    """A stand-in for `ChatTokenizer.encode` (pure logic): each message renders as a
    role token and one token per character, plus a 2-token generation prompt."""

    def __init__(self) -> None:
        self.renders = 0

    def encode(self, messages, *, tools=None, namespace=None, add_generation_prompt=True) -> list[int]:
        self.renders += 1
        tokens = []
        for message in messages:
            tokens += [ROLE_TOKENS[message["role"]], *(ord(c) for c in message.get("content") or "")]
        return tokens + ([9, 9] if add_generation_prompt else [])


def linear_fit(tokenizer, messages: list[dict], limit: int, need: int) -> list[int]:
    """The overflow fitting as it was: render, drop the oldest turn, render again."""
    messages = list(messages)
    while True:
        tokens = tokenizer.encode(messages)
        if len(tokens) + need <= limit:
            return tokens
        first = next((i for i, m in enumerate(messages) if m.get("role") not in ("system", "developer")), None)
        if first is None:
            raise ContextOverflowError(prompt_tokens=len(tokens), max_tokens=need, context_limit=limit)
        end = first + 1
        while end < len(messages) and messages[end].get("role") != "user":
            end += 1
        if end >= len(messages):
            raise ContextOverflowError(prompt_tokens=len(tokens), max_tokens=need, context_limit=limit)
        del messages[first:end]


def fit(tokenizer, messages: list[dict], limit: int, need: int) -> list[int]:
    tokens, shift = fit_prompt(tokenizer, messages, None, limit=limit, need=need, overflow="truncate_oldest")
    assert shift is None
    return tokens


def test_a_chat_runtime_belongs_to_one_engine() -> None:
    engine, other = SimpleNamespace(model=object()), SimpleNamespace(model=object())
    runtime = ChatRuntime(engine, ChatTokenizer(engine.model, ChatTemplate(CHATML_TEMPLATE)))
    assert runtime_for(engine, runtime) is runtime
    with pytest.raises(ValueError, match="another engine"):
        runtime_for(other, runtime)
    with pytest.raises(ValueError, match="engine's model"):
        ChatRuntime(other, runtime.tokenizer)


def test_a_long_overflowing_conversation_is_fitted_with_a_logarithmic_number_of_renders() -> None:
    turns = 20_000
    messages = [{"role": "system", "content": "sys"}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"q{i % 10}"}, {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": "last"})
    tokenizer = CountingTokenizer()
    limit, need = 1000, 16
    tokens = fit(tokenizer, messages, limit, need)
    assert tokenizer.renders <= 2 * math.log2(turns) + 4, tokenizer.renders
    assert len(tokens) + need <= limit
    # The newest turns that fit, and no fewer dropped: one more turn would not fit.
    kept_turns = (len(tokens) - len(tokenizer.encode(messages[:1] + messages[-1:]))) // 6  # "q9"+"ok": 2 + 4
    assert len(tokens) + 6 + need > limit and kept_turns > 0
    assert tokens == tokenizer.encode(messages[:1] + messages[-1 - 2 * kept_turns:])


MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "user", "assistant", "tool"]),
    "content": st.text(alphabet="abc", max_size=12),
})


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(MESSAGE, max_size=24), limit=st.integers(1, 120), need=st.integers(1, 8))
def test_fitting_gives_what_dropping_one_turn_at_a_time_gives(messages: list[dict], limit: int, need: int) -> None:
    try:
        expected: list[int] | ContextOverflowError = linear_fit(CountingTokenizer(), messages, limit, need)
    except ContextOverflowError as exc:
        expected = exc
    tokenizer = CountingTokenizer()
    try:
        got: list[int] | ContextOverflowError = fit(tokenizer, messages, limit, need)
    except ContextOverflowError as exc:
        got = exc
    if isinstance(expected, ContextOverflowError):
        assert isinstance(got, ContextOverflowError) and got.prompt_tokens == expected.prompt_tokens
    else:
        assert got == expected
    assert tokenizer.renders <= 2 * math.log2(len(messages) + 1) + 4


class CountingChatTokenizer(ChatTokenizer):
    """A chat tokenizer that counts its renders."""

    renders = 0

    def encode(self, *args, **kwargs) -> list[int]:
        self.renders += 1
        return super().encode(*args, **kwargs)


def test_a_cancelled_complete_stops_between_renders_and_queues_nothing(small_qwen_engine: Engine,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = CountingChatTokenizer(small_qwen_engine.model)
    runtime = ChatRuntime(small_qwen_engine, tokenizer)
    submitted = []
    monkeypatch.setattr(small_qwen_engine, "submit", lambda *args, **kwargs: submitted.append(args))
    messages = long_history(10)
    checks = iter([False, False, False, True])  # the phases before fitting, the first render, then stop
    stream = runtime.complete(messages, sampling=greedy(16), overflow="truncate_oldest",
                              cancelled=lambda: next(checks, True))
    reply = stream.collect()
    assert reply.finish_reason == "cancelled" and reply.usage.completion_tokens == 0 and reply.content == ""
    assert stream.prompt_tokens == 0 and not submitted
    assert tokenizer.renders == 1  # the conversation overflowed; the next render was not started

    async def cancelled_at_once():
        deltas = [d async for d in runtime.complete(messages, cancelled=lambda: True)]
        return deltas

    deltas = asyncio.run(cancelled_at_once())
    assert [d.finish_reason for d in deltas] == ["cancelled"] and tokenizer.renders == 1 and not submitted


def test_a_complete_cancelled_while_it_submits_ends_cancelled(qwen_engine: Engine) -> None:
    flag = threading.Event()
    submit = qwen_engine.submit

    def submit_then_cancel(*args, **kwargs):
        stream = submit(*args, **kwargs)
        flag.set()  # the client leaves while the request is being queued
        return stream

    messages = [{"role": "user", "content": "Count from 1 to 100."}]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qwen_engine, "submit", submit_then_cancel)
        reply = complete(qwen_engine, messages, sampling=greedy(200), cancelled=flag.is_set).collect()
    assert reply.finish_reason == "cancelled" and reply.usage.completion_tokens < 200
    assert_idle(qwen_engine)
