"""A Microsoft Agent Framework agent with a Python tool, on a local model, over a few turns.

The agent's session sends the whole conversation on every call; kvchat's prefix cache
makes each call evaluate only what was added. Prints the cached tokens per turn and
each tool call.

    pip install 'kvchat[agent-framework]'
    python examples/agent_framework_agent.py
"""

import asyncio
from typing import Annotated

from agent_framework import tool
from pydantic import Field

from kvchat import models
from kvchat.integrations.agent_framework import KVChatClient


@tool(description="Add two integers and return their sum.")
def add(a: Annotated[int, Field(description="first addend")],
        b: Annotated[int, Field(description="second addend")]) -> int:
    print(f"  tool called: add({a}, {b})")
    return a + b


QUESTIONS = ["What is 1234 plus 4321?", "Which of the two numbers I gave you was larger?",
             "Name a river in France.", "Thanks. Say goodbye in one short sentence."]


async def main() -> None:
    # One round of tool calls, then the answer (a 0.5B model would keep calling).
    with KVChatClient(model=models.DEFAULT_CHAT_MODEL,
                      function_invocation_configuration={"max_iterations": 1}) as client:
        agent = client.as_agent(
            instructions="You are a helpful assistant. Use the add tool for sums. Answer in one short sentence.",
            tools=[add],
            default_options={"temperature": 0.0, "max_tokens": 64},
        )
        session = agent.create_session()
        cached = []
        for question in QUESTIONS:
            print(f"user: {question}")
            response = await agent.run(question, session=session)
            usage = response.usage_details or {}  # summed over the turn's model calls
            cached.append(usage.get("cache_read_input_token_count", 0))
            print(f"assistant: {response.text}")
            print(f"  [input {usage.get('input_token_count')} tokens: {cached[-1]} cached, "
                  f"{usage.get('prompt/evaluated_tokens')} evaluated]\n")
        if all(n > 0 for n in cached[1:]):
            print("every later turn started from the KV cache")


asyncio.run(main())
