"""The reply that closes a tool round: `tool_choice` "none" right after tool results.

Agent loops (Agent Framework's, when it reaches its iteration limit) ask for the
answer after a tool round with `tool_choice` "none". Hiding the tools for that
call, as kvchat does for "none" elsewhere, renders a different system prompt: the
call then re-reads the whole conversation, and the next turn (tools shown again)
re-reads the round. Instead, such a call keeps the tools in the prompt, so it
continues the prompt that made the tool call, and closes with a short system
message asking for the answer. A grammar keeps the reply from opening with a
call (a tag, a JSON object or list, a code fence, or blank space before one), and
the control token that opens a call in the model's format is banned anywhere.

On the packaged Qwen 0.5B this also answers better: with the tools hidden it
repeats the call's JSON as its answer; closed this way it answers from the
result. A question that does not follow a tool round keeps the tools hidden: a
small model shown tools writes calls even when told not to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvchat.chat.template import ChatTemplate, TemplateRenderError
from kvchat.engine import Grammar

CLOSING_NOTE = "Answer the user now, in plain text, from the tool results above. Do not call a tool."
"""The system message that closes a tool round's prompt (it is not part of the conversation)."""

NO_CALL_OPENING = Grammar.regex(r'[^<{\[`" \t\r\n](?s:.)*', field="tool_choice")
"""A reply whose first character cannot open a tool call (or blank space before one)."""


def closing_messages(
    template: ChatTemplate, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]] | None:
    """`messages` with the closing note, if they end with tool results and the
    template renders a system message there (with `tools`); else None."""
    if not messages or not isinstance(messages[-1], Mapping) or messages[-1].get("role") != "tool":
        return None
    closed = [*messages, {"role": "system", "content": CLOSING_NOTE}]
    try:
        rendered = template.render(template.normalize(closed), tools, True)
    except TemplateRenderError:
        return None
    # Some templates drop a system message that is not the first, or move it to the top.
    result = messages[-1].get("content")
    after = rendered.rfind(result) if isinstance(result, str) and result else -1
    return closed if rendered.count(CLOSING_NOTE) == 1 and rendered.find(CLOSING_NOTE) > after else None
