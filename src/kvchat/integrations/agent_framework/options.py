"""Agent Framework chat options to the arguments of :func:`kvchat.chat.complete`.

Pure conversion and checking, no engine: :func:`request_from_options` turns one call's
options dict into a :class:`KVChatRequest`, or raises `kvchat.errors.InvalidRequestError`
naming the option, before anything is queued.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, cast

from agent_framework import ChatOptions, FunctionTool, normalize_tools, validate_tool_mode
from agent_framework.exceptions import ContentError
from pydantic import BaseModel

from kvchat.chat.complete import OverflowPolicy
from kvchat.engine import SamplingParams
from kvchat.errors import InvalidRequestError

if sys.version_info >= (3, 13):
    from typing import TypeVar  # pragma: no cover
else:
    from typing_extensions import TypeVar  # pragma: no cover

logger = logging.getLogger(__name__)

__all__ = ["KVChatOptions", "KVChatRequest", "request_from_options", "response_format_envelope"]

ResponseModelT = TypeVar("ResponseModelT", bound=BaseModel | None, default=None)


class KVChatOptions(ChatOptions[ResponseModelT], Generic[ResponseModelT], total=False):
    """Options of one :class:`~kvchat.integrations.agent_framework.KVChatClient` call.

    Agent Framework's common keys: `temperature`, `top_p`, `max_tokens`, `stop`, `seed`,
    `frequency_penalty`, `presence_penalty`, `logit_bias` (token ids as keys), `tools`,
    `tool_choice` (``"auto"``, ``"required"``, ``"none"`` or a `ToolMode`, with
    `required_function_name` or `allowed_tools`), `response_format` (a Pydantic type or
    a JSON schema), `instructions` (a leading system message) and `model` (must name
    the client's model). `allow_multiple_tool_calls`, `metadata`, `user`, `store` and
    `conversation_id` are accepted and have no effect: kvchat keeps no server-side
    conversations (its prefix cache makes resending the history cheap) and returns
    every call the model writes.

    kvchat's own keys:
    """

    top_k: int
    """Sample from the `top_k` most likely tokens (0 = off)."""
    min_p: float
    """Drop tokens less likely than `min_p` times the most likely one."""
    repeat_penalty: float
    """llama.cpp's repetition penalty (1.0 = off)."""
    cache_key: str
    """Keeps tenants' cached prefixes apart (see :func:`kvchat.chat.complete`)."""
    overflow: OverflowPolicy
    """What to do when the history does not fit: ``"error"`` (default),
    ``"truncate_oldest"`` or ``"shift"`` (see :func:`kvchat.chat.complete`)."""


# Options that map one to one onto `SamplingParams` fields.
_SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "top_k",
    "min_p",
    "repeat_penalty",
)
# Options read elsewhere (`tools`, `instructions`, ...) or accepted without effect.
_OTHER_KEYS = frozenset(
    {
        "model",
        "stop",
        "logit_bias",
        "tools",
        "tool_choice",
        "allow_multiple_tool_calls",
        "response_format",
        "instructions",
        "cache_key",
        "overflow",
        "metadata",
        "user",
        "store",
        "conversation_id",
    }
)
_SCHEMA_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_TOKEN_ID_TEXT = re.compile(r"[0-9]+")  # ASCII digits only: int() also reads other scripts' digits
_BEYOND_ANY_VOCABULARY = 1 << 62  # what a key of more than 18 digits stands for (int() of 4,301 digits fails)
_JSON_SCHEMA_KEYWORDS = ("properties", "items", "anyOf", "oneOf", "allOf", "$ref", "$defs", "enum", "const")
_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


@dataclass(frozen=True)
class KVChatRequest:
    """One call's options, checked, in the shape :func:`kvchat.chat.complete` takes."""

    sampling: SamplingParams
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any] | None
    response_format: dict[str, Any] | None
    instructions: list[str]
    cache_key: str | None
    overflow: OverflowPolicy


def request_from_options(options: Mapping[str, Any], *, model_id: str, n_vocab: int | None = None) -> KVChatRequest:
    """Check `options` (a :class:`KVChatOptions` dict; None values count as unset) and
    convert them. Raises `InvalidRequestError` whose `field` names the bad option: an
    unknown key, a value out of range, a tool that cannot run locally, a `model` that
    is not `model_id`, a `logit_bias` key that is not a token id of the model (with
    `n_vocab`, ids must be below it) or a bias that is not a finite number."""
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - _OTHER_KEYS - set(_SAMPLING_KEYS))
    if unknown:
        raise InvalidRequestError(f"unsupported option {unknown[0]!r} (see KVChatOptions)", field=unknown[0])
    model = given.get("model")
    if model is not None and model != model_id:
        raise InvalidRequestError(f"this client serves the model {model_id!r}, not {model!r}", field="model")
    tools, allowed, choice = _tools_and_choice(given.get("tools"), given.get("tool_choice"))
    if allowed is not None and tools is not None:  # the model sees only the allowed tools
        tools = [spec for spec in tools if _tool_name(spec) in allowed] or None
    overflow = given.get("overflow", "error")
    if overflow not in ("error", "truncate_oldest", "shift"):
        raise InvalidRequestError(f"unknown overflow policy {overflow!r}", field="overflow")
    cache_key = given.get("cache_key")
    if cache_key is not None and not isinstance(cache_key, str):
        raise InvalidRequestError("cache_key must be a string", field="cache_key")
    return KVChatRequest(
        sampling=_sampling(given, n_vocab),
        tools=tools,
        tool_choice=choice,
        response_format=response_format_envelope(given.get("response_format")),
        instructions=_instructions(given.get("instructions")),
        cache_key=cache_key,
        overflow=cast(OverflowPolicy, overflow),
    )


