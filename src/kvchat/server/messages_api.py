"""The request of Anthropic's Messages API (``POST /v1/messages`` and
``POST /v1/messages/count_tokens``) and its translation to what
:meth:`kvchat.chat.ChatRuntime.complete` takes; the usage and stop reason of a
reply in Anthropic's terms. Pure: no I/O, no engine.

Translation (:func:`chat_request`):

- `system` (a string, or a list of ``text`` blocks, joined with newlines) is the
  first message, a ``system`` one. A ``system`` message inside `messages` (which
  Anthropic's API does not define, and Claude Code sends after the first user
  message) is a system message there, its content read the same way: a string
  or one block of the same text render the same prompt, so the prefix cache
  holds when a client switches between them.
- ``user`` messages: a string, or blocks. ``text`` blocks (joined with newlines)
  make one user message; each ``tool_result`` block is a ``tool`` message (its
  `content` a string or ``text`` blocks; ``is_error: true`` puts ``"Error: "``
  before its text, since local templates have no error flag), in the order of the
  blocks. A ``tool_result`` must answer a ``tool_use`` made earlier in the
  conversation. A ``tool_reference`` block in a result (what a tool search
  returns) is the line ``Tool loaded: NAME``, and loads that deferred tool.
- ``assistant`` messages: ``text`` blocks are the content, ``tool_use`` blocks
  (``id``, ``name``, ``input`` object) the ``tool_calls`` (the input written as
  JSON); ``thinking`` and ``redacted_thinking`` blocks, which clients such as
  Claude Code send back, are dropped (the models here do not think in blocks),
  and a message left with nothing is dropped with them.
- `tools` (``name``, ``description``, ``input_schema``) become function tools; a
  tool with ``defer_loading: true`` is left out of the prompt, as Anthropic leaves
  it out of the model's context, until a ``tool_reference`` has loaded it;
  `tool_choice` ``auto`` / ``any`` / ``tool`` (``name``) / ``none`` become chat's
  ``"auto"`` / ``"required"`` / the named function / ``"none"``;
  ``disable_parallel_tool_use: true`` keeps the reply's first call only.
- ``cache_control`` is accepted on any block, tool or system text and ignored:
  kvchat caches every prefix anyway. `metadata`, `thinking`, `context_management`,
  `output_config`, `service_tier` and fields Anthropic adds later are accepted and
  ignored (``extra="allow"``).

Sampling (:func:`sampling`): `max_tokens` (required, as Anthropic requires it) is
*clamped*, not refused: to the server's `max_tokens_limit` here, and by the route
to the room the prompt leaves in the context (Claude Code asks for 32,000 on
every call). `temperature` (0 to 1), `top_p` and `top_k` as given; unset ones keep
kvchat's defaults. `stop_sequences` are matched in the reply's text by
:class:`kvchat.server.stop_scanner.StopScanner`, not by the engine, so that the
reply can say which one stopped it (``stop_reason: "stop_sequence"``,
``stop_sequence``).

Refused with a 400 (`InvalidRequestError`) whose field, named at the start of the
message, locates the value (``messages[2].content[0]: image blocks are not
supported``): image, document and other non-text blocks, server tools' blocks
(``server_tool_use``, ``web_search_tool_result``, ...), server tools (a tool whose
``type`` is other than absent or ``"custom"``: ``web_search_20250305``,
``bash_20250124``, ``text_editor_*``, ...), a final ``assistant`` message (a
prefill: the reply would have to continue it, and kvchat answers after the last
message), roles other than ``user``, ``assistant`` and ``system``, a ``tool_result`` that
answers no earlier ``tool_use``, and JSON (a tool's ``input``, a tool's
``input_schema``) nested deeper than :data:`MAX_JSON_DEPTH`.

Usage (:func:`anthropic_usage`): ``input_tokens`` are the prompt tokens the engine
evaluated (not read from the cache), ``cache_read_input_tokens`` those it reused
from the prefix cache, ``cache_creation_input_tokens`` always 0: the evaluated
tokens are kept by the prefix cache too, but they are counted once, as
``input_tokens``, so that Anthropic's total input (``input_tokens +
cache_read_input_tokens + cache_creation_input_tokens``) is the prompt's length,
which is what ``count_tokens`` gives for the same request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from kvchat.chat.tool_calls import check_call_name
from kvchat.engine import SamplingParams, Usage
from kvchat.engine.sampling import MAX_STOP_LENGTH, MAX_STOP_STRINGS
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import quoted, shown

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_MODEL_ID",
    "MAX_TOP_K",
    "ChatRequest",
    "CountTokensRequest",
    "MessagesRequest",
    "anthropic_usage",
    "chat_request",
    "sampling",
    "start_usage",
    "stop_reason",
    "stop_sequences",
]

MAX_MODEL_ID = 256
"""Most characters in `model` (the reply echoes it)."""
MAX_TOP_K = 2**31 - 1
"""Largest `top_k` (llama.cpp takes a C ``int``; any value past the vocabulary keeps every token)."""
MAX_JSON_DEPTH = 128
"""Deepest nesting of objects and arrays in a ``tool_use`` input or a tool's ``input_schema``."""

