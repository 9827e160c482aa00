"""The Semantic Kernel chat service on the real Qwen engine: cache reuse across
stateless calls, function calling through SK's loop, streaming, concurrency."""

from __future__ import annotations

import asyncio
import uuid

import pytest

pytest.importorskip("semantic_kernel")

from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.function_choice_behavior import FunctionChoiceBehavior
from semantic_kernel.contents import (
    ChatHistory,
    ChatMessageContent,
    FunctionCallContent,
    FunctionResultContent,
)
from semantic_kernel.contents.utils.author_role import AuthorRole
from semantic_kernel.contents.utils.finish_reason import FinishReason
from semantic_kernel.functions import KernelArguments
from sk_plugins import MathPlugin

from kvchat.chat import ChatRuntime, chat_tokenizer
from kvchat.chat.tool_round import CLOSING_NOTE
from kvchat.integrations.semantic_kernel import (
    KVChatCompletion,
    KVChatPromptExecutionSettings,
    KVTextCompletion,
    KVTextPromptExecutionSettings,
    history_to_messages,
)


@pytest.fixture
def service(qwen_engine) -> KVChatCompletion:
    return KVChatCompletion(qwen_engine, service_id="qwen")


@pytest.fixture
def prompts(qwen_engine, monkeypatch) -> list[list[int]]:
    """The prompt of every request the test submits to the engine, in order."""
    submitted: list[list[int]] = []
    submit = qwen_engine.submit

    def spy(prompt_tokens, *args, **kwargs):
        submitted.append(list(prompt_tokens))
        return submit(prompt_tokens, *args, **kwargs)

    monkeypatch.setattr(qwen_engine, "submit", spy)
    return submitted


def greedy(max_tokens: int = 24, **kwargs) -> KVChatPromptExecutionSettings:
    return KVChatPromptExecutionSettings(max_tokens=max_tokens, temperature=0.0, **kwargs)


def left_in_kv(reply: ChatMessageContent) -> int:
    """Tokens a finished call leaves in the KV cache: its prompt and its reply, but for a last token
    cut by max_tokens (sampled, never evaluated; an end-of-generation token is not in the reply)."""
    usage = reply.metadata["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"] - (reply.finish_reason == FinishReason.LENGTH)


def test_history_to_messages_shapes_every_role():
    history = ChatHistory(system_message="Be brief.")
    history.add_developer_message("Answer in English.")
    history.add_user_message("Add 1 and 2.")
    history.add_message(ChatMessageContent(role=AuthorRole.ASSISTANT, items=[
        FunctionCallContent(id="call_1", name="math-add", arguments={"a": 1, "b": 2})]))
    history.add_message(ChatMessageContent(role=AuthorRole.TOOL, items=[
        FunctionResultContent(id="call_1", name="math-add", result=3)]))
    history.add_assistant_message("3")
    assert history_to_messages(history) == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "Add 1 and 2."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "math-add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {"role": "assistant", "content": "3"},
    ]


def test_settings_class_and_sampling(service):
    assert service.get_prompt_execution_settings_class() is KVChatPromptExecutionSettings
    sampling = greedy(stop="\n", top_k=5, seed=3).to_sampling_params()
    assert (sampling.max_tokens, sampling.temperature, sampling.stop, sampling.top_k, sampling.seed) == (
        24, 0.0, ("\n",), 5, 3)


def test_ten_turns_pay_only_for_new_messages(service, qwen_engine):
    tokenizer = service.chat_runtime.tokenizer
    assert tokenizer is chat_tokenizer(qwen_engine)  # the engine's shared runtime, by default

    async def run() -> None:
        history = ChatHistory(system_message="You are a helpful assistant. Answer in one short sentence.")
        previous = None
        for turn in range(10):
            history.add_user_message(f"Tell me one fact about the number {turn + 2}.")
            reply = await service.get_chat_message_content(history, greedy())
            assert reply is not None and reply.content
            usage = reply.metadata["usage"]
            if previous is not None:
                assert usage["evaluated_tokens"] < 40, usage
                # All the previous call left in the KV, its prompt and its reply, was reused.
                assert usage["cached_tokens"] == left_in_kv(previous), (usage, previous.metadata["usage"])
            previous = reply
            history.add_message(reply)

        # Delete the last exchange and ask something else: only the new tail is evaluated.
        last_prompt = tokenizer.encode(history_to_messages(history.messages[:-1]))
        del history.messages[-2:]
        history.add_user_message("And one fact about the number 100?")
        prompt = tokenizer.encode(history_to_messages(history))
        shared = next(i for i, (a, b) in enumerate(zip(last_prompt, prompt, strict=False)) if a != b)
        reply = await service.get_chat_message_content(history, greedy())
        usage = reply.metadata["usage"]
        assert usage["prompt_tokens"] == len(prompt)
        assert usage["cached_tokens"] == shared  # the history up to the deleted exchange, nothing after it
        assert usage["evaluated_tokens"] < 40, usage

    asyncio.run(run())


