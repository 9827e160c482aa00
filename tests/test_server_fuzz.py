"""Schemathesis against the real server's ``/openapi.json``: generated requests to
every operation never get a 5xx, and every refusal is OpenAI-shaped.

Bounded for CI (a few dozen examples per operation, small replies); the
reliability benchmark runs it with more. Besides the generated requests, every
run sends explicit ones that once broke servers: chats and completions without
``max_tokens`` (about half of the generated ones drop it too; the fuzz engine's
`open_max_tokens` bounds them), and ``response_format`` / tool schemas with
counts in the hundred thousands (``maxItems``, ``minLength``, ``{100000}``) that a
naive grammar expands into a grammar of that size (llama.cpp's GBNF parser, which
kvchat no longer uses for request grammars, overflowed its stack on them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from http_server import RunningServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from kvchat import Engine, EngineSettings
from kvchat.server import ServerSettings, create_app

MODEL = "gemma-fuzz"
EXAMPLES = int(os.environ.get("KVCHAT_FUZZ_EXAMPLES", "15"))


LARGE_COUNT_SCHEMAS = [
    {"type": "array", "items": {"type": "integer"}, "minItems": 100_000, "maxItems": 100_000},
    {"type": "array", "items": {"type": "string"}, "maxItems": 100_000},
    {"type": "string", "minLength": 100_000},
    {"type": "string", "maxLength": 100_000},
    {"type": "string", "pattern": "^a{100000}$"},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 1000}, "maxItems": 1000},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 100_000},
                                               "minItems": 3, "maxItems": 100_000}},
     "required": ["tags"]},
]
"""JSON schemas whose counts a grammar must not expand one by one."""

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "List many numbers as JSON."}]}
EXPLICIT_BODIES = {
    "POST /v1/chat/completions": [
        CHAT,  # no max_tokens: runs until the engine's open_max_tokens
        # One token each: the grammar is built and used.
        *({**CHAT, "max_tokens": 1,
           "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}}
          for schema in LARGE_COUNT_SCHEMAS),
        *({**CHAT, "max_tokens": 1, "tool_choice": "required", "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"x": schema}, "required": ["x"]}}}]}
          for schema in LARGE_COUNT_SCHEMAS[:2]),
    ],
    "POST /v1/completions": [
        {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": None},  # null: until open_max_tokens
        {"model": MODEL, "prompt": ["a", "b"], "max_tokens": None},
        # Ids outside the vocabulary, echoed: llama.cpp aborts the process if one reaches it.
        {"model": MODEL, "prompt": [2, 10**9], "echo": True, "max_tokens": 1},
        {"model": MODEL, "prompt": [[-1], [2]], "echo": True, "max_tokens": 1},
    ],
    "POST /v1/embeddings": [
        {"model": MODEL, "input": ["word " * 50] * 4},
    ],
}
"""Requests every run sends, whatever the generator draws (positive mode)."""


@pytest.fixture(scope="module")
def fuzz_server(gemma_model) -> Iterator[RunningServer]:
    # Every request is small by the settings: at most 16 tokens generated (8 without max_tokens), at most
    # 16 texts and 1024 tokens embedded; one that still passed the time limit would be a 504, a failure here.
    engine_settings = EngineSettings(n_ctx=1024, max_running=4, n_seq_max=8, open_max_tokens=8)
    with Engine(gemma_model, engine_settings) as engine:
        settings = ServerSettings(model_name=MODEL, max_tokens_limit=16, request_timeout=60,
                                  max_embedding_inputs=16, max_embedding_tokens=1024)
        app = create_app(engine, settings)
        with RunningServer(app) as running:
            yield running


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_server_errors(fuzz_server: RunningServer, mode: GenerationMode) -> None:
    """Every operation, with requests that follow the schema (positive) or break it (negative)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                               "POST /v1/embeddings", "GET /v1/models", "GET /metrics"}
    if mode is GenerationMode.NEGATIVE:  # GETs without parameters have nothing to break
        operations = [op for op in operations if op.method.upper() == "POST"]
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode), open_ended=st.booleans())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case, open_ended: bool) -> None:
            if isinstance(case.body, dict) and "model" in case.body and mode is GenerationMode.POSITIVE:
                case.body["model"] = MODEL  # get past the model check to the deeper paths
                if open_ended and operation.label == "POST /v1/chat/completions":
                    case.body.pop("max_tokens", None)
                    case.body.pop("max_completion_tokens", None)
                elif open_ended and operation.label == "POST /v1/completions":
                    case.body["max_tokens"] = None  # unset would mean 16
            response = case.call(base_url=fuzz_server.url, timeout=120)
            assert response.status_code < 500, f"{operation.label}: {response.status_code} {response.text}"
            if response.status_code >= 400 and operation.path.startswith("/v1/messages"):  # Anthropic's shape
                body = response.json()
                assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
            elif response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}

        if mode is GenerationMode.POSITIVE:
            for body in EXPLICIT_BODIES.get(operation.label, []):
                check = example(case=operation.Case(body=body, media_type="application/json"), open_ended=False)(check)
        check()
