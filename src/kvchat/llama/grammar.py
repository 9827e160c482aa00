"""GBNF grammars for constrained sampling, from llama-cpp-python's converter, and the
bounds that keep a hostile schema or grammar from exhausting memory, time or the C stack.

llama.cpp's GBNF parser recurses once per nested group, and the converter spells a
repetition count of n as n nested groups, so one schema with ``"maxItems": 100000``
overflowed the C stack and ended the whole process. Schemas are checked before
conversion (`check_json_schema`) and grammar text before it reaches llama.cpp
(`check_grammar`); what exceeds a bound is an `InvalidRequestError` that names the bound.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from llama_cpp import llama_grammar

from kvchat.errors import InvalidRequestError

ANY_JSON_OBJECT = llama_grammar.JSON_GBNF
"""A grammar for any JSON value (llama.cpp's `json.gbnf`: root is an object)."""

MAX_SCHEMA_REPETITION = 1_000
"""Largest repetition count a JSON schema may ask for: `minItems`, `maxItems`,
`minLength`, `maxLength` and the ``{n}``, ``{n,}``, ``{n,m}`` quantifiers of a `pattern`.
The converter writes a count of n as n nested groups; llama.cpp itself refuses more than
1,000 nested optional groups."""

MAX_SCHEMA_DEPTH = 64
"""Deepest nesting of objects and arrays in a JSON schema document (the converter recurses
in Python once per level; a schema level is one or two document levels)."""

MAX_SCHEMA_NODES = 10_000
"""Most objects and arrays in one JSON schema document (for a forced tool call, in all the
tools' parameters together), which bounds the conversion time."""

MAX_SCHEMA_PROPERTIES = 128
"""Most `properties` one object of a JSON schema may declare: the converter's time grows
with the square of an object's optional properties (128 take about 10 ms; 900 a second)."""

MAX_GRAMMAR_LENGTH = 1 << 20
"""Longest GBNF text, in characters, that may reach llama.cpp's grammar parser."""

MAX_GRAMMAR_NESTING = 1_024
"""Deepest nesting of parenthesized groups in GBNF text. llama.cpp's parser recurses once
per level, using about 450 bytes of C stack each (20,000 levels overflowed an 8 MiB stack;
1,024 fit in a 512 KiB one)."""

MAX_GRAMMAR_RULES = 10_000
"""Most rules, groups, alternatives and repetition operators in GBNF text. llama.cpp's
set-up time grows with the square of those that can start at one point (10,000 optional
groups in a row: 0.1 s; 100,000: 18 s)."""

_COUNT_KEYWORDS = ("minItems", "maxItems", "minLength", "maxLength")
# A string, a character class or a comment (skipped), or one structural token.
_GBNF_STRUCTURE = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|::=|[()|*+?{]')
_GBNF_COUNTED = frozenset({"(", "::=", "|", "*", "+", "?", "{"})
# Read as llama-cpp-python's pattern converter reads a pattern: an escape, a character
# class, a quantifier (group 1), or a run of other characters.
_PATTERN_TOKEN = re.compile(r"\\.|\[(?:\\.|[^\]\\])*\]?|\{([^}]*)\}|[^\\\[{]+|.", re.S)


def json_schema_to_grammar(schema: Mapping[str, Any]) -> str:
    """A GBNF grammar whose sentences are the JSON documents valid under `schema`.

    Raises `InvalidRequestError(field="response_format")` for a schema beyond the bounds
    of `check_json_schema`, a grammar beyond those of `check_grammar`, a schema the
    converter cannot handle (a `MemoryError` or `RecursionError` in it included), and
    one whose text is not valid Unicode (a lone surrogate in a pattern would reach the
    grammar as it is).
    """
    check_json_schema(schema, field="response_format")
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
        MemoryError,
        OverflowError,
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
    check_grammar(grammar, field="response_format", what="the grammar for this JSON schema")
    return grammar


def check_json_schema(schema: Any, *, field: str) -> None:
    """Raise `InvalidRequestError(field=field)` if a JSON schema document exceeds
    `MAX_SCHEMA_DEPTH`, `MAX_SCHEMA_NODES`, `MAX_SCHEMA_PROPERTIES` or
    `MAX_SCHEMA_REPETITION` (the message names the bound).

    The whole document is walked, without recursion, so a count inside a `const` value
    counts too: a harmless over-approximation that no keyword name can dodge.
    """
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(schema, 1)]
    while todo:
        node, depth = todo.pop()
        if not isinstance(node, (Mapping, list, tuple)) or id(node) in seen:
            continue
        seen.add(id(node))
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequestError(
                f"the JSON schema nests deeper than the limit of {MAX_SCHEMA_DEPTH} levels", field=field
            )
        if len(seen) > MAX_SCHEMA_NODES:
            raise InvalidRequestError(
                f"the JSON schema has more than the limit of {MAX_SCHEMA_NODES:,} objects and arrays", field=field
            )
        if isinstance(node, Mapping):
            _check_keywords(node, field)
            todo.extend((child, depth + 1) for child in node.values())
        else:
            todo.extend((child, depth + 1) for child in node)


def check_grammar(grammar: str, *, field: str = "grammar", what: str = "the grammar") -> None:
    """Raise `InvalidRequestError(field=field)` if GBNF text exceeds `MAX_GRAMMAR_LENGTH`,
    `MAX_GRAMMAR_NESTING` or `MAX_GRAMMAR_RULES` (the message names the bound), so that
    llama.cpp's parser never sees it. Says nothing about whether the text parses."""
    if len(grammar) > MAX_GRAMMAR_LENGTH:
        raise InvalidRequestError(
            f"{what} is {len(grammar):,} characters long; the limit is {MAX_GRAMMAR_LENGTH:,}", field=field
        )
    depth = counted = 0
    for match in _GBNF_STRUCTURE.finditer(grammar):
        token = match.group()
        if token == ")":
            depth -= 1
        elif token in _GBNF_COUNTED:
            counted += 1
            if counted > MAX_GRAMMAR_RULES:
                raise InvalidRequestError(
                    f"{what} has more than the limit of {MAX_GRAMMAR_RULES:,} rules, groups, alternatives "
                    "and repetitions",
                    field=field,
                )
            if token == "(":
                depth += 1
                if depth > MAX_GRAMMAR_NESTING:
                    raise InvalidRequestError(
                        f"{what} nests groups deeper than the limit of {MAX_GRAMMAR_NESTING:,}", field=field
                    )


def _check_keywords(node: Mapping[Any, Any], field: str) -> None:
    for keyword in _COUNT_KEYWORDS:
        _check_count(node.get(keyword), keyword, field)
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        for count in _pattern_counts(pattern):
            _check_count(count, "{n,m} quantifier in pattern", field)
    properties = node.get("properties")
    if isinstance(properties, Mapping) and len(properties) > MAX_SCHEMA_PROPERTIES:
        raise InvalidRequestError(
            f"an object in the JSON schema has {len(properties):,} properties; the limit is {MAX_SCHEMA_PROPERTIES:,}",
            field=field,
        )


def _check_count(value: Any, keyword: str, field: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_SCHEMA_REPETITION:
        shown = f"{value:,}" if value < 10**18 else "over 10^18"
        raise InvalidRequestError(
            f"the JSON schema's {keyword} is {shown}; the limit for repetition counts is {MAX_SCHEMA_REPETITION:,}",
            field=field,
        )


def _pattern_counts(pattern: str) -> Iterator[int | None]:
    """The numbers in a pattern's quantifiers, as the converter reads them (with `int`;
    None for a part that is not a number, which the converter refuses itself)."""
    for match in _PATTERN_TOKEN.finditer(pattern):
        if match.group(1) is not None:
            yield from (_as_int(part) for part in match.group(1).split(","))


def _as_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None
