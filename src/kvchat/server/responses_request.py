"""The request of OpenAI's Responses API (``POST /v1/responses``): its model
(:class:`ResponsesRequest`), with the validators and limits of what the response
echoes of it (:func:`response_frame`), what kvchat refuses (:func:`check_supported`),
and `text.format` as chat's `response_format` (:func:`response_format`). Its
`input` and `tools` are translated by :mod:`kvchat.server.responses_input` and
:mod:`kvchat.server.responses_tools`; :mod:`kvchat.server.responses_api` is the
public face of the three.

- `text.format` becomes `response_format` (:func:`response_format`).

What kvchat cannot do is refused with a 400 whose ``param`` names it
(:func:`check_supported`; in `input`,
:func:`kvchat.server.responses_input.input_messages`): images, files and audio
(also in a call's output), items of other types, ``background``, ``conversation``,
``prompt`` templates, log probabilities. Other fields OpenAI defines
(``metadata``, ``user``, ``service_tier``, ...) are accepted; ``metadata`` and
``user`` are echoed, the rest ignored.

What the response object echoes (``instructions``, ``previous_response_id``,
``tools``, ``tool_choice``, ``text``, ``metadata``, ``user``) is checked on the
way in, by the model's validators, before anything is queued or generated: a
response that could not be written as JSON would otherwise fail after the work,
and, once stored, on every read. Each must be valid Unicode (no lone surrogate,
which JSON's ``\\ud800`` escapes can carry, in any string or key), and bounded:

- ``metadata``: OpenAI's limits, at most :data:`MAX_METADATA_PAIRS` pairs, keys
  of at most :data:`MAX_METADATA_KEY` characters, string values of at most
  :data:`MAX_METADATA_VALUE`;
- ``user`` at most :data:`MAX_USER` characters, ``previous_response_id`` at most
  :data:`MAX_RESPONSE_ID`, ``instructions`` at most :data:`MAX_INSTRUCTIONS`
  (kvchat's choices; instructions are also bounded by the context window);
- ``tools``, ``tool_choice`` and ``text`` (JSON values) nest at most
  :data:`MAX_JSON_DEPTH` objects and arrays deep, measure at most
  :data:`MAX_JSON_SIZE` (their strings' and keys' characters plus one per
  value), hold only JSON's values (no NaN or infinity) and string keys.

A value past these is a 400 whose ``param`` is the field's name; the message
says where in the value the problem is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from kvchat.engine import SamplingParams
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import quoted, shown, valid_text
from kvchat.server.ids import new_id
from kvchat.server.response_objects import ResponseFrame
from kvchat.server.settings import ServerSettings

__all__ = [
    "MAX_INSTRUCTIONS",
    "MAX_JSON_DEPTH",
    "MAX_JSON_SIZE",
    "MAX_METADATA_KEY",
    "MAX_METADATA_PAIRS",
    "MAX_METADATA_VALUE",
    "MAX_RESPONSE_ID",
    "MAX_USER",
    "ResponsesRequest",
    "check_supported",
    "json_problem",
    "response_format",
    "response_frame",
]

MAX_METADATA_PAIRS = 16
"""Most key-value pairs in ``metadata`` (OpenAI's limit)."""
MAX_METADATA_KEY = 64
"""Most characters in a ``metadata`` key (OpenAI's limit)."""
MAX_METADATA_VALUE = 512
"""Most characters in a ``metadata`` value (OpenAI's limit)."""
MAX_USER = 256
"""Most characters in ``user``."""
MAX_RESPONSE_ID = 256
"""Most characters in ``previous_response_id`` (the server's ids are far shorter)."""
MAX_INSTRUCTIONS = 1 << 20
"""Most characters in ``instructions``."""
MAX_JSON_DEPTH = 128
"""Deepest nesting of objects and arrays in ``tools``, ``tool_choice`` and ``text``
(OpenAI's structured outputs allow 10 levels of schema objects, about 20 here)."""
MAX_JSON_SIZE = 1 << 20
"""Largest ``tools``, ``tool_choice`` or ``text``: their strings' and keys'
characters plus one per value."""


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``. Fields OpenAI defines and kvchat ignores are accepted
    (``extra="allow"``); see the module's docstring for what is refused."""

    model_config = ConfigDict(extra="allow")

    model: str
    input: Any = Field(description="A string, or a list of message, function_call and function_call_output items.")
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    stream: bool | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    reasoning: dict[str, Any] | None = Field(default=None, description="Accepted and ignored: no reasoning.")
    prompt_cache_key: str | None = Field(default=None, description="Accepted; the prefix cache needs no key.")
    client_metadata: dict[str, Any] | None = Field(default=None, description="Accepted and ignored (Codex's).")
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None

    @field_validator("instructions", "previous_response_id", "user")
    @classmethod
    def _echoed_text(cls, value: str | None, info: ValidationInfo) -> str | None:
        limits = {"instructions": MAX_INSTRUCTIONS, "previous_response_id": MAX_RESPONSE_ID, "user": MAX_USER}
        if value is not None:
            limit = limits[str(info.field_name)]
            if len(value) > limit:
                raise _echo_error(f"at most {limit} characters are allowed, not {len(value)}")
            if not _is_unicode(value):
                raise _echo_error("the text is not valid Unicode (it holds a lone surrogate)")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise _echo_error(f"at most {MAX_METADATA_PAIRS} key-value pairs are allowed, not {len(value)}")
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY:
                raise _echo_error(f"keys are at most {MAX_METADATA_KEY} characters; {quoted(key)} has {len(key)}")
            if len(text) > MAX_METADATA_VALUE:
                raise _echo_error(
                    f"values are at most {MAX_METADATA_VALUE} characters; the value of {quoted(key)} has {len(text)}"
                )
            if not _is_unicode(key):
                raise _echo_error(f"the key {quoted(key)} is not valid Unicode (it holds a lone surrogate)")
            if not _is_unicode(text):
                raise _echo_error(f"the value of {quoted(key)} is not valid Unicode (it holds a lone surrogate)")
        return value

    @field_validator("tools", "tool_choice", "text")
    @classmethod
    def _echoed_json(cls, value: Any, info: ValidationInfo) -> Any:
        problem = json_problem(value, str(info.field_name))
        if problem is not None:
            raise _echo_error(problem)
        return value


_Path = tuple[Any, str | int] | None
"""A place in a JSON value, as a linked list: (the parent's place, key or index); None is the root."""


def json_problem(
    value: Any, root: str, *, max_depth: int = MAX_JSON_DEPTH, max_size: int = MAX_JSON_SIZE
) -> str | None:
    """Why `value` cannot be echoed as JSON, or None if it can: a string or key
    that is not valid Unicode, a key that is not a string, a number JSON has no
    form for (NaN, infinity), a value of another type, objects and arrays nested
    deeper than `max_depth`, or a size (strings' and keys' characters plus one
    per value) beyond `max_size`. The reason names the place (``root`` then its
    path, as in ``tools[0].parameters``). Iterative: any depth is measured
    without recursion, and the walk stops at the first problem."""
    size = 0
    pending: list[tuple[Any, int, _Path]] = [(value, 0, None)]
    while pending:
        item, depth, path = pending.pop()
        size += 1
        if isinstance(item, str):
            size += len(item)
            if not _is_unicode(item):
                return f"the string at {_where(root, path)} is not valid Unicode (it holds a lone surrogate)"
        elif isinstance(item, (Mapping, list, tuple)):
            if depth >= max_depth:
                return f"{_where(root, path)} nests objects and arrays deeper than {max_depth} levels"
            if isinstance(item, Mapping):
                for key, inner in item.items():
                    if not isinstance(key, str):
                        return f"{_where(root, path)} has a key that is not a string: {shown(key)}"
                    if not _is_unicode(key):
                        return f"a key of {_where(root, path)} is not valid Unicode (it holds a lone surrogate)"
                    size += len(key)
                    pending.append((inner, depth + 1, (path, key)))
            else:
                pending.extend((inner, depth + 1, (path, index)) for index, inner in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"the number at {_where(root, path)} is {item}, which JSON cannot hold"
        elif item is not None and not isinstance(item, (bool, int)):
            return f"{_where(root, path)} is not a JSON value: {shown(item)}"
        if size > max_size:
            return f"the value is larger than {max_size} characters"
    return None


def _where(root: str, path: _Path, *, shown: int = 8) -> str:
    """`root` and `path` as ``tools[0].parameters``; beyond `shown` steps, the first
    and last few with ``...`` between them."""
    steps: list[str | int] = []
    while path is not None:
        path, step = path
        steps.append(step)
    steps.reverse()
    texts = [f"[{step}]" if isinstance(step, int) else f".{step[:40]}" for step in steps]
    if len(texts) > shown:
        texts = [*texts[: shown - 2], "...", *texts[-2:]]
    return root + "".join(texts)


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (a lone surrogate does not)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _echo_error(message: str) -> PydanticCustomError:
    """A validation error of an echoed field: a 400 whose ``param`` is the field.
    The message is made valid Unicode (it may quote what the client sent), and
    passed as context, so braces in it are not read as placeholders."""
    return PydanticCustomError("invalid_echoed_value", "{detail}", {"detail": valid_text(message)})


def check_supported(body: ResponsesRequest) -> None:
    """Refuse (400 `InvalidRequestError`, `field` = the param) what kvchat does not do.

    ``reasoning`` is accepted and ignored (the models do not reason; Codex sends
    ``{"effort": ..., "summary": "auto"}``): its ``effort`` and ``summary`` must be
    strings or null, their values are not checked."""
    if body.background:
        raise InvalidRequestError("background responses are not supported", field="background")
    if body.conversation is not None:
        raise InvalidRequestError(
            "conversations are not supported; chain responses with previous_response_id", field="conversation"
        )
    if body.prompt is not None:
        raise InvalidRequestError("prompt templates are not supported", field="prompt")
    if body.top_logprobs:
        raise InvalidRequestError("log probabilities are not supported", field="top_logprobs")
    if body.include and "message.output_text.logprobs" in body.include:
        raise InvalidRequestError("log probabilities are not supported", field="include")
    for key in ("effort", "summary"):
        value = (body.reasoning or {}).get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"reasoning.{key} must be a string or null", field=f"reasoning.{key}")


def response_format(text: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The chat `response_format` of `text.format` (None: free text). Its checks are
    :func:`kvchat.chat.response_format.grammar_for_response_format`'s."""
    if text is None:
        return None
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise InvalidRequestError("text.format must be an object with a 'type'", field="text.format")
    if fmt.get("type") != "json_schema":
        return dict(fmt)
    spec = {key: value for key, value in fmt.items() if key != "type"}
    return {"type": "json_schema", "json_schema": spec}


def response_frame(body: ResponsesRequest, settings: ServerSettings, sampling: SamplingParams) -> ResponseFrame:
    """What the response to `body` echoes of it (with a new id), on a server with
    `settings`, generating with `sampling`."""
    text = dict(body.text or {})
    text.setdefault("format", {"type": "text"})
    return ResponseFrame(
        id=new_id("resp", settings.response_id_tag),
        model=settings.model_name,
        instructions=body.instructions,
        previous_response_id=body.previous_response_id,
        tools=[_echoed_tool(tool) for tool in body.tools or ()],
        tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_output_tokens=body.max_output_tokens,
        max_tool_calls=body.max_tool_calls,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        store=body.store is not False,
        text=text,
        truncation=body.truncation or "disabled",
        metadata=dict(body.metadata or {}),
        user=body.user,
    )


def _echoed_tool(tool: Any) -> Any:
    """A tool as the response echoes it: a function tool with OpenAI's defaults."""
    if isinstance(tool, Mapping) and tool.get("type") == "function":
        return {"description": None, "parameters": None, "strict": None, **tool}
    return tool
