"""A Semantic Kernel plugin called through function calling on a local model.

    pip install 'kvchat[semantic-kernel]'
    python examples/semantic_kernel_tools.py
"""

import asyncio
from typing import Annotated

from semantic_kernel import Kernel
from semantic_kernel.connectors.ai.function_choice_behavior import FunctionChoiceBehavior
from semantic_kernel.contents import ChatHistory
from semantic_kernel.functions import kernel_function

from kvchat import Engine, models
from kvchat.integrations.semantic_kernel import KVChatCompletion, KVChatPromptExecutionSettings


class MathPlugin:
    """Arithmetic the model should not do in its head."""

    @kernel_function(description="Add two integers.")
    def add(self, a: Annotated[int, "first addend"], b: Annotated[int, "second addend"]) -> int:
        print(f"  (plugin called: add({a}, {b}))")
        return a + b


async def main() -> None:
    with Engine(models.resolve("qwen2.5-coder-0.5b-instruct")) as engine:
        kernel = Kernel()
        service = KVChatCompletion(engine)
        kernel.add_service(service)
        kernel.add_plugin(MathPlugin(), plugin_name="math")
        # One round of automatic invocation, then the answer (a 0.5B model would keep calling).
        settings = KVChatPromptExecutionSettings(
            max_tokens=64, temperature=0.0,
            function_choice_behavior=FunctionChoiceBehavior.Auto(maximum_auto_invoke_attempts=1))
        history = ChatHistory(system_message="You are a calculator. Use the tools to compute.")
        history.add_user_message("What is 1234 plus 4321?")
        reply = await service.get_chat_message_content(history, settings, kernel=kernel)
        print(f"assistant: {reply.content}")


asyncio.run(main())