def _math_kernel(service: KVChatCompletion) -> tuple[Kernel, MathPlugin]:
    kernel = Kernel()
    kernel.add_service(service)
    plugin = MathPlugin()
    kernel.add_plugin(plugin, plugin_name="math")
    return kernel, plugin


def _math_history() -> ChatHistory:
    history = ChatHistory(system_message="You are a calculator. Use the tools to compute.")
    history.add_user_message("What is 1234 plus 4321?")
    return history


def test_required_function_call_result_reaches_the_answer(service, qwen_engine, prompts):
    kernel, plugin = _math_kernel(service)
    history = _math_history()
    settings = greedy(48, function_choice_behavior=FunctionChoiceBehavior.Required())
    reply = asyncio.run(service.get_chat_message_content(history, settings, kernel=kernel))
    assert plugin.calls == [(1234, 4321)]
    calls = [item for m in history.messages for item in m.items if isinstance(item, FunctionCallContent)]
    results = [item for m in history.messages for item in m.items if isinstance(item, FunctionResultContent)]
    assert len(calls) == 1 and calls[0].id and calls[0].index == 0 and calls[0].name == "math-add"
    assert results[0].id == calls[0].id and str(results[0].result) == "5555"
    # The reply is the answer of a second call, with function calling off: its prompt is the
    # history with the result in it, the tools kept and a closing note asking for the answer,
    # so it continues the first call's prompt.
    assert len(prompts) == 2 and prompts[1][: len(prompts[0])] == prompts[0]
    asked, answered = (qwen_engine.model.detokenize(p, special=True) for p in prompts)
    assert '"name": "math-add"' in asked  # the tools, in the system message the answer shares
    assert answered.endswith(f"{CLOSING_NOTE}<|im_end|>\n<|im_start|>assistant\n")
    assert answered.count("5555") == 1
    assert reply is not None and reply.metadata["usage"]["prompt_tokens"] == len(prompts[-1])
    assert reply.metadata["usage"]["cached_tokens"] >= len(prompts[0])


def test_chat_after_a_function_call_reuses_the_cache(service, prompts):
    kernel, plugin = _math_kernel(service)
    history = _math_history()
    # A tenant of its own: other tests' turns on the shared engine stay out of its cache.
    tenant = f"sk-follow-up-{uuid.uuid4()}"
    settings = greedy(48, function_choice_behavior=FunctionChoiceBehavior.Required(), cache_key=tenant)
    reply = asyncio.run(service.get_chat_message_content(history, settings, kernel=kernel))
    assert plugin.calls == [(1234, 4321)]
    history.add_message(reply)
    history.add_user_message("Thanks. Now say goodbye.")
    # The next turn with the same functions shown (tool choice auto, as an agent's next turn),
    # one call: a call the model makes is returned, not invoked (that would add calls).
    auto = greedy(16, function_choice_behavior=FunctionChoiceBehavior.Auto(auto_invoke=False), cache_key=tenant)
    follow_up = asyncio.run(service.get_chat_message_content(history, auto, kernel=kernel))
    usage = follow_up.metadata["usage"]
    # Everything of the answering call before its closing note was reused (the call and its
    # result); only the answer's turn and the new message are evaluated.
    assert len(prompts) == 3
    answering, follow = prompts[1], prompts[2]
    shared = next(i for i, (a, b) in enumerate(zip(answering, follow, strict=False)) if a != b)
    closing = service.engine.model.tokenize(CLOSING_NOTE)
    assert usage["cached_tokens"] == shared >= len(answering) - len(closing) - 8, (usage, reply.metadata["usage"])
    assert usage["evaluated_tokens"] < 40 + reply.metadata["usage"]["completion_tokens"], usage


