"""Structured output through the real server, at the extremes of what the API accepts
(issue 29): every schema and pattern is answered with a result or a typed error, the
engine stays idle afterwards, no engine step is held long, and another client's
request is not held back.

Bounds stated here (the engine's own step timings, `Engine.step_timings`):

- `SAMPLING_CPU_BOUND`: while hostile structured requests ran, no engine step spent
  more than 0.25 s of the worker thread's CPU time picking tokens (samplers and
  grammars: llama.cpp's GBNF sampler spent seconds per token on
  ``(a?){1000}(a?){1000}``; llguidance's masks for these grammars take under 1 ms,
  the first of a 400,000-character ``const`` about 100 ms), and no step took longer
  than `STEP_BOUND`, 2 s, of wall time (a plain Gemma step here takes 5-40 ms; a busy
  machine stretches it);
- `PLAIN_BOUND`: a plain 8-token chat sent alongside a hostile request finishes within
  15 s (alone: about 0.2 s; before llguidance: no answer in 300 s).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import jsonschema
import pytest
from helpers import assert_idle
from http_server import RunningServer, ServeProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvchat import Engine, EngineSettings
from kvchat.llama import Model
from kvchat.server import ServerSettings, create_app

MODEL = "gemma-structured"
STEP_BOUND = 2.0
SAMPLING_CPU_BOUND = 0.25
PLAIN_BOUND = 15.0


@pytest.fixture(scope="module")
def engine(gemma_model: Model) -> Iterator[Engine]:
    settings = EngineSettings(n_ctx=4096, max_running=4, n_seq_max=8, open_max_tokens=16)
    with Engine(gemma_model, settings) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[RunningServer]:
    with RunningServer(create_app(engine, ServerSettings(model_name=MODEL, max_tokens_limit=512))) as server:
        yield server


def chat(server: RunningServer, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Answer in JSON."}], **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def schema_format(schema: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


class PlainRequest:
    """A plain 8-token chat from another client, sent while something else runs."""

    def __init__(self, server: RunningServer) -> None:
        self.seconds: float | None = None
        self.response: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, args=(server,))

    def _run(self, server: RunningServer) -> None:
        started = time.perf_counter()
        self.response = chat(server, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
        self.seconds = time.perf_counter() - started

    def __enter__(self) -> PlainRequest:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join(timeout=120)

    def assert_served_in_time(self) -> None:
        assert self.response is not None and self.response.status_code == 200, self.response
        assert self.response.json()["usage"]["completion_tokens"] >= 1
        assert self.seconds is not None and self.seconds < PLAIN_BOUND


# -- strategies: patterns and schemas from the whole range the API accepts -------------------------

COUNTS = st.one_of(st.integers(0, 5), st.integers(0, 10**6), st.sampled_from([1000, 100_000, 10**6]))
GOOD_ATOMS = st.sampled_from(["a", "b", "x" * 200, "\\x00", "\\d", "\\w", ".", "[a-z]", "é", "\\u00ff", "\\n", "\\\\"])
BAD_ATOMS = st.sampled_from(["[^\\s\\S]", "(?=a)", "(a)\\1", "[", ")", "a{2,1}"])
"""No match possible, or not a regex llguidance takes (lookaround, backreferences)."""
ATOMS = st.one_of(*[GOOD_ATOMS] * 6, BAD_ATOMS)


def quantified(atom: str, draw) -> str:
    kind = draw(st.sampled_from(["", "?", "*", "+", "{n}", "{n,}", "{n,m}"]))
    n = draw(COUNTS)
    return atom + kind.replace("{n,m}", f"{{{n},{n + draw(COUNTS)}}}").replace("n", str(n))


@st.composite
def patterns(draw, depth: int = 2) -> str:
    pieces = []
    for _ in range(draw(st.integers(1, 4))):
        if depth and draw(st.booleans()):
            inner = "|".join(draw(st.lists(patterns(depth - 1), min_size=1, max_size=3)))
            pieces.append(quantified(f"({inner})", draw))
        else:
            pieces.append(quantified(draw(ATOMS), draw))
    anchored = draw(st.booleans())
    return ("^" if anchored else "") + "".join(pieces) + ("$" if anchored else "")


SMALL = st.integers(0, 10)
BIG = st.one_of(SMALL, SMALL, SMALL, st.integers(0, 10**6), st.just(10**30))
SPAN = st.one_of(SMALL, SMALL, SMALL, st.integers(0, 10**6), st.just(10**30), st.integers(-5, -1))
"""How far a maximum lies above its minimum: now and then below it (no value fits)."""
leaves = st.one_of(
    st.builds(lambda p: {"type": "string", "pattern": p}, patterns()),
    st.builds(lambda lo, span: {"type": "string", "minLength": lo, "maxLength": max(lo + span, 0)}, BIG, SPAN),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-10**20, 10**20), SPAN),
    st.builds(lambda lo: {"type": "number", "exclusiveMinimum": lo}, st.floats(-1e300, 1e300)),
    st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"type": "string", "format": "date-time"},
                     {"type": "string", "format": "uuid"}, True, False, {}]),
    st.builds(lambda values: {"enum": values}, st.lists(st.text(max_size=300), max_size=50)),
    st.builds(lambda value: {"const": value}, st.text(max_size=2000)),
)


def composite(children):
    keys = st.text(alphabet="abcé\U0001f600_", min_size=1, max_size=8)
    return st.one_of(
        st.builds(lambda items, lo, span: {"type": "array", "items": items, "minItems": lo,
                                           "maxItems": max(lo + span, 0)},
                  children, BIG, SPAN),
        st.builds(lambda props, extra, n: {"type": "object", "properties": props, "required": list(props)[:n],
                                           "additionalProperties": extra},
                  st.dictionaries(keys, children, max_size=5), st.booleans(), st.integers(0, 5)),
        st.builds(lambda options: {"anyOf": options}, st.lists(children, min_size=1, max_size=4)),
        st.builds(lambda options: {"allOf": options}, st.lists(children, min_size=1, max_size=3)),
    )


SCHEMAS = st.recursive(leaves, composite, max_leaves=12)


def assert_answered_or_refused(response: httpx.Response, schema: object) -> None:
    """A 200 whose finished output is valid under `schema`, or a typed 400 naming the field."""
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["param"] == "response_format" and error["message"], error
        return
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    if choice["finish_reason"] == "stop":  # a whole document: it follows the schema
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


# -- the properties -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, max_tokens=st.sampled_from([None, 1, 8]))
def test_any_schema_is_answered_or_refused_and_another_client_is_served(
    server: RunningServer, engine: Engine, schema: object, max_tokens: int | None
) -> None:
    with PlainRequest(server) as plain:
        # The default temperature, and no max_tokens in a third of the draws (the engine's
        # open_max_tokens, 16, bounds those).
        response = chat(server, response_format=schema_format(schema), max_tokens=max_tokens)
    assert_answered_or_refused(response, schema)
    plain.assert_served_in_time()
    assert_idle(engine)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(pattern=patterns())
def test_any_pattern_is_answered_or_refused_streamed_too(server: RunningServer, engine: Engine, pattern: str) -> None:
    schema = {"type": "string", "pattern": pattern}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Answer."}], "max_tokens": 8, "stream": True,
            "response_format": schema_format(schema)}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as response:
        if response.status_code == 400:  # refused before the stream started
            assert json.loads(response.read())["error"]["param"] == "response_format"
            return
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors:  # failed while decoding: a typed error event, naming the field
        assert errors[0]["param"] == "response_format"
    else:
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        assert finish[-1] in ("stop", "length")
    assert_idle(engine)


# -- the reproductions of the issue, through the official client ----------------------------------

HOSTILE = [
    {"type": "string", "pattern": "(a?){1000}(a?){1000}"},
    {"type": "string", "pattern": "^" + "(a?){1000}" * 16 + "$"},
    {"type": "string", "pattern": "^(" + "|".join(f"w{i}" for i in range(1000)) + ")*$"},
    {"type": "string", "pattern": "(" + "x" * 100_000 + "){1000}"},
    {"enum": ["x" * 200] * 6000},  # 1.2 MB of grammar: refused by its length
    {"enum": [f"{i:0200d}" for i in range(3000)]},
    {"const": "ab" * 200_000},
]


def test_the_nul_pattern_gets_its_only_document_and_the_server_goes_on(server: RunningServer, engine: Engine) -> None:
    """The schema that ended the process through llama.cpp's "Unexpected empty grammar
    stack": satisfiable after all (by the JSON string holding one NUL, ``"\\u0000"``)."""
    client = server.client()
    schema = {"type": "string", "pattern": "^\\x00$"}
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           response_format=schema_format(schema))
    assert json.loads(reply.choices[0].message.content) == "\x00"
    assert reply.usage.completion_tokens_details.forced_tokens >= 1  # all but the opening quote were forced
    with PlainRequest(server) as plain:
        pass
    plain.assert_served_in_time()
    assert_idle(engine)


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "[^\\s\\S]"},
    {"type": "string", "pattern": "^a$", "minLength": 5},
    {"type": "array", "minItems": 3, "maxItems": 1},
    {"type": "object", "properties": {"a": False}, "required": ["a"]},
    {"enum": []},
], ids=["empty-class", "pattern-vs-length", "items", "false-property", "empty-enum"])
def test_a_schema_no_document_satisfies_is_a_400_streamed_or_not(server: RunningServer, schema: dict) -> None:
    client = server.client()
    for stream in (False, True):
        with pytest.raises(Exception) as info:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           response_format=schema_format(schema), stream=stream)
        assert info.value.status_code == 400
        assert info.value.body["param"] == "response_format"
        assert "nsatisfiable" in info.value.body["message"]


