"""Semantic Kernel chat history to OpenAI-shaped messages, and kvchat replies back
to Semantic Kernel contents. Pure conversion: the chat logic is `kvchat.chat`'s."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from semantic_kernel.contents import (
    ChatHistory,
    ChatMessageContent,
    FunctionCallContent,
    FunctionResultContent,
    TextContent,
)
from semantic_kernel.contents.utils.author_role import AuthorRole
from semantic_kernel.contents.utils.finish_reason import FinishReason

from kvchat.chat import ToolCall
from kvchat.engine import Usage

logger = logging.getLogger(__name__)

__all__ = ["finish_reason", "function_call_contents", "history_to_messages", "usage_metadata"]


def history_to_messages(history: ChatHistory | Iterable[ChatMessageContent]) -> list[dict[str, Any]]:
    """OpenAI-shaped messages for `history`.

    - system, developer and user messages keep their role and their text;
    - an assistant message with `FunctionCallContent` items becomes one message with
      ``tool_calls`` (id, name, arguments as a JSON string) and its text, if any;
    - every `FunctionResultContent` becomes its own ``tool`` message with
      ``tool_call_id`` (Semantic Kernel may put several results in one message);
    - items that are neither text, calls nor results (images, files) are skipped
      with a warning: the local models here read text only.
    """
    messages = history.messages if isinstance(history, ChatHistory) else list(history)
    out: list[dict[str, Any]] = []
    for message in messages:
        results = [item for item in message.items if isinstance(item, FunctionResultContent)]
        if results:
            out.extend(_tool_message(result) for result in results)
            continue
        calls = [item for item in message.items if isinstance(item, FunctionCallContent)]
        text = _text_of(message)
        entry: dict[str, Any] = {"role": message.role.value, "content": text}
        if calls:
            entry["content"] = text or None
            entry["tool_calls"] = [_tool_call(call) for call in calls]
        if message.name and message.role != AuthorRole.TOOL:
            entry["name"] = message.name
        out.append(entry)
    return out


def _text_of(message: ChatMessageContent) -> str:
    texts = []
    for item in message.items:
        if isinstance(item, TextContent):
            texts.append(item.text)
        elif not isinstance(item, FunctionCallContent):
            logger.warning(
                "skipping a %s item of a %s message: only text is supported", type(item).__name__, message.role.value
            )
    return "".join(texts)


def _tool_call(call: FunctionCallContent) -> dict[str, Any]:
    arguments = call.arguments
    if arguments is None:
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = json.dumps(dict(arguments), ensure_ascii=False)
    return {"id": call.id or "", "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _tool_message(result: FunctionResultContent) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": result.id or "", "content": str(result.result)}


def function_call_contents(calls: Iterable[ToolCall], start_index: int = 0) -> list[FunctionCallContent]:
    """Semantic Kernel function calls for kvchat tool calls: each keeps kvchat's
    unique id and gets its position in the reply as `index`."""
    return [
        FunctionCallContent(
            id=call.id, index=start_index + i, name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False)
        )
        for i, call in enumerate(calls)
    ]


def usage_metadata(usage: Usage) -> dict[str, Any]:
    """`usage` as the plain dict stored in ``metadata["usage"]``."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": usage.cached_tokens,
        "evaluated_tokens": usage.evaluated_tokens,
        "time_to_first_token": usage.time_to_first_token,
    }


def finish_reason(reason: str | None) -> FinishReason | None:
    """Semantic Kernel's finish reason for kvchat's (``cancelled`` has none)."""
    if reason in ("stop", "length", "tool_calls"):
        return FinishReason(reason)
    return None
