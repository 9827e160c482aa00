"""Predicted outputs over HTTP (OpenAI's ``prediction``), speculation's usage details and
metrics, and the ``--speculation`` option of ``kvchat serve`` and ``kvchat chat``.

The first part needs no model: the ``prediction`` schema, the usage's shape, the
metrics collector and the CLI options (typer run in process, the server and the
engine replaced). The second runs a real uvicorn on 127.0.0.1 over Qwen2.5-Coder
0.5B with the official `openai` client, on an engine of its own without prefix
cache (llama.cpp's logits differ slightly between batch shapes, and the replies
compared here must be made the same way; the prompt asks to repeat code, whose
reply has clear margins).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, replace
from types import SimpleNamespace

import httpx
import openai
import pytest
from helpers import assert_idle
from http_server import RunningServer
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from kvchat import Engine, EngineSettings
from kvchat.cli import app as cli_app
from kvchat.cli.chat import speculation_line
from kvchat.cli.runtime import Runtime
from kvchat.engine import EngineStats, Usage
from kvchat.engine.sampling import MAX_PREDICTION_TOKENS
from kvchat.errors import InvalidRequestError
from kvchat.llama import Model
from kvchat.server import create_app
from kvchat.server.metrics import ServerMetrics
from kvchat.server.routes.common import openai_usage
from kvchat.server.schemas import ChatCompletionRequest

MODEL = "qwen-predict"

CODE = '''def moving_average(values, window):
    """Return the moving averages of values over window."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''

REPEAT_CODE = [
    {"role": "system", "content": "You are a helpful coding assistant."},
    {"role": "user", "content": f"Repeat this code exactly, in a python code block:\n```python\n{CODE}```"},
]

UNRELATED = "The quick brown fox jumps over the lazy dog. " * 8


# -- the schema, the usage and the metrics (no model) ------------------------------------


def request(prediction: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], prediction=prediction)


@pytest.mark.parametrize(
    "prediction, text",
    [
        (None, None),
        ({"type": "content", "content": CODE}, CODE),
        ({"type": "content", "content": [{"type": "text", "text": "def f("}, {"type": "text", "text": "): ..."}]},
         "def f(): ..."),
        ({"type": "content", "content": []}, ""),
    ],
    ids=["none", "text", "parts", "no-parts"],
)
def test_prediction_text_of_a_valid_prediction(prediction: object, text: str | None) -> None:
    assert request(prediction).prediction_text() == text