@pytest.mark.parametrize("schema", HOSTILE, ids=["optional-2000", "optional-16000", "alternatives-1000",
                                                 "literal-100k-x1000", "enum-6000", "enum-3000", "const-400k"])
def test_a_hostile_pattern_holds_no_step_and_no_other_client(
    server: RunningServer, engine: Engine, schema: dict
) -> None:
    """The watchdog: while a hostile structured request runs next to a plain one, every
    engine step stays under `SAMPLING_CPU_BOUND` and `STEP_BOUND` (the engine's own
    step timings). A grammar over the text bound is refused before it is compiled."""
    started = time.perf_counter()
    with PlainRequest(server) as plain:
        reply = chat(server, response_format=schema_format(schema), max_tokens=48, temperature=0)
    plain.assert_served_in_time()
    steps = [step for step in engine.step_timings() if step.started >= started]
    assert steps  # the plain request's, and the hostile one's if it ran
    sampling = sorted(step.sampling_cpu_seconds for step in steps)
    assert sampling[-1] < SAMPLING_CPU_BOUND, sampling[-5:]
    walls = sorted(step.seconds for step in steps)
    assert walls[-1] < STEP_BOUND, walls[-5:]
    if reply.status_code == 400:
        assert reply.json()["error"]["param"] == "response_format"
    else:
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    assert_idle(engine)


