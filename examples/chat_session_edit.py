"""A chat you can edit: each operation evaluates only the tokens after the first change.

    python examples/chat_session_edit.py
"""

from kvchat import ChatSession, Engine, SamplingParams, models


def show(label: str, reply) -> None:
    done = reply.collect()
    u = done.usage
    print(f"{label}: {done.content!r}\n  [prompt {u.prompt_tokens}: {u.cached_tokens} cached, "
          f"{u.evaluated_tokens} evaluated]")


with Engine(models.resolve("qwen2.5-coder-0.5b-instruct")) as engine:
    chat = ChatSession(engine, system="You answer in one short sentence.",
                       sampling=SamplingParams(temperature=0, max_tokens=32))
    show("send", chat.send("What is the capital of France?"))
    show("send", chat.send("And of Italy?"))
    show("regenerate", chat.regenerate())          # replaces the last answer: 1 token evaluated
    chat.edit(1, "What is the capital of Spain?")  # change the first question...
    show("send after edit", chat.send("And of Portugal?"))  # ...re-evaluates from it on
    chat.undo()                                    # drop the last exchange
    show("send after undo", chat.send("And of Germany?"))   # only the new message is evaluated
