"""Agent Framework messages to OpenAI-shaped history dicts, and kvchat replies back to
Agent Framework contents and usage. Pure conversion: the chat logic is `kvchat.chat`'s."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from agent_framework import Content, FinishReason, Message, UsageDetails

from kvchat.chat import ToolCall
from kvchat.engine import Usage
from kvchat.errors import InvalidRequestError

logger = logging.getLogger(__name__)

__all__ = ["finish_reason", "function_call_contents", "messages_to_dicts", "usage_details"]

_ROLES = ("system", "developer", "user", "assistant", "tool")
# Framework bookkeeping that is not part of the conversation the model reads.
_SKIPPED = frozenset({"usage", "text_reasoning", "function_approval_request", "function_approval_response"})


def messages_to_dicts(messages: Iterable[Message], instructions: Sequence[str] = ()) -> list[dict[str, Any]]:
    """OpenAI-shaped messages (what :func:`kvchat.chat.complete` takes) for `messages`.

    - each of `instructions` becomes a leading system message, unless the history
      already starts with that very system message;
    - text contents become the message's ``content``: an assistant's pieces joined
      as they are (they are parts of one generated reply, which kvchat then finds in
      its cache token for token), other roles' parts joined with newlines;
    - `function_call` contents become the message's ``tool_calls`` (arguments as a
      JSON string);
    - every `function_result` becomes its own ``tool`` message with ``tool_call_id``;
    - usage, reasoning and approval contents are framework bookkeeping and skipped;
    - anything else (images, files, hosted tools) raises `InvalidRequestError`
      (field ``messages``): the local models read text only.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        out.extend(_message_dicts(message))
    leading = 0
    for text in instructions:
        if leading < len(out) and out[leading].get("role") == "system" and out[leading].get("content") == text:
            leading += 1
            continue
        out.insert(leading, {"role": "system", "content": text})
        leading += 1
    return out


def _message_dicts(message: Message) -> list[dict[str, Any]]:
    role = message.role
    if role not in _ROLES:
        raise InvalidRequestError(f"unsupported message role {role!r}", field="messages")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for content in message.contents:
        if content.type == "text":
            texts.append(content.text or "")
        elif content.type == "function_call":
            calls.append(_tool_call(content))
        elif content.type == "function_result":
            results.append(_tool_result(content))
        elif content.type not in _SKIPPED:
            raise InvalidRequestError(
                f"a {role} message holds {content.type!r} content: local models read text, "
                "function calls and function results only",
                field="messages",
            )
    out: list[dict[str, Any]] = []
    if texts or calls:
        text = ("" if role == "assistant" else "\n").join(texts)
        entry: dict[str, Any] = {"role": role, "content": text}
        if calls:
            entry["content"] = text or None
            entry["tool_calls"] = calls
        if message.author_name and role != "tool":
            entry["name"] = message.author_name
        out.append(entry)
    out.extend(results)
    return out


def _tool_call(content: Content) -> dict[str, Any]:
    arguments = content.arguments
    if arguments is None or arguments == "":
        arguments = "{}"
    elif isinstance(arguments, Mapping):
        arguments = json.dumps(dict(arguments), ensure_ascii=False)
    return {"id": content.call_id or "", "type": "function", "function": {"name": content.name, "arguments": arguments}}


def _tool_result(content: Content) -> dict[str, Any]:
    items = content.items or []
    rich = [item.type for item in items if item.type != "text"]
    if rich:
        raise InvalidRequestError(
            f"a function result holds {rich[0]!r} content: local models read text results only", field="messages"
        )
    text = content.result if isinstance(content.result, str) else "" if content.result is None else str(content.result)
    return {"role": "tool", "tool_call_id": content.call_id or "", "content": text}


def function_call_contents(calls: Iterable[ToolCall]) -> list[Content]:
    """Agent Framework function calls for kvchat tool calls: kvchat's unique id as the
    `call_id`, the arguments as the JSON string the model wrote them as."""
    return [
        Content.from_function_call(
            call_id=call.id, name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False)
        )
        for call in calls
    ]


def usage_details(usage: Usage) -> UsageDetails:
    """Agent Framework's usage for kvchat's.

    `cache_read_input_token_count` is kvchat's `cached_tokens` (prompt tokens reused
    from the KV cache); ``prompt/evaluated_tokens`` the prompt tokens the model ran;
    with speculative decoding, ``completion/accepted_prediction_tokens`` and
    ``completion/rejected_prediction_tokens`` as the OpenAI client names them.
    """
    counts: dict[str, int] = {
        "input_token_count": usage.prompt_tokens,
        "output_token_count": usage.completion_tokens,
        "total_token_count": usage.prompt_tokens + usage.completion_tokens,
        "cache_read_input_token_count": usage.cached_tokens,
        "prompt/evaluated_tokens": usage.evaluated_tokens,
    }
    if usage.draft_tokens:
        counts["completion/accepted_prediction_tokens"] = usage.accepted_draft_tokens
        counts["completion/rejected_prediction_tokens"] = usage.rejected_draft_tokens
    return cast(UsageDetails, counts)


def finish_reason(reason: str | None) -> FinishReason | None:
    """Agent Framework's finish reason for kvchat's (``cancelled`` is kept as it is)."""
    return None if reason is None else FinishReason(reason)