@pytest.mark.system
def test_sigterm_stops_the_server_within_5_seconds_during_a_hostile_request(tmp_path) -> None:
    """At the default shutdown grace (3 s): requests in flight, streamed or not, are
    answered `server_shutdown` and the process is gone within 5 s of SIGTERM."""
    env = {"KVCHAT_MODEL": "gemma-3-270m", "KVCHAT_MODEL_NAME": MODEL, "KVCHAT_CTX_SIZE": "4096"}
    hostile = {"model": MODEL, "messages": [{"role": "user", "content": "Write the letter a many times."}],
               "max_tokens": 3000, "temperature": 0,
               "response_format": schema_format({"type": "string", "pattern": "(a?){1000}(a?){1000}"})}
    long_plain = {"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 3000, "temperature": 0}
    answers: dict[str, httpx.Response | Exception] = {}

    def send(name: str, path: str, body: dict) -> None:
        try:
            answers[name] = httpx.post(f"{served.url}{path}", json=body, timeout=60)
        except httpx.TransportError as exc:
            answers[name] = exc

    with ServeProcess(env=env, log_path=str(tmp_path / "serve.log")) as served:
        threads = [threading.Thread(target=send, args=("hostile", "/v1/chat/completions", hostile)),
                   threading.Thread(target=send, args=("plain", "/v1/completions", long_plain))]
        for thread in threads:
            thread.start()
        time.sleep(3)  # both run (3,000 tokens take far longer)
        started = time.monotonic()
        served.signal(signal.SIGTERM)
        returncode = served.wait(timeout=30)
        stopped_after = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=30)
    assert stopped_after < 5, served.log()
    assert returncode == -signal.SIGTERM, served.log()
    plain = answers["plain"]
    assert isinstance(plain, httpx.Response) and plain.status_code == 503, plain
    assert plain.json()["error"]["code"] == "server_shutdown"


def test_forced_tokens_ride_along_only_while_the_request_runs_alone(engine: Engine) -> None:
    """A forced run is evaluated like a prompt: next to another decoding request it
    would slow that one down, so it is appended only while the request is alone."""
    from kvchat import Grammar, SamplingParams

    grammar = Grammar.json_schema({"const": "ab" * 500})
    prompt = engine.model.tokenize("JSON:", add_special=True)
    alone = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=400, grammar=grammar)).collect()
    assert alone.usage.forced_tokens > alone.usage.completion_tokens / 2  # all but a few picks
    # A neighbour that cannot end before its max_tokens, whose grammar forces nothing and
    # whose drawn letters no draft predicts (it decodes one token a step, for seconds).
    neighbour = engine.submit(engine.model.tokenize("1, 2, 3,", add_special=True), SamplingParams(
        temperature=1.5, seed=7, max_tokens=2000, grammar=Grammar.regex("[a-z]{5000}")))
    chunks = iter(neighbour)  # kept: a dropped iterator cancels its stream
    next(chunks)  # decoding
    shared = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=40, grammar=grammar)).collect()
    neighbour.cancel()
    assert list(chunks)[-1].usage.finish_reason == "cancelled"  # it decoded all along
    assert shared.usage.forced_tokens == 0
    assert shared.text == alone.text[: len(shared.text)]  # the same output, one token a step
    assert_idle(engine)
