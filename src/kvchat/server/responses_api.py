"""The request of OpenAI's Responses API (``POST /v1/responses``) and its translation
to what :meth:`kvchat.chat.ChatRuntime.complete` takes, and to what the response
echoes of it (:func:`response_frame`).

- `input` (a string, or a list of items) becomes chat messages
  (:func:`input_messages`): ``message`` items (roles user, assistant, system,
  developer; content a string or ``input_text`` / ``output_text`` parts) become
  messages, ``function_call`` items become the assistant's ``tool_calls`` (calls
  that follow an assistant message join it), ``function_call_output`` items become
  ``tool`` messages. Output items are valid input items, so a stored response's
  output becomes history the same way.
- `tools` in the Responses shape (``{"type": "function", "name", "parameters"}``)
  become chat tools; `tool_choice` ``{"type": "function", "name"}`` and
  ``{"type": "allowed_tools", ...}`` become chat's choices (:func:`chat_tools`).
- `text.format` becomes `response_format` (:func:`response_format`).

Decisions where OpenAI's API and kvchat differ: a ``developer`` message (and
`instructions`) is a ``system`` message, the role local models' templates know;
content parts are joined with newlines, as chat content parts are. What kvchat
cannot do is refused with a 400 whose ``param`` names it
(:func:`check_supported`): built-in tools, images, files and audio, items of other
types, ``background``, ``conversation``, ``prompt`` templates, log probabilities,
reasoning effort. Other fields OpenAI defines (``metadata``, ``user``,
``service_tier``, ``prompt_cache_key``, ...) are accepted; ``metadata`` and
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
says where in the value the problem is. The number of tools is bounded by the
server's ``max_tools`` setting (checked by the route).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from kvchat.engine import SamplingParams
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import valid_text
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
    "chat_tools",
    "check_supported",
    "input_messages",
    "json_problem",
    "known_calls",
    "response_format",
]

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_CALL_ID = 256

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
    reasoning: dict[str, Any] | None = None
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
                raise _echo_error(f"keys are at most {MAX_METADATA_KEY} characters; {_quoted(key)} has {len(key)}")
            if len(text) > MAX_METADATA_VALUE:
                raise _echo_error(
                    f"values are at most {MAX_METADATA_VALUE} characters; the value of {_quoted(key)} has {len(text)}"
                )
            if not _is_unicode(key):
                raise _echo_error(f"the key {_quoted(key)} is not valid Unicode (it holds a lone surrogate)")
            if not _is_unicode(text):
                raise _echo_error(f"the value of {_quoted(key)} is not valid Unicode (it holds a lone surrogate)")
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
                        return f"{_where(root, path)} has a key that is not a string: {_shown(key)}"
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
            return f"{_where(root, path)} is not a JSON value: {_shown(item)}"
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
    """Refuse (400 `InvalidRequestError`, `field` = the param) what kvchat does not do."""
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
    effort = (body.reasoning or {}).get("effort")
    if effort not in (None, "none"):
        raise InvalidRequestError("this model does not reason: reasoning.effort is not supported", field="reasoning")


def input_messages(
    items: str | Sequence[Any], *, calls: Mapping[str, str] | None = None, field: str = "input"
) -> list[dict[str, Any]]:
    """The chat messages of a request's `input` (or of a response's output items).

    `calls` maps the call ids of the conversation so far to their function names:
    a ``function_call_output`` must answer a call made before it, there or in these
    items. Raises `InvalidRequestError` whose `field` locates the bad value (such as
    ``input[2].content[0].type``).
    """
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, Sequence):
        raise InvalidRequestError(f"{field} must be a string or a list of items", field=field)
    seen = dict(calls or {})
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"{field}[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidRequestError(f"{where} must be an object", field=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            seen[call["id"]] = call["function"]["name"]
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(_function_call_output(item, where, seen))
        else:
            raise InvalidRequestError(
                f"{where}: items of type {_shown(kind)} are not supported "
                "(only message, function_call and function_call_output)",
                field=f"{where}.type",
            )
    return messages


def known_calls(history: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The tool calls made in `history` (chat messages): call id to function name."""
    return {call["id"]: call["function"]["name"] for message in history for call in message.get("tool_calls") or ()}


