"""Bounds on JSON schemas and GBNF grammars (issue 17): a schema or grammar that would exhaust
memory or time, or overflow llama.cpp's C stack (one `"maxItems": 100000` ended the whole
server with a segmentation fault), is refused with a typed error that names the bound, for
`response_format` and forced tool calls alike; schemas and grammars at the bounds still work."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kvchat import InvalidRequestError
from kvchat.chat.response_format import grammar_for_response_format
from kvchat.chat.tool_calls import HERMES
from kvchat.chat.tool_requests import tool_call_grammar
from kvchat.llama import Model, SamplerChain, check_grammar, json_schema_to_grammar
from kvchat.llama.grammar import (
    MAX_GRAMMAR_LENGTH,
    MAX_GRAMMAR_NESTING,
    MAX_GRAMMAR_RULES,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_NODES,
    MAX_SCHEMA_PROPERTIES,
    MAX_SCHEMA_REPETITION,
)


def nested(depth: int, leaf: dict) -> dict:
    schema = leaf
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def strings(count: int, max_length: int) -> dict:
    return {"type": "object", "properties": {f"s{i}": {"type": "string", "maxLength": max_length}
                                             for i in range(count)}}


N = MAX_SCHEMA_REPETITION
# (schema, a phrase the error must contain): each would crash llama.cpp, exhaust memory or
# take seconds to convert or parse without its bound.
TOO_LARGE = [
    pytest.param({"type": "array", "items": {"type": "integer"}, "maxItems": 100_000}, "maxItems is 100,000",
                 id="maxItems"),
    pytest.param({"type": "array", "items": {"type": "integer"}, "minItems": 100_000}, "minItems is 100,000",
                 id="minItems"),
    pytest.param({"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": N + 1},
                 f"maxItems is {N + 1:,}", id="maxItems-just-over"),
    pytest.param({"type": "string", "maxLength": 100_000}, "maxLength is 100,000", id="maxLength"),
    pytest.param({"type": "string", "minLength": 10**6}, "minLength is 1,000,000", id="minLength"),
    pytest.param({"type": "string", "maxLength": 10**12}, "maxLength", id="maxLength-memory-error"),
    pytest.param({"type": "string", "maxLength": 10**30}, "over 10^18", id="maxLength-overflow-error"),
    pytest.param({"type": "string", "pattern": "^a{0,1000000}$"}, "quantifier in pattern is 1,000,000",
                 id="pattern-max"),
    pytest.param({"type": "string", "pattern": "^(ab){100000}$"}, "quantifier", id="pattern-group-exact"),
    pytest.param({"type": "string", "pattern": "^[a-z]{2,}x{1_000_000,}$"}, "quantifier", id="pattern-min"),
    pytest.param({"type": "array", "items": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10**7}}}}}, "maxLength",
        id="nested-maxLength"),
    pytest.param({"type": "object", "properties": {"enum": {"type": "string", "maxLength": 10**6}}}, "maxLength",
                 id="property-named-like-a-keyword"),
    pytest.param(nested(MAX_SCHEMA_DEPTH, {"type": "integer"}), f"deeper than the limit of {MAX_SCHEMA_DEPTH}",
                 id="depth"),
    pytest.param(nested(100_000, {"type": "integer"}), "deeper", id="depth-100000"),
    pytest.param({"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                                   for i in range(MAX_SCHEMA_PROPERTIES + 1)}},
                 f"{MAX_SCHEMA_PROPERTIES + 1} properties", id="properties"),
    pytest.param({"anyOf": [{"type": "array", "items": []} for _ in range(MAX_SCHEMA_NODES)]},
                 "objects and arrays", id="nodes"),
    pytest.param(strings(6, N), "rules, groups, alternatives", id="grammar-rules"),
    pytest.param({"enum": ["x" * 200] * 6000}, "characters long", id="grammar-length"),
    pytest.param({"type": "string", "pattern": "^" + "(" * 30 + f"a{{0,{N}}}" + ")" * 30 + "$"},
                 "nests groups deeper", id="grammar-nesting"),
]

AT_THE_BOUNDS = [
    pytest.param({"type": "array", "items": {"type": "integer"}, "maxItems": N}, id="maxItems"),
    pytest.param({"type": "array", "items": {"type": "integer"}, "minItems": N, "maxItems": N}, id="minItems"),
    pytest.param({"type": "string", "minLength": 1, "maxLength": N}, id="maxLength"),
    pytest.param({"type": "string", "pattern": f"^[a-z]{{0,{N}}}$"}, id="pattern"),
    pytest.param({"type": "string", "pattern": "^(\\{1000000\\}|[{]{2,3})$"}, id="braces-that-are-not-quantifiers"),
    pytest.param(nested(MAX_SCHEMA_DEPTH // 2 - 1, {"type": "string", "maxLength": 10}), id="depth"),
    pytest.param({"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                                   for i in range(MAX_SCHEMA_PROPERTIES)}}, id="properties"),
    pytest.param(strings(4, N), id="four-long-strings"),
    pytest.param({"const": {"maxLength": 10}}, id="keyword-in-a-const"),
]


@pytest.mark.parametrize(("schema", "phrase"), TOO_LARGE)
def test_a_schema_beyond_a_bound_is_refused_for_response_format(schema: dict, phrase: str) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(InvalidRequestError, match="limit") as info:
        grammar_for_response_format(response_format)
    assert info.value.field == "response_format"
    assert phrase in str(info.value)


@pytest.mark.parametrize(("schema", "phrase"), TOO_LARGE)
def test_a_schema_beyond_a_bound_is_refused_for_a_forced_tool_call(schema: dict, phrase: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": schema}, "required": ["x"]}}}]
    with pytest.raises(InvalidRequestError, match="limit") as info:
        tool_call_grammar(tools, name="f", format=HERMES)
    assert info.value.field == "tools"
    assert phrase.split(" is ")[0] in str(info.value)  # deeper inside the call: the numbers may differ


def test_the_bounds_add_up_over_all_tools_of_a_forced_call() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": strings(2, N)}}
    tools = [{**tool, "function": {**tool["function"], "name": f"f{i}"}} for i in range(3)]
    tool_call_grammar(tools[:2], format=HERMES)
    with pytest.raises(InvalidRequestError, match="rules, groups") as info:
        tool_call_grammar(tools, format=HERMES)
    assert info.value.field == "tools"


@pytest.mark.parametrize("error", [MemoryError, RecursionError, OverflowError])
def test_a_memory_or_recursion_error_in_conversion_is_typed(monkeypatch, error) -> None:
    def fail(_schema: str) -> str:
        raise error("out of it")

    monkeypatch.setattr("llama_cpp.llama_grammar.json_schema_to_gbnf", fail)
    with pytest.raises(InvalidRequestError) as info:
        json_schema_to_grammar({"type": "string"})
    assert info.value.field == "response_format"


# -- GBNF text, before llama.cpp parses it ------------------------------------------------------


def nest(depth: int) -> str:
    return "root ::= " + '("a" ' * depth + ")" * depth + "\n"


@pytest.mark.parametrize(("grammar", "phrase"), [
    (nest(MAX_GRAMMAR_NESTING + 1), f"nests groups deeper than the limit of {MAX_GRAMMAR_NESTING:,}"),
    (nest(100_000), "nests groups deeper"),
    ("root ::= " + "(" * 100_000, "nests groups deeper"),  # unbalanced: llama.cpp recursed all the same
    ("root ::= " + '"a"? ' * MAX_GRAMMAR_RULES, f"limit of {MAX_GRAMMAR_RULES:,} rules"),
    ("root ::= " + " | ".join(['"a"'] * (MAX_GRAMMAR_RULES + 1)), "rules, groups, alternatives"),
    ('root ::= "' + "a" * MAX_GRAMMAR_LENGTH + '"', f"the limit is {MAX_GRAMMAR_LENGTH:,}"),
])
def test_grammar_text_beyond_a_bound_is_refused(grammar: str, phrase: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_grammar(grammar)
    assert info.value.field == "grammar"
    assert phrase in str(info.value)


@pytest.mark.parametrize("grammar", [
    nest(MAX_GRAMMAR_NESTING),
    "root ::= " + " ".join(['("a" | "b")'] * (MAX_GRAMMAR_RULES // 2 - 1)),
    # Parentheses and operators in strings, character classes and comments are text.
    'root ::= "((((" [(((] "\\"((((" x # ((((((((\nx ::= [^\\]((((] "|||***"\n'.replace("((((", "(" * 5000),
])
def test_grammar_text_within_the_bounds_passes(grammar: str) -> None:
    check_grammar(grammar)


def greedy_sampler(model: Model, grammar: str) -> SamplerChain:
    return SamplerChain(model, temperature=0, top_k=0, top_p=1, min_p=0, repeat_penalty=1, presence_penalty=0,
                        frequency_penalty=0, penalty_last_n=0, logit_bias={}, seed=0, grammar=grammar)


def test_the_sampler_checks_a_grammar_before_llama_cpp_parses_it(gemma_model: Model) -> None:
    with pytest.raises(InvalidRequestError, match="nests groups deeper") as info:
        greedy_sampler(gemma_model, nest(100_000))
    assert info.value.field == "grammar"


@pytest.mark.parametrize("schema", AT_THE_BOUNDS)
def test_schemas_at_the_bounds_convert_and_llama_cpp_parses_them(gemma_model: Model, schema: dict) -> None:
    greedy_sampler(gemma_model, json_schema_to_grammar(schema)).close()  # a grammar that does not parse raises


@pytest.mark.system
def test_a_grammar_that_crashed_llama_cpp_is_refused_and_the_process_lives(tmp_path) -> None:
    """Run where a crash cannot take the test run down: a child process submits, to a real
    engine, the grammar of `"maxItems": 100000` and a raw grammar nested 100,000 deep."""
    script = textwrap.dedent("""
        import json
        from llama_cpp import llama_grammar
        from kvchat import Engine, EngineSettings, InvalidRequestError, SamplingParams
        from kvchat.models import resolve
        schema = {"type": "array", "items": {"type": "integer"}, "maxItems": 100000}
        grammars = [llama_grammar.json_schema_to_gbnf(json.dumps(schema)),
                    "root ::= " + '("a" ' * 100000 + ")" * 100000]
        with Engine(resolve("gemma-3-270m", progress=False), EngineSettings(n_ctx=512)) as engine:
            for grammar in grammars:
                try:
                    engine.generate("hi", SamplingParams(max_tokens=2, grammar=grammar))
                except InvalidRequestError as exc:
                    print("refused:", exc.field, exc)
            print("served:", engine.generate("hi", SamplingParams(max_tokens=2)).collect().usage.completion_tokens)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the child process died ({done.returncode}):\n{done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["refused", "refused", "served"], done.stdout
    assert "characters long" in lines[0] and "nests groups deeper" in lines[1]
    assert all(line.startswith("refused: grammar ") for line in lines[:2])