_MAX_TOOL_USE_ID = 256
_DROPPED = frozenset({"thinking", "redacted_thinking"})
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


class CountTokensRequest(BaseModel):
    """``POST /v1/messages/count_tokens``: what the prompt is made of (no generation options)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: Any = None
    """Accepted and ignored (the models here do not think in blocks)."""
    context_management: Any = None
    """Accepted and ignored."""

    @field_validator("model")
    @classmethod
    def _echoable(cls, value: str) -> str:
        if len(value) > MAX_MODEL_ID:
            raise PydanticCustomError(
                "model_id", "the model id is longer than {limit} characters", {"limit": MAX_MODEL_ID}
            )
        if not _is_unicode(value):
            raise PydanticCustomError("model_id", "the model id is not valid Unicode (it holds a lone surrogate)")
        return value


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``: the prompt, and how to generate the reply."""

    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=MAX_TOP_K)
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    """Accepted and ignored (``user_id``): cache isolation follows the API key."""
    output_config: Any = None
    """Accepted and ignored."""
    service_tier: Any = None
    """Accepted and ignored."""


@dataclass(frozen=True)
class ChatRequest:
    """A Messages request as the chat runtime takes it."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any] | None
    max_calls: int | None
    """Most tool calls the reply keeps (1 with ``disable_parallel_tool_use``; None: all)."""


def chat_request(body: CountTokensRequest) -> ChatRequest:
    """The chat messages, tools and tool choice of `body` (see the module's docstring).
    Raises `InvalidRequestError` whose `field` locates the refused value."""
    messages = [] if body.system is None else [{"role": "system", "content": _text(body.system, "system")}]
    seen = _Seen()
    messages += _conversation(body.messages, seen)
    tools = _tools(body.tools, seen.loaded) if body.tools else None
    tool_choice, max_calls = _tool_choice(body.tool_choice)
    if not tools and tool_choice in ("auto", "none"):
        tool_choice = None  # (chat refuses a choice among no tools; these two choose nothing)
    return ChatRequest(messages, tools, tool_choice, max_calls)


@dataclass
class _Seen:
    """What the conversation so far has made known."""

    calls: dict[str, str] = field(default_factory=dict)
    """The ids of its ``tool_use`` blocks, with their tools' names."""
    loaded: set[str] = field(default_factory=set)
    """The deferred tools its ``tool_reference`` blocks have loaded."""


def _text(content: str | list[Any], where: str) -> str:
    """A string, or the texts of a list of ``text`` blocks joined with newlines."""
    if isinstance(content, str):
        return content
    return "\n".join(_block_text(block, f"{where}[{index}]") for index, block in enumerate(content))


def _conversation(messages: Sequence[Mapping[str, Any]], seen: _Seen) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, (str, list)):
            raise InvalidRequestError(f"{where}.content must be a string or a list of blocks", field=f"{where}.content")
        if role == "user":
            out += _user(content, f"{where}.content", seen)
        elif role == "system":  # Claude Code sends one after the first user message
            out.append({"role": "system", "content": _text(content, f"{where}.content")})
        elif role == "assistant":
            if index == len(messages) - 1:
                raise InvalidRequestError(
                    f"{where}: a final assistant message (a prefill) is not supported; "
                    "the last message must be the user's",
                    field=where,
                )
            reply = _assistant(content, f"{where}.content", seen.calls)
            if reply is not None:
                out.append(reply)
        else:
            raise InvalidRequestError(
                f"{where}.role must be 'user', 'assistant' or 'system', not {shown(role)}", field=f"{where}.role"
            )
    return out


