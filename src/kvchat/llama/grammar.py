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

    Raises `InvalidRequestError` for a schema the converter cannot handle.
    """
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        # The converter signals some unsupported schemas (unknown types, bad $refs) with assert.
        raise InvalidRequestError(f"unsupported JSON schema: {exc}", field="response_format") from exc
