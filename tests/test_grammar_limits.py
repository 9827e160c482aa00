"""Grammars on llguidance, at the extremes of what a request can send (issue 29).

Every grammar a request brings (a `response_format` schema, a forced tool call's schemas,
raw GBNF) is compiled by llguidance within `GRAMMAR_LIMITS`: it either compiles or is
refused with an `InvalidRequestError` naming the request field, before anything is
queued. The schemas and grammars here each crashed, stalled or exhausted the server when
they went to llama.cpp's GBNF sampler (a segmentation fault for `"maxItems": 100000`,
`std::terminate` for `^\\x00$`, seconds per token for `(a?){1000}(a?){1000}`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import assert_idle

from kvchat import Engine, Grammar, GrammarError, InvalidRequestError, SamplingParams
from kvchat.chat.response_format import grammar_for_response_format
from kvchat.chat.tool_calls import HERMES
from kvchat.chat.tool_requests import tool_call_grammar
from kvchat.engine.grammar import MAX_GRAMMAR_TEXT
from kvchat.llama import Model


def nested(depth: int, leaf: dict, kind: str = "object") -> dict:
    schema = leaf
    for _ in range(depth):
        schema = ({"type": "object", "properties": {"a": schema}, "required": ["a"]} if kind == "object"
                  else {"type": "array", "items": schema})
    return schema


HOSTILE_SCHEMAS = [
    pytest.param({"type": "string", "pattern": "^\\x00$"}, id="nul-pattern"),
    pytest.param({"type": "string", "pattern": "(a?){1000}(a?){1000}"}, id="optional-groups-2000"),
    pytest.param({"type": "string", "pattern": "^" + "(a?){1000}" * 16 + "$"}, id="optional-groups-16000"),
    pytest.param({"type": "array", "items": {"type": "integer"}, "maxItems": 100_000}, id="maxItems-100000"),
    pytest.param({"type": "array", "items": {"type": "integer"}, "minItems": 100_000}, id="minItems-100000"),
    pytest.param({"type": "string", "minLength": 10**6}, id="minLength-million"),
    pytest.param({"type": "string", "maxLength": 10**30}, id="maxLength-10^30"),
    pytest.param({"type": "string", "pattern": "^a{0,1000000}$"}, id="quantifier-million"),
    pytest.param({"type": "string", "pattern": "(" + "x" * 100_000 + "){1000}"}, id="literal-100k-times-1000"),
    pytest.param({"type": "string", "pattern": "^(" + "|".join(f"w{i}" for i in range(1000)) + ")*$"},
                 id="1000-alternatives-under-star"),
    pytest.param({"enum": ["x" * 200] * 6000}, id="enum-6000"),
    pytest.param({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}},
                 id="2000-optional-properties"),
    pytest.param(nested(60, {"type": "integer"}), id="nesting-60"),
    pytest.param(nested(5000, {"type": "integer"}, "array"), id="nesting-5000"),
    pytest.param({"const": "ab" * 200_000}, id="const-400k-characters"),
    pytest.param({"type": "string", "pattern": "^\ud800$"}, id="lone-surrogate"),
]


def submit_or_refuse(engine: Engine, grammar: Grammar | None, max_tokens: int = 8) -> str:
    """Submit a short request under `grammar`: "refused" (typed error at submission), or
    the finish reason (or "grammar error") of the request, which ran to its end."""
    prompt = engine.model.tokenize("<|im_start|>user\nReply in JSON.<|im_end|>\n<|im_start|>assistant\n",
                                   parse_special=True)
    try:
        stream = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, grammar=grammar))
    except InvalidRequestError as exc:
        assert exc.field in ("response_format", "tools", "grammar")
        return "refused"
    try:
        return stream.collect().usage.finish_reason
    except GrammarError:
        return "grammar error"


@pytest.mark.parametrize("schema", HOSTILE_SCHEMAS)
def test_a_hostile_response_format_schema_is_served_or_refused(qwen_engine: Engine, schema: dict) -> None:
    try:
        grammar = grammar_for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    except InvalidRequestError as exc:
        assert exc.field == "response_format"
    else:
        assert submit_or_refuse(qwen_engine, grammar) in ("refused", "stop", "length", "grammar error")
    assert_idle(qwen_engine)


@pytest.mark.parametrize("schema", HOSTILE_SCHEMAS)
def test_a_hostile_tool_schema_is_served_or_refused(qwen_engine: Engine, schema: dict) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": schema}, "required": ["x"]}}}]
    try:
        grammar = tool_call_grammar(tools, name="f", format=HERMES)
    except InvalidRequestError as exc:
        assert exc.field == "tools"
    else:
        assert submit_or_refuse(qwen_engine, grammar) in ("refused", "stop", "length", "grammar error")
    assert_idle(qwen_engine)


def test_the_nul_pattern_that_ended_the_process_gives_its_only_answer(qwen_engine: Engine) -> None:
    grammar = grammar_for_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^\\x00$"}}})
    prompt = qwen_engine.model.tokenize("Hi", add_special=True)
    completion = qwen_engine.submit(prompt, SamplingParams(temperature=0, max_tokens=16, grammar=grammar)).collect()
    assert completion.text == '"\\u0000"'  # the one JSON document the schema allows
    assert completion.usage.finish_reason == "stop"
    assert completion.usage.forced_tokens == completion.usage.completion_tokens - 1  # all but the opening quote


# -- raw GBNF and grammar text ------------------------------------------------------------------


def gbnf_nest(depth: int) -> str:
    return "root ::= " + '("a" ' * depth + ")" * depth + "\n"


@pytest.mark.parametrize("grammar", [
    pytest.param(gbnf_nest(100_000), id="nesting-100000"),
    pytest.param("root ::= " + "(" * 100_000, id="unbalanced"),
    pytest.param("root ::= " + " | ".join(['"a"'] * 200_000), id="200000-alternatives"),
    pytest.param("root ::= " + '"a"? ' * 100_000, id="100000-optional"),
    pytest.param("root ::= x\n" + "".join(f"x{i} ::= x{i + 1} | \"a\"\n" for i in range(5000)), id="chain-5000"),
    pytest.param("root ::= [", id="does-not-parse"),
    pytest.param("rot ::= \"a\"", id="no-root"),
])
def test_raw_gbnf_is_converted_and_compiled_or_refused(qwen_engine: Engine, grammar: str) -> None:
    try:
        sampling_grammar = Grammar.gbnf(grammar)
    except InvalidRequestError as exc:
        assert exc.field == "grammar"
        return
    assert submit_or_refuse(qwen_engine, sampling_grammar, max_tokens=4) in ("refused", "stop", "length",
                                                                             "grammar error")
    assert_idle(qwen_engine)


def test_a_gbnf_string_in_sampling_params_is_converted() -> None:
    grammar = SamplingParams(grammar='root ::= "yes" | "no"').grammar
    assert isinstance(grammar, Grammar) and grammar.field == "grammar"


@pytest.mark.parametrize("make", [Grammar.gbnf, Grammar.lark, Grammar.regex])
def test_grammar_text_over_the_length_bound_is_refused(make) -> None:
    with pytest.raises(InvalidRequestError, match="limit is") as info:
        make("a" * (MAX_GRAMMAR_TEXT + 1), field="grammar")
    assert info.value.field == "grammar"


def test_a_schema_nested_past_the_parser_limit_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        Grammar.json_schema(nested(100_000, {"type": "integer"}))
    assert info.value.field == "response_format"


def test_a_grammar_no_output_can_start_is_refused_before_queueing(qwen_model: Model) -> None:
    with pytest.raises(InvalidRequestError) as info:
        Grammar.regex(r"[^\s\S]").matcher(qwen_model)  # a character class that holds nothing
    assert info.value.field == "grammar"


@pytest.mark.system
def test_the_requests_that_crashed_the_process_leave_it_serving() -> None:
    """In a child process (a crash there cannot take the test run down): the schema that
    made llama.cpp throw through ctypes and the grammars that overflowed its C stack."""
    script = textwrap.dedent("""
        from kvchat import Engine, EngineSettings, Grammar, GrammarError, InvalidRequestError, SamplingParams
        from kvchat.models import resolve
        grammars = [
            lambda: Grammar.json_schema({"type": "string", "pattern": "^\\\\x00$"}),
            lambda: Grammar.json_schema({"type": "array", "items": {"type": "integer"}, "maxItems": 100000}),
            lambda: Grammar.gbnf("root ::= " + '("a" ' * 100000 + ")" * 100000),
        ]
        with Engine(resolve("qwen2.5-coder-0.5b-instruct", progress=False), EngineSettings(n_ctx=512)) as engine:
            for make in grammars:
                try:
                    stream = engine.generate("hi", SamplingParams(max_tokens=8, temperature=0, grammar=make()))
                    print("served:", stream.collect().usage.finish_reason)
                except (InvalidRequestError, GrammarError) as exc:
                    print("refused:", exc.field)
            print("plain:", engine.generate("hi", SamplingParams(max_tokens=2)).collect().usage.completion_tokens)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the child process died ({done.returncode}):\n{done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == "plain: 2", done.stdout
    assert lines[0] == "served: stop", done.stdout