def _sampling(given: Mapping[str, Any], n_vocab: int | None) -> SamplingParams:
    """`SamplingParams` from the sampling options; it checks every value itself."""
    values: dict[str, Any] = {key: given[key] for key in _SAMPLING_KEYS if key in given}
    stop = given.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            values["stop"] = (stop,)
        elif isinstance(stop, Sequence):
            values["stop"] = tuple(stop)
        else:
            raise InvalidRequestError("stop must be a string or a list of strings", field="stop")
    bias = given.get("logit_bias")
    if bias is not None:
        values["logit_bias"] = _logit_bias(bias, n_vocab)
    return SamplingParams(**values)


def _logit_bias(bias: Any, n_vocab: int | None) -> dict[int, float]:
    """Token id to bias. Keys are token ids: integers >= 0 or their decimal digits (JSON
    keys are strings), below `n_vocab` when given; values are finite numbers."""
    if not isinstance(bias, Mapping):
        raise InvalidRequestError("logit_bias must map token ids to biases", field="logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = _token_id(key)
        if token is None:
            raise InvalidRequestError(
                f"logit_bias key {_short(key)} is not a token id (an integer >= 0, or its decimal digits)",
                field="logit_bias",
            )
        if n_vocab is not None and token >= n_vocab:
            raise InvalidRequestError(
                f"logit_bias key {_short(key)} is not a token id of this model (its ids are 0 to {n_vocab - 1})",
                field="logit_bias",
            )
        number = _finite_number(value)
        if number is None:
            raise InvalidRequestError(
                f"logit_bias value {_short(value)} of token {token} is not a finite number", field="logit_bias"
            )
        out[token] = number
    return out


def _token_id(key: object) -> int | None:
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        token = int(key)
        return token if token >= 0 else None
    if isinstance(key, str) and _TOKEN_ID_TEXT.fullmatch(key):
        digits = key.lstrip("0") or "0"
        return int(digits) if len(digits) <= 18 else _BEYOND_ANY_VOCABULARY
    return None


def _finite_number(value: object) -> float | None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _short(value: object) -> str:
    """`value`'s repr, cut to 40 characters (a key may be any length)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _instructions(instructions: Any) -> list[str]:
    if instructions is None:
        return []
    if isinstance(instructions, str):
        return [instructions]
    if isinstance(instructions, Sequence) and all(isinstance(part, str) for part in instructions):
        return list(instructions)
    raise InvalidRequestError("instructions must be text or a list of texts", field="instructions")


def _tools_and_choice(
    tools: Any, tool_choice: Any
) -> tuple[list[dict[str, Any]] | None, set[str] | None, str | dict[str, Any] | None]:
    """OpenAI function tools, the `allowed_tools` names (None: all), and OpenAI's `tool_choice`."""
    specs = [_tool_spec(item) for item in normalize_tools(tools)] if tools is not None else []
    flat = [spec for group in specs for spec in group]
    try:
        mode = validate_tool_mode(tool_choice)
    except ContentError as exc:
        raise InvalidRequestError(str(exc), field="tool_choice") from None
    if mode is None:
        return flat or None, None, None
    allowed = set(mode["allowed_tools"]) if "allowed_tools" in mode else None
    choice: str | dict[str, Any] = mode["mode"]
    if "required_function_name" in mode:
        choice = {"type": "function", "function": {"name": mode["required_function_name"]}}
    return flat or None, allowed, choice


def _tool_name(spec: Mapping[str, Any]) -> object:
    function = spec.get("function")
    return function.get("name") if isinstance(function, Mapping) else None


def _tool_spec(item: object) -> list[dict[str, Any]]:
    """The OpenAI function tools for one Agent Framework tool: a `FunctionTool`, a
    connected MCP tool's functions, or a ``{"type": "function", ...}`` dict."""
    if isinstance(item, FunctionTool):
        return [item.to_json_schema_spec()]
    if isinstance(item, Mapping) and item.get("type") == "function":
        return [dict(item)]
    functions = getattr(item, "functions", None)  # an MCP tool: its functions, once connected
    if isinstance(functions, Sequence) and getattr(item, "is_connected", False):
        return [spec for function in functions for spec in _tool_spec(function)]
    name = type(item).__name__ if not isinstance(item, Mapping) else f"a {item.get('type')!r} tool"
    raise InvalidRequestError(
        f"unsupported tool {name}: a local model runs function tools only (connect MCP tools first)", field="tools"
    )


def response_format_envelope(response_format: Any) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` for Agent Framework's: a Pydantic type becomes a
    ``json_schema`` with its schema; a mapping that is already OpenAI's shape
    (``type`` ``text``, ``json_object`` or ``json_schema``) is kept; any other mapping
    is taken as a JSON schema (its ``title``, if any, names it). The schema itself is
    checked when the grammar is built (`InvalidRequestError`, field ``response_format``).
    """
    if response_format is None:
        return None
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        return _json_schema(response_format.__name__, response_format.model_json_schema())
    if not isinstance(response_format, Mapping):
        raise InvalidRequestError(
            "response_format must be a Pydantic model class or a JSON schema", field="response_format"
        )
    kind = response_format.get("type")
    if kind in ("text", "json_object", "json_schema"):
        return dict(response_format)
    if kind in _JSON_TYPES or (kind is None and any(key in response_format for key in _JSON_SCHEMA_KEYWORDS)):
        schema = dict(response_format)
        return _json_schema(str(schema.pop("title", None) or "response"), schema)
    raise InvalidRequestError(
        "response_format must be a Pydantic model class, a JSON schema, or OpenAI's "
        '{"type": "json_schema", "json_schema": {...}}',
        field="response_format",
    )


def _json_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    name = _SCHEMA_NAME_CHARS.sub("_", name)[:64] or "response"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
