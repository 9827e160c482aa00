"""The chat plan: what a request asks of the model, worked out before any token.

:func:`plan_chat` is a pure function of the model's chat template (and of which
tool-call tags are single tokens of its vocabulary, given as data) and of the
request: it renders nothing but what deciding needs (the closing note of a
tool round is kept only if the template places it), tokenizes nothing and
touches no engine. What it decides, :class:`ChatPlan` holds, each value once:

- the messages and tools the prompt renders;
- the grammar the reply follows: a forced tool call (``tool_choice``
  ``"required"`` or a named function), else ``response_format``'s; the reply
  that closes a tool round (``"none"`` right after tool results) may not open a
  call (`kvchat.chat.tool_round`);
- the tokens banned from the reply (the single token that opens a call, when a
  tool round is closed);
- the tool-call format the reply is parsed in (None: the reply is plain text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kvchat.chat.response_format import grammar_for_response_format
from kvchat.chat.template import ChatTemplate
from kvchat.chat.tool_calls import HERMES, ToolCallFormat, detect_format
from kvchat.chat.tool_requests import normalize_tool_choice, tool_call_grammar, validate_tools
from kvchat.chat.tool_round import NO_CALL_OPENING, closing_messages
from kvchat.engine import Grammar, SamplingParams

__all__ = ["BANNED", "ChatPlan", "call_format", "plan_chat"]

BANNED = -100.0
"""The logit bias that keeps a banned token out of the reply."""


@dataclass(frozen=True)
class ChatPlan:
    """What a chat request asks of the model (see :func:`plan_chat`)."""

    messages: tuple[Mapping[str, Any], ...]
    """The messages the prompt renders: the request's, or those and the note that closes a tool round."""
    tools: tuple[Mapping[str, Any], ...] | None
    """The tools the prompt renders (None: none shown)."""
    grammar: Grammar | None
    """The grammar the reply follows (None: the caller's sampling decides)."""
    banned_tokens: tuple[int, ...]
    """Token ids the reply may not contain."""
    tool_format: ToolCallFormat | None
    """The format tool calls in the reply are read in (None: the reply is text only)."""

    def sampling(self, base: SamplingParams, *, prediction: Sequence[int] | None = None) -> SamplingParams:
        """`base` with the plan's grammar (if it has one), its bans and, if given,
        the `prediction` tokens in place of `base`'s."""
        grammar = self.grammar if self.grammar is not None else base.grammar
        bias = {**base.logit_bias, **dict.fromkeys(self.banned_tokens, BANNED)}
        drafts = tuple(prediction) if prediction is not None else base.prediction
        return replace(base, grammar=grammar, logit_bias=bias, prediction=drafts)


def call_format(template: ChatTemplate) -> ToolCallFormat:
    """The tool-call format `template` shows (Hermes if it shows none).

    Small models often write a call's JSON without its tags: in a format whose
    calls always start with a tag, a reply that starts with a JSON object naming
    a function and its arguments is read as a call too.
    """
    found = detect_format(template.source) or HERMES
    return found if found.bare_start is not None else replace(found, bare_start="{")


def plan_chat(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    response_format: Mapping[str, Any] | None = None,
    tag_tokens: Mapping[str, int] | None = None,
) -> ChatPlan:
    """The plan for a chat request: `messages`, `tools`, `tool_choice` and
    `response_format` as :func:`kvchat.chat.complete` takes them, on a model whose
    chat template is `template` and whose single-token tool-call tags are
    `tag_tokens` (tag text to token id, say ``{"<tool_call>": 151657}``; a
    forced call asks for those tokens, and the token that opens a call can be
    banned; tags not in it are spelled as text).

    Raises `InvalidRequestError` for bad tools (field ``tools``), `tool_choice`
    or `response_format`, and `TemplateRenderError` only if the template fails
    on something other than the closing note (a failing closing render means
    no note).
    """
    if tools is not None:
        validate_tools(tools)
    choice = normalize_tool_choice(tool_choice, tools)
    fmt = call_format(template)
    known = tag_tokens or {}
    tags = {tag: known[tag] for tag in (fmt.start, fmt.end) if tag and tag in known}
    closed = closing_messages(template, list(messages), tools) if choice == "none" and tools else None
    if closed is not None and tools:  # (`closed` implies tools)
        return ChatPlan(
            messages=tuple(closed),
            tools=tuple(tools),
            grammar=grammar_for_response_format(response_format) or NO_CALL_OPENING,
            banned_tokens=(tags[fmt.start],) if fmt.start in tags else (),
            tool_format=None,  # nothing in the reply is parsed as a call
        )
    visible = tuple(tools) if tools and choice != "none" else None
    return ChatPlan(
        messages=tuple(messages),
        tools=visible,
        grammar=_grammar(choice, visible or (), fmt, tags, response_format),
        banned_tokens=(),
        tool_format=fmt if visible else None,
    )


def _grammar(
    choice: str,
    tools: Sequence[Mapping[str, Any]],
    fmt: ToolCallFormat,
    tags: Mapping[str, int],
    response_format: Mapping[str, Any] | None,
) -> Grammar | None:
    """A forced call's grammar for a forcing `choice` (``"required"`` or a tool's
    name), else `response_format`'s (which a forced call overrides unread)."""
    if choice in ("none", "auto"):
        return grammar_for_response_format(response_format)
    return tool_call_grammar(tools, name=None if choice == "required" else choice, format=fmt, tag_tokens=tags)