def test_kernel_invoke_prompt_with_required_function(service, qwen_engine, prompts):
    kernel, plugin = _math_kernel(service)
    settings = greedy(48, function_choice_behavior=FunctionChoiceBehavior.Required())
    result = asyncio.run(kernel.invoke_prompt("What is 1234 plus 4321?", arguments=KernelArguments(settings=settings)))
    assert plugin.calls == [(1234, 4321)]
    assert_answered_with_the_result(qwen_engine, prompts, result.value[0], "5555")


def assert_answered_with_the_result(engine, prompts: list[list[int]], reply: ChatMessageContent, result: str) -> None:
    """Two calls: the first asked for the function, the second, whose reply this is, was sent its result."""
    assert len(prompts) == 2
    asked, answered = (engine.model.detokenize(p, special=True) for p in prompts)
    assert result not in asked and result in answered
    assert reply.metadata["usage"]["prompt_tokens"] == len(prompts[1])


def test_auto_function_call_is_invoked_and_answered(service, qwen_engine, prompts):
    kernel, plugin = _math_kernel(service)
    # One round of automatic invocation, then Semantic Kernel asks for the answer with function
    # calling off (Qwen 0.5B would otherwise keep calling the tool).
    settings = greedy(48, function_choice_behavior=FunctionChoiceBehavior.Auto(maximum_auto_invoke_attempts=1))
    reply = asyncio.run(service.get_chat_message_content(_math_history(), settings, kernel=kernel))
    assert reply is not None and reply.content
    assert not any(isinstance(item, FunctionCallContent) for item in reply.items)
    assert plugin.calls == [(1234, 4321)]
    assert_answered_with_the_result(qwen_engine, prompts, reply, "5555")
    assert "5555" in reply.content.replace(",", "")
    # That last call keeps the tools (tool_choice "none"), so it continues the call's prompt.
    assert prompts[1][: len(prompts[0])] == prompts[0]
    assert reply.metadata["usage"]["cached_tokens"] >= len(prompts[0])


def test_none_invoke_returns_calls_without_invoking(service):
    kernel, plugin = _math_kernel(service)
    settings = greedy(32, function_choice_behavior=FunctionChoiceBehavior.NoneInvoke())
    reply = asyncio.run(service.get_chat_message_content(_math_history(), settings, kernel=kernel))
    assert reply is not None and plugin.calls == []
    assert reply.content


def test_streaming_yields_text_chunks(service):
    async def run() -> list:
        history = ChatHistory()
        history.add_user_message("Count from one to ten in words.")
        return [c async for c in service.get_streaming_chat_message_content(history, greedy(32))]

    chunks = run_chunks = asyncio.run(run())
    texts = [c.content for c in chunks if c is not None and c.content]
    assert len(texts) > 3
    assert run_chunks[-1].metadata["usage"]["completion_tokens"] > 0
    assert run_chunks[-1].finish_reason is not None


def test_streaming_required_function_call(service):
    kernel, plugin = _math_kernel(service)
    settings = greedy(48, function_choice_behavior=FunctionChoiceBehavior.Required())

    async def run() -> list:
        return [c async for c in service.get_streaming_chat_message_content(_math_history(), settings,
                                                                            kernel=kernel)]

    chunks = asyncio.run(run())
    assert plugin.calls == [(1234, 4321)]
    calls = [item for c in chunks for item in c.items if isinstance(item, FunctionCallContent)]
    assert len(calls) == 1 and calls[0].id and calls[0].index == 0
    # SK's streaming loop yields the results and stops after Required's one attempt.
    results = [item for c in chunks for item in c.items if isinstance(item, FunctionResultContent)]
    assert [(r.id, str(r.result)) for r in results] == [(calls[0].id, "5555")]


def test_four_concurrent_calls_complete_batched(service, qwen_engine):
    most_active = 0

    async def watch(done: asyncio.Event) -> None:
        nonlocal most_active
        while not done.is_set():
            most_active = max(most_active, qwen_engine.stats().active)
            await asyncio.sleep(0.002)

    async def run() -> list:
        histories = []
        for i in range(4):
            history = ChatHistory()
            history.add_user_message(f"Name a color that starts with the letter {'BRGY'[i]}.")
            histories.append(history)
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        replies = await asyncio.gather(*(service.get_chat_message_content(h, greedy(16)) for h in histories))
        done.set()
        await watcher
        return replies

    replies = asyncio.run(run())
    assert len(replies) == 4
    assert most_active >= 2, "the four calls never ran in the engine together"
    assert all(r is not None and r.content and r.metadata["usage"]["completion_tokens"] > 0 for r in replies)


