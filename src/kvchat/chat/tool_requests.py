"""Tool requests: validate OpenAI tool definitions and `tool_choice`, and build the
grammar that forces a well-formed call in the model's own format."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from kvchat.chat.tool_calls import HERMES, ToolCallFormat
from kvchat.engine import Grammar
from kvchat.engine.grammar import JSON_LAYOUT, schema_text
from kvchat.errors import InvalidRequestError

__all__ = ["TOOL_NAME", "normalize_tool_choice", "tool_call_grammar", "validate_tools"]

_TOOL_CHOICE_MODES = ("none", "auto", "required")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a function tool's name may be (OpenAI's rule, which chat templates expect)."""
_DEFS = ("$defs", "definitions")


def validate_tools(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Check OpenAI function tools; return each tool's parameters schema by name, in order.

    A tool without `parameters` takes none. Raises `InvalidRequestError(field="tools")`.
    """

    def bad(message: str) -> InvalidRequestError:
        return InvalidRequestError(message, field="tools")

    if not isinstance(tools, (list, tuple)) or not tools:
        raise bad("tools must be a non-empty list of function tools")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(fn, Mapping):
            raise bad(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-'")
        if name in functions:
            raise bad(f"tools[{i}].function.name {name!r} is used by an earlier tool")
        if not isinstance(fn.get("description", ""), (str, type(None))):
            raise bad(f"tools[{i}].function.description must be a string")
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object")
        functions[name] = dict(parameters) if parameters is not None else {"type": "object", "properties": {}}
    return functions


def normalize_tool_choice(
    tool_choice: str | Mapping[str, Any] | None, tools: Sequence[Mapping[str, Any]] | None
) -> str:
    """OpenAI's `tool_choice` as ``"none"``, ``"auto"``, ``"required"`` or the forced tool's name.

    None means "auto" with tools and "none" without; "auto" without tools is "none".
    Raises `InvalidRequestError` (field "tools" or "tool_choice").
    """
    names = list(validate_tools(tools)) if tools else []
    if tool_choice is None or tool_choice == "auto":
        return "auto" if names else "none"
    if tool_choice == "none":
        return "none"
    if tool_choice == "required" and names:
        return "required"
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function" or not isinstance(name, str):
        if tool_choice == "required":
            raise InvalidRequestError('tool_choice "required" needs tools', field="tool_choice")
        raise InvalidRequestError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            field="tool_choice",
        )
    if name not in names:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", field="tool_choice")
    if name in _TOOL_CHOICE_MODES:
        raise InvalidRequestError(
            f"a tool named {name!r} cannot be forced: that name is a tool_choice mode", field="tool_choice"
        )
    return name


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    *,
    name: str | None = None,
    format: ToolCallFormat = HERMES,
    tag_tokens: Mapping[str, int] | None = None,
) -> Grammar:
    """A grammar for exactly one call, in `format`, of one of `tools` (or of the tool
    called `name`), whose arguments match that tool's parameters schema.

    The call's JSON is laid out as `kvchat.engine.grammar.JSON_LAYOUT` says, as the
    templates render calls, and ends right after its closing brace. `tag_tokens`
    maps the format's tags (say ``"<tool_call>"``) to the model's special token for
    them: the grammar then asks for that token, as the model writes a call on its
    own and as its template renders one, instead of the tag spelled out in text
    pieces (the history that holds the call then continues the generated tokens,
    and the next call reuses them from the cache). Everything up to the arguments'
    first value is forced, so it takes no sampling step.

    Raises `InvalidRequestError`: field "tools" for bad tools or parameters that are
    not JSON, field "tool_choice" for a `name` that is not among them; whether
    llguidance compiles the schemas is found out when the request is submitted.
    """
    functions = validate_tools(tools)
    if name is not None:
        if name not in functions:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", field="tool_choice")
        functions = {name: functions[name]}
    defs: dict[str, Any] = {}
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": fn_name}, format.arguments_key: _hoist_defs(params, f"tool{i}-", defs)},
            "required": ["name", format.arguments_key],
            "additionalProperties": False,
        }
        for i, (fn_name, params) in enumerate(functions.items())
    ]
    schema: dict[str, Any] = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    if defs:
        schema = {**schema, "$defs": defs}
    schema["x-guidance"] = dict(JSON_LAYOUT)
    call = schema_text(schema, "tools")
    prefix, suffix = (_lark_sequence(text, tag_tokens or {}) for text in (format.grammar_prefix, format.grammar_suffix))
    start = " ".join([*prefix, "call", *suffix])
    return Grammar.lark(f"start: {start}\ncall: %json {call}\n", field="tools")


def _lark_sequence(text: str, tag_tokens: Mapping[str, int]) -> list[str]:
    """`text` as Lark items: literals (written as JSON strings, which Lark reads alike)
    and token references (``<[id]>``) for the tags in `tag_tokens`."""
    if not tag_tokens:
        return [json.dumps(text)] if text else []
    tags = "|".join(re.escape(tag) for tag in sorted(tag_tokens, key=len, reverse=True))
    pieces = re.split(f"({tags})", text)
    return [f"<[{tag_tokens[piece]}]>" if k % 2 else json.dumps(piece) for k, piece in enumerate(pieces) if piece]


def _hoist_defs(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """Move a parameters schema's `$defs`/`definitions` into `defs` (names prefixed) and
    rewrite its `$ref`s to match, so they resolve once it is nested in the call schema."""
    moved = {
        f"#/{k}/{n}": f"#/$defs/{prefix}{n}" for k in _DEFS if isinstance(schema.get(k), Mapping) for n in schema[k]
    }

    def rewrite(node: Any) -> Any:
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, Mapping):
            return node
        ref = node.get("$ref")
        old = next((o for o in moved if isinstance(ref, str) and (ref == o or ref.startswith(o + "/"))), None)
        return {k: moved[old] + v[len(old) :] if k == "$ref" and old else rewrite(v) for k, v in node.items()}

    if not moved:
        return schema
    defs.update(
        {
            f"{prefix}{n}": rewrite(sub)
            for k in _DEFS
            if isinstance(schema.get(k), Mapping)
            for n, sub in schema[k].items()
        }
    )
    return rewrite({k: v for k, v in schema.items() if k not in _DEFS})