@pytest.mark.parametrize(
    "prediction",
    [
        {"type": "file", "content": CODE},
        {"content": CODE},
        {"type": "content"},
        {"type": "content", "content": 7},
        {"type": "content", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"type": "content", "content": [{"type": "text", "text": 7}]},
        {"type": "content", "content": ["text"]},
    ],
    ids=["wrong-type", "no-type", "no-content", "number", "image-part", "number-part", "bare-string-part"],
)
def test_any_other_prediction_is_an_invalid_request_about_it(prediction: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        request(prediction).prediction_text()
    assert info.value.field == "prediction"


def test_usage_reports_the_drafts_as_prediction_tokens() -> None:
    usage = Usage(prompt_tokens=20, cached_tokens=5, evaluated_tokens=15, completion_tokens=30,
                  time_to_first_token=0.1, finish_reason="stop", draft_tokens=24, accepted_draft_tokens=18)
    assert openai_usage(usage)["completion_tokens_details"] == {
        "reasoning_tokens": 0, "accepted_prediction_tokens": 18, "rejected_prediction_tokens": 6,
        "forced_tokens": 0}
    assert openai_usage(replace(usage, draft_tokens=0, accepted_draft_tokens=0))["completion_tokens_details"] == {
        "reasoning_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        "forced_tokens": 0}


def engine_stats(**values: int) -> EngineStats:
    return EngineStats(**{f.name: values.get(f.name, 0) for f in fields(EngineStats)})


def test_metrics_export_the_draft_counters_and_the_ngram_cache() -> None:
    stats = engine_stats(draft_tokens=40, accepted_draft_tokens=30, ngram_cache_entries=12, ngram_cache_bytes=3400)
    text = ServerMetrics(SimpleNamespace(stats=lambda: stats)).render().decode()
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["kvchat_draft_tokens_total"] == 40
    assert samples["kvchat_accepted_draft_tokens_total"] == 30
    assert samples["kvchat_ngram_cache_entries"] == 12 and samples["kvchat_ngram_cache_bytes"] == 3400


def test_chat_stats_line_shows_the_acceptance() -> None:
    line = speculation_line(engine_stats(draft_tokens=40, accepted_draft_tokens=30))
    assert line == "speculation: drafted 40 · accepted 30 · acceptance 75%"
    assert speculation_line(engine_stats()).endswith("acceptance 0%")


# -- the --speculation option (typer in process, nothing loaded) ---------------------------


@pytest.mark.parametrize("args, env, expected", [
    ([], {}, "auto"),
    (["--speculation", "off"], {}, "off"),
    ([], {"KVCHAT_SPECULATION": "off"}, "off"),
])
def test_serve_passes_speculation_to_the_engine(args: list[str], env: dict, expected: str) -> None:
    seen: dict = {}
    runtime = Runtime(serve=lambda model, **options: seen.update(options))
    result = CliRunner().invoke(cli_app, ["serve", *args], env=env, obj=runtime)
    assert result.exit_code == 0, result.output
    assert seen["engine_settings"].speculation == expected


class FakeEngine:
    """Stands in for the engine `kvchat chat` opens (`Runtime.open_engine`): keeps its settings."""

    def __init__(self, model: object, settings: EngineSettings) -> None:
        self.settings = settings

    def __enter__(self) -> FakeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize("args, expected", [([], "auto"), (["--speculation", "off"], "off")])
def test_chat_passes_speculation_to_the_engine(args: list[str], expected: str) -> None:
    opened: list[FakeEngine] = []

    def open_engine(model: object, settings: EngineSettings) -> FakeEngine:
        opened.append(FakeEngine(model, settings))
        return opened[-1]

    runtime = Runtime(open_engine=open_engine, resolve_model=lambda name: name)
    result = CliRunner().invoke(cli_app, ["chat", *args], input="/quit\n", obj=runtime)
    assert result.exit_code == 0, result.output
    (engine,) = opened
    assert engine.settings.speculation == expected


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_an_unknown_speculation_mode_is_a_usage_error(command: str) -> None:
    result = CliRunner().invoke(cli_app, [command, "--speculation", "sometimes"])
    assert result.exit_code == 2 and "sometimes" in result.output


# -- over HTTP, on the real model ------------------------------------------------------


@pytest.fixture(scope="module")
def engine(qwen_model: Model) -> Iterator[Engine]:
    settings = EngineSettings(n_ctx=4096, max_running=4, n_seq_max=4, prefix_cache=False, speculation="auto")
    with Engine(qwen_model, settings) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[RunningServer]:
    with RunningServer(create_app(engine, model_name=MODEL)) as running:
        yield running


@pytest.fixture
def client(server: RunningServer, engine: Engine) -> Iterator[OpenAI]:
    yield server.client()
    assert_idle(engine)


def repeat_code(client: OpenAI, **options):
    return client.chat.completions.create(
        model=MODEL, messages=REPEAT_CODE, temperature=0, max_tokens=64, **options)


@pytest.fixture(scope="module")
def plain_reply(server: RunningServer) -> str:
    """The reply without a prediction (drafts from the prompt may still be verified)."""
    content = repeat_code(server.client()).choices[0].message.content
    assert content and "moving_average" in content
    return content


PARTS = [{"type": "text", "text": CODE[:200]}, {"type": "text", "text": CODE[200:]}]


@pytest.mark.parametrize("content", [CODE, PARTS], ids=["text", "parts"])
def test_a_prediction_is_accepted_and_changes_nothing_in_the_reply(
    client: OpenAI, plain_reply: str, content: object
) -> None:
    reply = repeat_code(client, prediction={"type": "content", "content": content})
    assert reply.choices[0].message.content == plain_reply
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0
    assert details.accepted_prediction_tokens <= reply.usage.completion_tokens
    assert details.reasoning_tokens == 0


def test_an_unrelated_prediction_changes_nothing_in_the_reply(client: OpenAI, plain_reply: str) -> None:
    reply = repeat_code(client, prediction={"type": "content", "content": UNRELATED})
    assert reply.choices[0].message.content == plain_reply
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 0 and details.rejected_prediction_tokens >= 0


def test_streamed_reply_with_a_prediction_reports_the_details(client: OpenAI, plain_reply: str) -> None:
    chunks = list(repeat_code(client, prediction={"type": "content", "content": CODE}, stream=True,
                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain_reply
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens_details.accepted_prediction_tokens > 0
    assert usage.completion_tokens_details.rejected_prediction_tokens >= 0


@pytest.mark.parametrize("prediction", [
    {"type": "file", "content": CODE},
    {"type": "content", "content": [{"type": "text", "text": 7}]},
    {"type": "content", "content": " a" * (MAX_PREDICTION_TOKENS + 100)},
], ids=["wrong-type", "bad-part", "too-long"])
def test_a_bad_prediction_gets_an_openai_shaped_400(client: OpenAI, server: RunningServer, prediction: dict) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        repeat_code(client, prediction=prediction)
    assert info.value.status_code == 400 and info.value.body["param"] == "prediction"
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": REPEAT_CODE, "max_tokens": 4, "prediction": prediction})
    error = response.json()["error"]
    assert response.status_code == 400 and set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and "prediction" in error["message"]


def test_text_completion_usage_has_the_details_and_metrics_count_drafts(
    client: OpenAI, server: RunningServer, plain_reply: str
) -> None:
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=16, temperature=0)
    details = reply.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 0 and details.rejected_prediction_tokens >= 0
    text = httpx.get(f"{server.url}/metrics").text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["kvchat_draft_tokens_total"] >= samples["kvchat_accepted_draft_tokens_total"] > 0
    assert samples["kvchat_ngram_cache_entries"] > 0
