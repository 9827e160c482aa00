"""A multi-turn Semantic Kernel chat on a local model; prints cached vs evaluated tokens per turn.

Semantic Kernel sends the whole ChatHistory on every call; kvchat's prefix cache
makes each call evaluate only what was added.

    pip install 'kvchat[semantic-kernel]'
    python examples/semantic_kernel_chat.py
"""

import asyncio

from semantic_kernel.contents import ChatHistory

from kvchat import Engine, models
from kvchat.integrations.semantic_kernel import KVChatCompletion, KVChatPromptExecutionSettings

QUESTIONS = ["What is a river delta?", "Name one famous delta.", "Which sea does it flow into?",
             "Summarise our chat in one sentence."]


async def main() -> None:
    with Engine(models.resolve("qwen2.5-coder-0.5b-instruct")) as engine:
        service = KVChatCompletion(engine)
        settings = KVChatPromptExecutionSettings(max_tokens=48, temperature=0.0)
        history = ChatHistory(system_message="You are a concise geography tutor.")
        for question in QUESTIONS:
            history.add_user_message(question)
            reply = await service.get_chat_message_content(history, settings)
            history.add_message(reply)
            usage = reply.metadata["usage"]
            print(f"user: {question}\nassistant: {reply.content}")
            print(f"  [prompt {usage['prompt_tokens']}: {usage['cached_tokens']} cached, "
                  f"{usage['evaluated_tokens']} evaluated]\n")


asyncio.run(main())
