"""Semantic Kernel's `ChatCompletionAgent` on `KVChatCompletion` (real Qwen engine):
a plugin called through the agent, several turns on the agent's thread that each
evaluate only what is new, and SK's truncation reducer (the turn after a reduction
re-reads what was kept; the turns after it are cheap again)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("semantic_kernel")

from semantic_kernel.agents import ChatCompletionAgent, ChatHistoryAgentThread
from semantic_kernel.connectors.ai.function_choice_behavior import FunctionChoiceBehavior
from semantic_kernel.contents import ChatHistoryTruncationReducer, ChatMessageContent
from semantic_kernel.functions import KernelArguments
from sk_plugins import MathPlugin

from kvchat.integrations.semantic_kernel import KVChatCompletion, KVChatPromptExecutionSettings


@pytest.fixture
def service(qwen_engine) -> KVChatCompletion:
    return KVChatCompletion(qwen_engine, service_id="qwen")


def make_agent(service: KVChatCompletion, instructions: str, plugins: list | None = None, max_tokens: int = 32):
    # One round of automatic invocation, then the answer (a 0.5B model would keep calling).
    settings = KVChatPromptExecutionSettings(
        max_tokens=max_tokens,
        temperature=0.0,
        function_choice_behavior=FunctionChoiceBehavior.Auto(maximum_auto_invoke_attempts=1),
    )
    return ChatCompletionAgent(
        service=service,
        name="helper",
        instructions=instructions,
        plugins=plugins or [],
        arguments=KernelArguments(settings=settings),
    )


def usage(message: ChatMessageContent) -> dict:
    return message.metadata["usage"]


def test_agent_calls_its_plugin_and_answers_with_the_result(service, qwen_engine):
    plugin = MathPlugin()
    agent = make_agent(service, "You are a calculator. Use the tools to compute.", [plugin], max_tokens=48)

    async def run() -> str:
        response = await agent.get_response(messages="What is 1234 plus 4321?")
        await response.thread.delete()
        return str(response.message.content)

    answer = asyncio.run(run())
    assert plugin.calls == [(1234, 4321)]
    assert "5555" in answer.replace(",", "")


def test_turns_on_the_agents_thread_evaluate_only_the_new_message(service, qwen_engine):
    agent = make_agent(service, "You are a helpful assistant. Answer in one short sentence.")

    async def run() -> list[dict]:
        thread = ChatHistoryAgentThread()
        usages = []
        for turn in range(5):
            response = await agent.get_response(messages=f"Tell me one fact about the number {turn + 2}.", thread=thread)
            usages.append(usage(response.message))
        return usages

    usages = asyncio.run(run())
    for previous, current in zip(usages, usages[1:], strict=False):
        # The previous call's whole prompt, and its reply, are reused.
        assert current["cached_tokens"] >= previous["prompt_tokens"] + previous["completion_tokens"] - 1, usages
        assert current["evaluated_tokens"] < 40, usages


def test_a_truncating_reducer_costs_one_reread_then_turns_are_cheap_again(service, qwen_engine):
    instructions = "You are a helpful assistant. Answer in one short sentence."
    agent = make_agent(service, instructions)

    async def run() -> list[tuple[bool, dict]]:
        thread = ChatHistoryAgentThread(chat_history=ChatHistoryTruncationReducer(target_count=4, threshold_count=1))
        turns = []
        for turn in range(6):
            reduced = await thread.reduce() is not None  # what SK's samples do before each turn
            response = await agent.get_response(messages=f"Tell me one fact about the number {turn + 2}.", thread=thread)
            turns.append((reduced, usage(response.message)))
        return turns

    turns = asyncio.run(run())
    reduced_turns = [i for i, (reduced, _) in enumerate(turns) if reduced]
    assert reduced_turns, "the reducer never truncated the thread"
    for i in range(1, len(turns)):
        reduced, current = turns[i]
        previous = turns[i - 1][1]
        if reduced:
            # The kept messages moved to the front: only the instructions (the system
            # message) are a shared prefix, so the kept history is evaluated again.
            assert current["cached_tokens"] < previous["prompt_tokens"] // 2, turns
            assert current["evaluated_tokens"] > 40, turns
        else:
            assert current["cached_tokens"] >= previous["prompt_tokens"] + previous["completion_tokens"] - 1, turns
            assert current["evaluated_tokens"] < 40, turns
