"""A stateless chat: every call sends the whole history, and pays only for the new turn.

    python examples/stateless_chat.py
"""

from kvchat import Engine, SamplingParams, models
from kvchat.chat import complete

QUESTIONS = ["Name a large river.", "Which country is it in?", "Name another one on a different continent."]

with Engine(models.resolve("qwen2.5-coder-0.5b-instruct")) as engine:
    messages = [{"role": "system", "content": "You are a concise geography tutor."}]
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        reply = complete(engine, messages, sampling=SamplingParams(temperature=0, max_tokens=40)).collect()
        messages.append(reply.to_message())  # the next call re-sends all of it
        u = reply.usage
        print(f"user: {question}\nassistant: {reply.content}")
        print(f"  [prompt {u.prompt_tokens} tokens: {u.cached_tokens} from cache, {u.evaluated_tokens} evaluated]\n")