def _user(content: str | list[Any], where: str, seen: _Seen) -> list[dict[str, Any]]:
    """The chat messages of a user message: its text, and a tool message per result, in order."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for index, block in enumerate(content):
        at = f"{where}[{index}]"
        kind = _kind(block, at)
        if kind == "text":
            texts.append(_block_text(block, at))
        elif kind == "tool_result":
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            out.append(_tool_result(block, at, seen))
        else:
            raise _unsupported(kind, at, "text and tool_result")
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant(content: str | list[Any], where: str, calls: dict[str, str]) -> dict[str, Any] | None:
    """The chat message of an assistant message (None if only thinking blocks were in it)."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        at = f"{where}[{index}]"
        kind = _kind(block, at)
        if kind == "text":
            texts.append(_block_text(block, at))
        elif kind == "tool_use":
            call = _tool_use(block, at)
            calls[call["id"]] = call["function"]["name"]
            tool_calls.append(call)
        elif kind not in _DROPPED:
            raise _unsupported(kind, at, "text, tool_use and thinking")
    if not texts and not tool_calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _kind(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, Mapping) else None
    if not isinstance(kind, str):
        raise InvalidRequestError(f"{where} must be a block: an object with a 'type'", field=where)
    return kind


def _unsupported(kind: str, where: str, allowed: str) -> InvalidRequestError:
    """The refusal of a `kind` block at `where`, where only `allowed` blocks may be."""
    if kind in ("image", "document"):
        reason = f"{kind} blocks are not supported"
    else:
        reason = f"{quoted(kind)} blocks are not supported here ({allowed} only)"
    return InvalidRequestError(f"{where}: {reason}", field=where)


def _block_text(block: Any, where: str) -> str:
    """The text of a ``text`` block (any other block is refused)."""
    kind = _kind(block, where)
    if kind != "text":
        raise _unsupported(kind, where, "text")
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequestError(f"{where}.text must be a string", field=f"{where}.text")
    return text


