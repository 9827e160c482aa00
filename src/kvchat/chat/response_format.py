"""OpenAI's `response_format` as a :class:`~kvchat.engine.Grammar` for `SamplingParams.grammar`.

- None or ``{"type": "text"}``: no grammar;
- ``{"type": "json_object"}``: any JSON object;
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``:
  the JSON documents valid under the schema (a missing schema means any JSON object,
  as in OpenAI's API; the grammar always holds, so `strict` changes nothing).

The schema is compiled by llguidance (see `kvchat.engine.grammar`), with its
bounds on work and size; keywords it does not implement are ignored.

Anything else raises `InvalidRequestError(field="response_format")`, unknown keys included,
so a typo is an error rather than silently unconstrained output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kvchat.engine import Grammar
from kvchat.errors import InvalidRequestError

__all__ = ["grammar_for_response_format"]

_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JSON_SCHEMA_KEYS = {"name", "schema", "strict", "description"}


ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""The schema of `json_object` output."""


def grammar_for_response_format(response_format: Mapping[str, Any] | None) -> Grammar | None:
    """The grammar that makes the reply follow `response_format`, or None for free text.

    Raises `InvalidRequestError(field="response_format")` for a shape OpenAI's API would
    refuse or a schema that is not JSON (whether llguidance compiles it is found out when
    the request is submitted, with the same field).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise _bad("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(set(response_format) - allowed, key=str)
    if extra:
        raise _bad(f"response_format has unknown keys: {', '.join(map(str, extra))}")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_schema(ANY_JSON_OBJECT)
    if kind != "json_schema":
        raise _bad(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise _bad("response_format.json_schema must be an object with 'name' and 'schema'")
    extra = sorted(set(spec) - _JSON_SCHEMA_KEYS, key=str)
    if extra:
        raise _bad(f"response_format.json_schema has unknown keys: {', '.join(map(str, extra))}")
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise _bad("response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-'")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise _bad("response_format.json_schema.strict must be a boolean")
    if not isinstance(spec.get("description", ""), (str, type(None))):
        raise _bad("response_format.json_schema.description must be a string")
    schema = spec.get("schema")
    if schema is None:
        return Grammar.json_schema(ANY_JSON_OBJECT)
    if not isinstance(schema, Mapping):
        raise _bad("response_format.json_schema.schema must be a JSON schema object")
    return Grammar.json_schema(schema, field="response_format")


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, field="response_format")
