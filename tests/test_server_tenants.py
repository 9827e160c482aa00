"""Tenants behind API keys share one engine but nothing else: not the prefix cache,
and not the generated-token memory (the exact ids of recent replies)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from helpers import assert_idle
from http_server import RunningServer
from openai import OpenAI

from kvchat import Engine
from kvchat.chat import ChatRuntime, ChatTokenizer, GeneratedTokenMemory
from kvchat.llama import Model
from kvchat.server import create_app

MODEL = "qwen-test"
REPLY_TOKENS = 4


@pytest.fixture
def small_memory() -> GeneratedTokenMemory:
    """A memory of 3 replies per tenant, for this test's server."""
    return GeneratedTokenMemory(max_entries=3)


@pytest.fixture
def tenants(qwen_engine: Engine, small_memory: GeneratedTokenMemory) -> Iterator[tuple[OpenAI, OpenAI]]:
    runtime = ChatRuntime(qwen_engine, ChatTokenizer(qwen_engine.model, memory=small_memory))
    app = create_app(qwen_engine, model_name=MODEL, api_keys=["key-alice", "key-bob"], chat_runtime=runtime)
    with RunningServer(app) as server:
        yield server.client("key-alice"), server.client("key-bob")
    assert_idle(qwen_engine)


def non_canonical_reply(client: OpenAI, model: Model, question: str) -> tuple[list[dict], int]:
    """A one-turn history whose reply the model spelled in more tokens than its text
    tokenizes to ("a" forced 4 times: "aaaa" is fewer tokens), and the prompt tokens
    of that history plus a next question, as its author sends it back."""
    [a] = model.tokenize("a")
    messages: list[dict] = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=REPLY_TOKENS, temperature=0, logit_bias={str(a): 100})
    text = reply.choices[0].message.content
    assert text == "a" * REPLY_TOKENS and reply.usage.completion_tokens == REPLY_TOKENS
    assert len(model.tokenize(text)) < REPLY_TOKENS  # the text alone would lose the model's spelling
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Again."}]
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
    # Its author's history comes back with the exact ids: the prompt and the reply are cached
    # (but the reply's last token, sampled and never evaluated).
    assert again.usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens + REPLY_TOKENS - 1
    return messages, again.usage.prompt_tokens


def test_a_reply_sent_back_by_another_key_does_not_get_its_exact_ids(
    tenants: tuple[OpenAI, OpenAI], qwen_model: Model
) -> None:
    alice, bob = tenants
    history, alice_prompt = non_canonical_reply(alice, qwen_model, f"Say a. ({uuid.uuid4()})")
    # Bob re-sends Alice's reply as if it were his: he gets the text's own tokens, so he
    # cannot tell from prompt_tokens (or cached tokens) that Alice received that exact reply.
    probe = bob.chat.completions.create(model=MODEL, messages=history, max_tokens=1, temperature=0)
    canonical = len(qwen_model.tokenize("a" * REPLY_TOKENS))
    assert probe.usage.prompt_tokens == alice_prompt - REPLY_TOKENS + canonical
    assert probe.usage.prompt_tokens_details.cached_tokens == 0


def test_another_key_remembering_many_replies_does_not_evict_yours(
    tenants: tuple[OpenAI, OpenAI], qwen_model: Model, small_memory: GeneratedTokenMemory
) -> None:
    alice, bob = tenants
    history, alice_prompt = non_canonical_reply(alice, qwen_model, f"Say a. ({uuid.uuid4()})")
    for i in range(2 * small_memory.max_entries):  # more replies than the memory keeps per tenant
        bob.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=2, temperature=0)
    again = alice.chat.completions.create(model=MODEL, messages=history, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens == alice_prompt  # still her exact ids
    assert small_memory.nbytes > 0  # the memory of the app's chat runtime holds them
