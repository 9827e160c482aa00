"""`python -m kvchat.demo`: a short streamed chat on the packaged default model.

Asks a question, streams the answer, then asks it again as a follow-up turn with
the whole history re-sent (the way stateless chat clients call), and prints each
turn's token accounting: prompt, cached and evaluated tokens, time to first token.
"""

from __future__ import annotations

import argparse
import sys

from kvchat.chat.history import GeneratedTokenMemory
from kvchat.chat.tokenizer import ChatTokenizer
from kvchat.engine import Engine, SamplingParams
from kvchat.models import DEFAULT_CHAT_MODEL, resolve

QUESTION = "What is a KV cache in a language model? Answer in two sentences."


def run(model: str, question: str, max_tokens: int) -> None:
    """Run the two-turn demo and print to stdout."""
    with Engine(resolve(model)) as engine:
        memory = GeneratedTokenMemory()
        tokenizer = ChatTokenizer(engine.model, memory=memory)
        messages = [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": question},
        ]
        for turn in (1, 2):
            print(f"\n[turn {turn}] user: {messages[-1]['content']}\nassistant: ", end="", flush=True)
            tokens = tokenizer.encode(messages)  # message text never becomes markup
            stream = engine.submit(tokens, SamplingParams(temperature=0, max_tokens=max_tokens))
            answer: list[str] = []
            answer_ids: list[int] = []
            for chunk in stream:
                answer.append(chunk.text)
                answer_ids.extend(chunk.token_ids)
                print(chunk.text, end="", flush=True)
            usage = stream.usage
            assert usage is not None  # set by the last chunk, which ends the loop
            # The next call re-sends this answer: give it back as the exact ids sampled.
            memory.remember("".join(answer), answer_ids)
            print(
                f"\n  -> prompt {usage.prompt_tokens} tokens, cached {usage.cached_tokens}, "
                f"evaluated {usage.evaluated_tokens}, completion {usage.completion_tokens}, "
                f"time to first token {usage.time_to_first_token:.3f} s, finish: {usage.finish_reason}"
            )
            messages += [
                {"role": "assistant", "content": "".join(answer)},
                {"role": "user", "content": "Please answer the same question again: " + question},
            ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvchat.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_CHAT_MODEL, help="packaged model name or .gguf path")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    run(args.model, args.question, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