def _tool_use(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not 0 < len(call_id) <= _MAX_TOOL_USE_ID:
        raise InvalidRequestError(
            f"{where}.id must be a string of 1 to {_MAX_TOOL_USE_ID} characters", field=f"{where}.id"
        )
    name = check_call_name(name, where)  # as the model wrote it
    if not isinstance(arguments, Mapping):
        raise InvalidRequestError(f"{where}.input must be an object", field=f"{where}.input")
    _check_depth(arguments, f"{where}.input")
    text = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def _tool_result(block: Mapping[str, Any], where: str, seen: _Seen) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or call_id not in seen.calls:
        raise InvalidRequestError(
            f"{where}.tool_use_id: no tool_use with id {shown(call_id)} precedes this result",
            field=f"{where}.tool_use_id",
        )
    content = block.get("content", "")
    if isinstance(content, list):
        content = "\n".join(_result_part(part, f"{where}.content[{index}]", seen) for index, part in enumerate(content))
    elif not isinstance(content, str):
        raise InvalidRequestError(
            f"{where}.content must be a string or a list of text blocks", field=f"{where}.content"
        )
    if block.get("is_error") is True:
        content = "Error: " + content
    return {"role": "tool", "tool_call_id": call_id, "name": seen.calls[call_id], "content": content}


def _result_part(block: Any, where: str, seen: _Seen) -> str:
    """The text of a tool result's block: a ``text`` block, or a ``tool_reference``
    (a tool search's find), which loads the deferred tool it names."""
    if _kind(block, where) != "tool_reference":
        return _block_text(block, where)
    name = block.get("tool_name")
    if not isinstance(name, str):
        raise InvalidRequestError(f"{where}.tool_name must be a string", field=f"{where}.tool_name")
    seen.loaded.add(name)
    return f"Tool loaded: {name}"


def _tools(tools: Sequence[Mapping[str, Any]], loaded: set[str]) -> list[dict[str, Any]] | None:
    """The chat tools of `tools`: the custom ones, but those with ``defer_loading``
    that no ``tool_reference`` has `loaded` (None if none is left)."""
    converted = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        kind, name = tool.get("type"), tool.get("name")
        if kind not in (None, "custom"):
            raise InvalidRequestError(
                f"{where}: server tools ({shown(kind)}) are not supported; "
                "only custom tools, with a name and an input_schema",
                field=where,
            )
        if tool.get("defer_loading") is True and not (isinstance(name, str) and name in loaded):
            continue
        function = {key: tool[key] for key in ("name", "description") if tool.get(key) is not None}
        schema = tool.get("input_schema")
        if schema is not None:
            _check_depth(schema, f"{where}.input_schema")
            function["parameters"] = schema
        converted.append({"type": "function", "function": function})
    return converted or None


def _tool_choice(choice: Mapping[str, Any] | None) -> tuple[str | dict[str, Any] | None, int | None]:
    """Chat's tool choice for Anthropic's, and the most calls the reply keeps."""
    if choice is None:
        return None, None
    kind = choice.get("type")
    max_calls = 1 if choice.get("disable_parallel_tool_use") is True else None
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise InvalidRequestError("tool_choice.name must name a tool", field="tool_choice.name")
        return {"type": "function", "function": {"name": name}}, max_calls
    if not isinstance(kind, str) or kind not in _CHOICES:
        raise InvalidRequestError(
            f"tool_choice.type must be 'auto', 'any', 'tool' or 'none', not {shown(kind)}", field="tool_choice.type"
        )
    return _CHOICES[kind], max_calls


def _check_depth(value: Any, where: str) -> None:
    """Refuse JSON `value` nested deeper than `MAX_JSON_DEPTH` (iteratively: any depth is measured)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (Mapping, list)):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidRequestError(
                    f"{where} nests objects and arrays deeper than {MAX_JSON_DEPTH} levels", field=where
                )
            inner = item.values() if isinstance(item, Mapping) else item
            pending.extend((child, depth + 1) for child in inner)


def sampling(
    body: MessagesRequest, max_tokens_limit: int | None, defaults: Mapping[str, Any] | None = None
) -> SamplingParams:
    """How to generate `body`'s reply: its `max_tokens` clamped to `max_tokens_limit`
    (None: no limit), its `temperature`, `top_p` and `top_k`; `defaults` (the
    server's, as `SamplingParams` keyword arguments), then kvchat's, for the unset
    ones. The stop sequences are not the engine's (see
    :class:`kvchat.server.stop_scanner.StopScanner`)."""
    limit = body.max_tokens if max_tokens_limit is None else min(body.max_tokens, max_tokens_limit)
    options: dict[str, Any] = {"max_tokens": limit, **(defaults or {})}
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(body, name)
        if value is not None:
            options[name] = value
    return SamplingParams(**options)


def stop_sequences(values: Sequence[str] | None) -> tuple[str, ...]:
    """`stop_sequences`, checked: at most the engine's `MAX_STOP_STRINGS`, each
    non-empty and at most `MAX_STOP_LENGTH` characters (`InvalidRequestError` otherwise)."""
    if not values:
        return ()
    if len(values) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"stop_sequences: {len(values)} sequences; at most {MAX_STOP_STRINGS}", field="stop_sequences"
        )
    for index, value in enumerate(values):
        if not 0 < len(value) <= MAX_STOP_LENGTH:
            where = f"stop_sequences[{index}]"
            raise InvalidRequestError(f"{where} must have 1 to {MAX_STOP_LENGTH} characters", field=where)
    return tuple(values)


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    """Anthropic's ``stop_reason`` for a chat reply's finish reason (or the stop
    sequence that ended it): ``end_turn``, ``max_tokens``, ``tool_use`` or ``stop_sequence``."""
    if stop_sequence is not None:
        return "stop_sequence"
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "tool_calls":
        return "tool_use"
    return "end_turn"


def anthropic_usage(usage: Usage) -> dict[str, int]:
    """A finished reply's `usage` in Anthropic's terms (see the module's docstring)."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }


def start_usage(prompt_tokens: int) -> dict[str, int]:
    """The usage a stream's ``message_start`` carries, before the engine has read the
    cache: the whole prompt as ``input_tokens``. The ``message_delta`` at the end
    carries the split (:func:`anthropic_usage`), which the clients take in its place."""
    return {
        "input_tokens": prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 0,
    }


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (a lone surrogate does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
