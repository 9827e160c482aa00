"""The server's default temperature (`ServerSettings.temperature`, ``kvchat serve
--temperature``): what a request that sets no temperature samples with, on the chat,
text, Messages and Responses routes; a request's own temperature still wins.
Coding agents (Codex CLI, Claude Code) never send one."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest
from http_server import RunningServer
from openai import OpenAI

from kvchat import Engine
from kvchat.server import ServerSettings, create_app

pytestmark = pytest.mark.model

MODEL = "gemma-greedy"
PROMPT = "My favourite recipe for pancakes:"
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def server(cold_engine: Engine) -> Iterator[RunningServer]:
    # No prefix cache on this engine: every run of a prompt evaluates the same batches,
    # so greedy runs are token for token the same.
    with RunningServer(create_app(cold_engine, ServerSettings(model_name=MODEL, temperature=0))) as running:
        yield running


@pytest.fixture
def client(server: RunningServer, idle_cold_engine: Engine) -> OpenAI:
    return server.client()


def test_a_chat_without_temperature_is_greedy_and_one_with_it_samples(client: OpenAI) -> None:
    def chat(seed: int, **options: float) -> str:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, seed=seed, **options
        )
        return reply.choices[0].message.content or ""

    greedy = chat(0, temperature=0)
    assert greedy
    assert [chat(seed) for seed in SEEDS] == [greedy] * len(SEEDS)  # the seed does not matter: greedy
    # A request's own temperature wins over the server's: three seeds at 2 do not all give the greedy text.
    assert {chat(seed, temperature=2) for seed in SEEDS} != {greedy}


def test_a_text_completion_without_temperature_is_greedy(client: OpenAI) -> None:
    def complete(**options: float) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **options).choices[0].text

    greedy = complete(temperature=0)
    assert [complete(seed=seed) for seed in SEEDS] == [greedy] * len(SEEDS)


def test_the_responses_api_reports_and_uses_the_servers_temperature(client: OpenAI) -> None:
    unset = [client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=12) for _ in SEEDS]
    assert [response.temperature for response in unset] == [0.0] * len(SEEDS)
    assert len({response.output_text for response in unset}) == 1
    assert client.responses.create(model=MODEL, input=PROMPT, max_output_tokens=12, temperature=1.5).temperature == 1.5


def test_a_message_without_temperature_is_greedy(server: RunningServer, idle_cold_engine: Engine) -> None:
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused")

    def message(**options: float) -> str:
        # (this SDK's create() has no temperature argument: it goes in the body as is)
        reply = claude.messages.create(
            model=MODEL, max_tokens=12, messages=[{"role": "user", "content": PROMPT}], extra_body=options
        )
        return "".join(block.text for block in reply.content if block.type == "text")

    greedy = message(temperature=0)
    assert [message() for _ in SEEDS] == [greedy] * len(SEEDS)
