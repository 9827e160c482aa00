"""`response_format` to grammar: the mapping (pure), what llguidance refuses when the request is
submitted, and JSON-schema output on the real Qwen model."""

from __future__ import annotations

import json

import jsonschema
import pytest

from kvchat import Engine, Grammar, InvalidRequestError, SamplingParams
from kvchat.chat.response_format import ANY_JSON_OBJECT, grammar_for_response_format
from kvchat.llama import Model

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
}


def json_schema(schema: dict | None = None, **extra) -> dict:
    spec = {"name": "city", **extra}
    if schema is not None:
        spec["schema"] = schema
    return {"type": "json_schema", "json_schema": spec}


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_text_needs_no_grammar(response_format) -> None:
    assert grammar_for_response_format(response_format) is None


def test_json_object_is_any_json_object() -> None:
    assert grammar_for_response_format({"type": "json_object"}) == Grammar.json_schema(ANY_JSON_OBJECT)


def test_json_schema_is_the_schema_grammar() -> None:
    grammar = grammar_for_response_format(json_schema(CITY, strict=True, description="A city."))
    assert grammar == Grammar.json_schema(CITY, field="response_format")
    assert grammar is not None and "population" in grammar.definition and grammar.field == "response_format"


def test_json_schema_without_schema_is_any_json_object() -> None:
    assert grammar_for_response_format(json_schema()) == Grammar.json_schema(ANY_JSON_OBJECT)


@pytest.mark.parametrize("response_format", [
    "json_object",
    {},
    {"type": "xml"},
    {"type": "json_object", "schema": CITY},  # misplaced key: an error, not free-form JSON
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": CITY},  # the schema itself, not wrapped with a name
    {"type": "json_schema", "json_schema": {"schema": CITY}},
    json_schema(CITY, strcit=True),
    json_schema(CITY, strict="yes"),
    {"type": "json_schema", "json_schema": {"name": "has space", "schema": CITY}},
    {"type": "json_schema", "json_schema": {"name": "city", "schema": "{}"}},
    json_schema({"type": "string", "maximum": float("nan")}),
])
def test_bad_response_format_is_rejected(response_format) -> None:
    with pytest.raises(InvalidRequestError) as info:
        grammar_for_response_format(response_format)
    assert info.value.field == "response_format"


@pytest.mark.parametrize("schema", [
    {"type": "strnig"},
    {"$ref": "#/$defs/missing"},
    {"type": "string", "pattern": "[unclosed"},
    {"type": "string", "minLength": 5, "maxLength": 2},
    {"allOf": [{"type": "string"}, {"type": "integer"}]},
])
def test_a_schema_llguidance_refuses_is_refused_before_anything_is_queued(qwen_engine: Engine, schema) -> None:
    grammar = grammar_for_response_format(json_schema(schema))
    prompt = qwen_engine.model.tokenize("Hi", add_special=True)
    with pytest.raises(InvalidRequestError) as info:
        qwen_engine.submit(prompt, SamplingParams(max_tokens=4, grammar=grammar))
    assert info.value.field == "response_format"
    assert qwen_engine.stats().queued == 0 and qwen_engine.stats().active == 0


# -- on the real Qwen model --------------------------------------------------------------------


@pytest.fixture
def qwen(qwen_model: Model, qwen_engine: Engine) -> tuple[Model, Engine]:
    """The session's Qwen model and engine."""
    return qwen_model, qwen_engine


def test_json_schema_output_validates(qwen) -> None:
    model, engine = qwen
    prompt = ("<|im_start|>user\nWhat is the largest city of Japan, and its population? "
              "Answer in JSON.<|im_end|>\n<|im_start|>assistant\n")
    sampling = SamplingParams(temperature=0, max_tokens=64, grammar=grammar_for_response_format(json_schema(CITY)))
    completion = engine.submit(model.tokenize(prompt, parse_special=True), sampling).collect()
    assert completion.usage.finish_reason == "stop", completion.text  # the grammar ended, not max_tokens
    document = json.loads(completion.text)
    jsonschema.validate(document, CITY)
    assert isinstance(document["population"], int) and document["city"].strip()