def test_service_needs_exactly_one_of_engine_or_model(qwen_engine):
    with pytest.raises(ValueError):
        KVChatCompletion()
    with pytest.raises(ValueError):
        KVChatCompletion(qwen_engine, model="qwen2.5-coder-0.5b-instruct")


def test_a_service_chats_on_the_runtime_it_is_given(qwen_engine):
    runtime = ChatRuntime(qwen_engine)
    service = KVChatCompletion(qwen_engine, chat_runtime=runtime)
    assert service.chat_runtime is runtime
    history = ChatHistory()
    history.add_user_message("Say hi.")
    reply = asyncio.run(service.get_chat_message_content(history, greedy(4)))
    assert reply is not None and reply.content
    assert runtime.memory.lookup(reply.content) is not None  # its reply went to the runtime's memory
    with pytest.raises(ValueError, match="given engine"):  # before any engine is started on the model
        KVChatCompletion(model="no-such-model", chat_runtime=runtime)


def test_text_completion_and_streaming(qwen_engine):
    service = KVTextCompletion(qwen_engine)
    settings = KVTextPromptExecutionSettings(max_tokens=12, temperature=0.0)
    prompt = "def fibonacci(n):\n"

    async def run():
        first = await service.get_text_content(prompt, settings)
        chunks = [c async for c in service.get_streaming_text_content(prompt, settings)]
        return first, chunks

    first, chunks = asyncio.run(run())
    assert first is not None and first.text and first.metadata["usage"]["completion_tokens"] > 0
    # Not compared token for token with `first`: a cached prefix changes llama.cpp's batch split
    # and so, slightly, the logits (see conftest's `idle_cold_engine`).
    assert len([c for c in chunks if c.text]) > 1 and "".join(c.text for c in chunks)
    assert chunks[-1].metadata["usage"]["cached_tokens"] > 0  # the prompt was cached by the first call


def test_multi_turn_through_kernel_invoke_with_a_prompt_template(service):
    from semantic_kernel.functions import KernelArguments
    from semantic_kernel.prompt_template import InputVariable, PromptTemplateConfig

    kernel = Kernel()
    kernel.add_service(service)
    config = PromptTemplateConfig(
        name="reply", template="{{$chat_history}}{{$user_input}}",
        input_variables=[InputVariable(name="chat_history", allow_dangerously_set_content=True),
                         InputVariable(name="user_input")])
    chat = kernel.add_function(plugin_name="chat", function_name="reply", prompt_template_config=config)
    history = ChatHistory(system_message="Answer with one short sentence.")

    async def run() -> list[ChatMessageContent]:
        replies = []
        for question in ["Name a fruit.", "Name a vegetable.", "Name a grain.", "Name a nut.", "Name a herb.",
                         "Name a spice.", "Name a berry.", "Name a bean.", "Name a root.", "Name a leaf."]:
            result = await kernel.invoke(chat, KernelArguments(settings=greedy(16), chat_history=history,
                                                               user_input=question))
            reply = result.value[0]
            replies.append(reply)
            history.add_user_message(question)
            history.add_message(reply)
        return replies

    replies = asyncio.run(run())
    for previous, reply in zip(replies, replies[1:]):
        usage = reply.metadata["usage"]
        assert usage["cached_tokens"] >= previous.metadata["usage"]["prompt_tokens"]  # the previous history...
        assert usage["cached_tokens"] == left_in_kv(previous), usage  # ...and its reply were reused
        assert usage["evaluated_tokens"] < 40


@pytest.mark.model  # loads gemma itself, not through a model fixture
def test_a_service_built_from_a_model_name_owns_and_closes_its_engine():
    service = KVChatCompletion(model="gemma-3-270m")
    try:
        history = ChatHistory()
        history.add_user_message("Say one word.")
        reply = asyncio.run(service.get_chat_message_content(history, greedy(4)))
        assert reply is not None and reply.metadata["usage"]["completion_tokens"] > 0
        engine = service.engine
        assert not engine.closed
    finally:
        service.close()
    assert engine.closed
