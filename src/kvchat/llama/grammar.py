"""GBNF grammars for constrained sampling, from llama-cpp-python's converter."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llama_cpp import llama_grammar

from kvchat.errors import InvalidRequestError

ANY_JSON_OBJECT = llama_grammar.JSON_GBNF
"""A grammar for any JSON value (llama.cpp's `json.gbnf`: root is an object)."""


def json_schema_to_grammar(schema: Mapping[str, Any]) -> str:
    """A GBNF grammar whose sentences are the JSON documents valid under `schema`.

    Raises `InvalidRequestError` for a schema the converter cannot handle, and
    for one whose text is not valid Unicode (a lone surrogate in a pattern
    would reach the grammar as it is).
    """
    try:
        grammar = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except (
        AssertionError,
        AttributeError,
        ValueError,
        KeyError,
        TypeError,
        NotImplementedError,
        RecursionError,
    ) as exc:
        # The converter signals some unsupported schemas with assert, and trips on
        # others (``"properties": 5``) with AttributeError.
        raise InvalidRequestError(f"unsupported JSON schema: {exc}", field="response_format") from exc
    try:
        grammar.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            "the JSON schema holds text that is not valid Unicode", field="response_format"
        ) from None
    return grammar