def _message(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRequestError(
            f"{where}.role must be 'user', 'assistant', 'system' or 'developer', not {_shown(role)}",
            field=f"{where}.role",
        )
    return {"role": _ROLES[role], "content": _text(item.get("content"), f"{where}.content")}


def _text(content: Any, where: str) -> str:
    """A content string, or the texts of a list of text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where} must be a string or a list of text parts", field=where)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in (*_TEXT_PARTS, "refusal"):
            raise InvalidRequestError(
                f"{where}[{index}]: parts of type {_shown(kind)} are not supported (text only)",
                field=f"{where}[{index}].type",
            )
        text = part.get(key)
        if not isinstance(text, str):
            raise InvalidRequestError(f"{where}[{index}].{key} must be a string", field=f"{where}[{index}].{key}")
        texts.append(text)
    return "\n".join(texts)


def _function_call(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "{}")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= _MAX_CALL_ID:
        raise InvalidRequestError(
            f"{where}.call_id must be a string of 1 to {_MAX_CALL_ID} characters", field=f"{where}.call_id"
        )
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(f"{where}.name must be 1 to 64 letters, digits, '_' or '-'", field=f"{where}.name")
    if not isinstance(arguments, str):
        raise InvalidRequestError(f"{where}.arguments must be a JSON string", field=f"{where}.arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _function_call_output(item: Mapping[str, Any], where: str, calls: Mapping[str, str]) -> dict[str, Any]:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or call_id not in calls:
        raise InvalidRequestError(
            f"{where}: no function_call with call_id {_shown(call_id)} precedes this output",
            field=f"{where}.call_id",
        )
    content = _text(item.get("output"), f"{where}.output")
    return {"role": "tool", "tool_call_id": call_id, "name": calls[call_id], "content": content}


def chat_tools(
    tools: Sequence[Any] | None, tool_choice: str | Mapping[str, Any] | None
) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None]:
    """The chat `tools` and `tool_choice` of the Responses API's.

    Function tools only; ``{"type": "allowed_tools", "mode", "tools"}`` keeps the
    named tools, with its mode as the choice. Raises `InvalidRequestError` (field
    ``tools[i]`` or ``tool_choice``); the tools' names and schemas are checked by
    :meth:`kvchat.chat.ChatRuntime.complete`.
    """
    converted = None if tools is None else [_chat_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    if tool_choice is None or isinstance(tool_choice, str):
        if tool_choice not in (None, "auto", "none", "required"):
            raise InvalidRequestError(
                f"tool_choice must be 'auto', 'none', 'required' or an object, not {_shown(tool_choice)}",
                field="tool_choice",
            )
        return converted, tool_choice
    kind = tool_choice.get("type")
    if kind == "function":
        return converted, {"type": "function", "function": {"name": tool_choice.get("name")}}
    if kind == "allowed_tools":
        mode, allowed = tool_choice.get("mode", "auto"), tool_choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise InvalidRequestError(
                "tool_choice allowed_tools needs a mode ('auto' or 'required') and a list of tools",
                field="tool_choice",
            )
        names = {tool.get("name") for tool in allowed if isinstance(tool, Mapping)}
        kept = [tool for tool in converted or () if tool["function"].get("name") in names]
        return kept or None, mode if kept else "none"
    raise InvalidRequestError(
        f"tool_choice of type {_shown(kind)} is not supported (only function tools)", field="tool_choice"
    )


def _chat_tool(tool: Any, where: str) -> dict[str, Any]:
    kind = tool.get("type") if isinstance(tool, Mapping) else None
    if kind != "function":
        raise InvalidRequestError(
            f"{where}: tools of type {_shown(kind)} are not supported (only function tools)", field=f"{where}.type"
        )
    if isinstance(tool.get("function"), Mapping):  # the chat completions shape, sent here by some clients
        return {"type": "function", "function": dict(tool["function"])}
    function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
    return {"type": "function", "function": function}


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


def _echoed_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    return {"description": None, "parameters": None, "strict": None, **tool}


def _shown(value: object) -> str:
    return repr(value)[:60]


def _quoted(text: str, limit: int = 40) -> str:
    """`text` quoted (escapes shown), cut to its first `limit` characters."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")
