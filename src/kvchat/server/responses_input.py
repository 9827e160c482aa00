"""The `input` of a Responses API request (a string, or a list of items) as the
chat messages :meth:`kvchat.chat.ChatRuntime.complete` takes (:func:`input_messages`).

- ``message`` items (roles user, assistant, system, developer; content a string or
  ``input_text`` / ``output_text`` parts) become messages, ``function_call`` and
  ``custom_tool_call`` items become the assistant's ``tool_calls`` (calls that
  follow an assistant message join it), ``function_call_output`` and
  ``custom_tool_call_output`` items (output a string or text parts) become
  ``tool`` messages; ``reasoning`` items are dropped. Output items are valid input
  items, so a stored response's output becomes history the same way.

Decisions where OpenAI's API and kvchat differ: a ``developer`` message (and
`instructions`) is a ``system`` message, the role local models' templates know;
content parts are joined with newlines, as chat content parts are. Images, files
and audio (also in a call's output) and items of other types are refused with a
400 whose ``param`` names them (the rest of what is refused:
:func:`kvchat.server.responses_request.check_supported`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvchat.chat.tool_calls import check_call_name
from kvchat.chat.tool_requests import TOOL_NAME
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import shown
from kvchat.server.response_objects import arguments_json
from kvchat.server.responses_tools import flat_name

__all__ = ["ChatName", "input_messages", "known_calls"]

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")
_MAX_CALL_ID = 256


ChatName = Callable[[str, str | None], str]
"""The chat function name of a tool, from its name and namespace (None: none)."""


def _chat_name(name: str, namespace: str | None) -> str:
    """The chat name of a tool in a request that does not offer it (:func:`flat_name`)."""
    return name if namespace is None else flat_name(namespace, name)


def input_messages(
    items: str | Sequence[Any],
    *,
    calls: Mapping[str, str] | None = None,
    field: str = "input",
    names: ChatName = _chat_name,
) -> list[dict[str, Any]]:
    """The chat messages of a request's `input` (or of a response's output items).

    `calls` maps the call ids of the conversation so far to their function names:
    a ``function_call_output`` must answer a call made before it, there or in these
    items. `names` gives the chat function name of a called tool from its name and
    namespace (:meth:`kvchat.server.responses_tools.ToolOffer.chat_name`; by
    default :func:`flat_name` for a namespaced one). ``reasoning`` items are
    dropped. Raises `InvalidRequestError` whose `field` locates the bad value (such
    as ``input[2].content[0].type``).
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
        elif kind in ("function_call", "custom_tool_call"):
            call = _function_call(item, where, names) if kind == "function_call" else _custom_call(item, where, names)
            seen[call["id"]] = call["function"]["name"]
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append(_call_output(item, where, seen))
        elif kind != "reasoning":
            raise InvalidRequestError(
                f"{where}: items of type {shown(kind)} are not supported (only message, reasoning, "
                "function_call, function_call_output, custom_tool_call and custom_tool_call_output)",
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
            f"{where}.role must be 'user', 'assistant', 'system' or 'developer', not {shown(role)}",
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
                f"{where}[{index}]: parts of type {shown(kind)} are not supported (text only)",
                field=f"{where}[{index}].type",
            )
        text = part.get(key)
        if not isinstance(text, str):
            raise InvalidRequestError(f"{where}[{index}].{key} must be a string", field=f"{where}[{index}].{key}")
        texts.append(text)
    return "\n".join(texts)


def _function_call(item: Mapping[str, Any], where: str, names: ChatName) -> dict[str, Any]:
    arguments = item.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise InvalidRequestError(f"{where}.arguments must be a JSON string", field=f"{where}.arguments")
    return _chat_call(item, where, names, arguments)


def _custom_call(item: Mapping[str, Any], where: str, names: ChatName) -> dict[str, Any]:
    """A ``custom_tool_call`` as a call of the function its tool is offered as (one
    string argument, ``input``)."""
    text = item.get("input")
    if not isinstance(text, str):
        raise InvalidRequestError(f"{where}.input must be a string", field=f"{where}.input")
    return _chat_call(item, where, names, arguments_json({"input": text}))


def _chat_call(item: Mapping[str, Any], where: str, names: ChatName, arguments: str) -> dict[str, Any]:
    call_id, name, namespace = item.get("call_id"), item.get("name"), item.get("namespace")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= _MAX_CALL_ID:
        raise InvalidRequestError(
            f"{where}.call_id must be a string of 1 to {_MAX_CALL_ID} characters", field=f"{where}.call_id"
        )
    name = check_call_name(name, where)  # as the model wrote it
    if namespace is not None and not (isinstance(namespace, str) and TOOL_NAME.fullmatch(namespace)):
        raise InvalidRequestError(
            f"{where}.namespace must be 1 to 64 letters, digits, '_' or '-'", field=f"{where}.namespace"
        )
    function = {"name": names(name, namespace), "arguments": arguments}
    return {"id": call_id, "type": "function", "function": function}


def _call_output(item: Mapping[str, Any], where: str, calls: Mapping[str, str]) -> dict[str, Any]:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or call_id not in calls:
        raise InvalidRequestError(
            f"{where}: no call with call_id {shown(call_id)} precedes this output", field=f"{where}.call_id"
        )
    content = _text(item.get("output"), f"{where}.output")
    return {"role": "tool", "tool_call_id": call_id, "name": calls[call_id], "content": content}
