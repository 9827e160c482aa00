"""Schemathesis against the real server's ``/openapi.json``: generated requests to
every operation never get a 5xx, and every refusal is OpenAI-shaped.

Bounded for CI (a few dozen examples per operation, small replies); the
reliability benchmark runs it with more.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from http_server import RunningServer
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from kvchat import Engine, EngineSettings
from kvchat.server import ServerSettings, create_app

MODEL = "gemma-fuzz"
EXAMPLES = int(os.environ.get("KVCHAT_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_server(gemma_model) -> Iterator[RunningServer]:
    engine_settings = EngineSettings(n_ctx=1024, max_running=4, n_seq_max=8, open_max_tokens=8)
    with Engine(gemma_model, engine_settings) as engine:
        app = create_app(engine, ServerSettings(model_name=MODEL, max_tokens_limit=16, request_timeout=60))
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

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            if isinstance(case.body, dict) and "model" in case.body and mode is GenerationMode.POSITIVE:
                case.body["model"] = MODEL  # get past the model check to the deeper paths
            response = case.call(base_url=fuzz_server.url, timeout=120)
            assert response.status_code < 500, f"{operation.label}: {response.status_code} {response.text}"
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}

        check()
