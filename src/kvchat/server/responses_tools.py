"""The `tools` and `tool_choice` of a Responses API request as chat's tools and
choice (:func:`chat_tools`, which also says how the model's calls map back:
:class:`ToolOffer`), for :meth:`kvchat.chat.ChatRuntime.complete`.

How the tools OpenAI's Codex CLI sends are served (the rest of its request:
:mod:`kvchat.server.responses_api`):

- **Namespaced tools.** A ``namespace`` tool's functions (Codex's ``multi_agent_v1``,
  its MCP servers, dynamic tools) are offered to the model under :func:`flat_name`,
  Codex's own flat form of the pair (codex-rs/protocol/src/tool_name.rs,
  ``ToolName::canonical_flat_name``, commit 9b1033c of openai/codex). A call comes
  back as OpenAI returns it: a ``function_call`` whose ``name`` is the tool's own
  name and whose ``namespace`` is the namespace's. That pair is what Codex reads:
  codex-rs/core/src/tools/router.rs, ``ToolRouter::build_tool_call``, matches
  ``ResponseItem::FunctionCall { name, namespace, arguments, call_id, .. }`` and
  looks the tool up as ``ToolName::new(namespace, name)`` (a flat name without the
  namespace would find no handler). Codex sends such calls back in its history with
  the same two fields, and they become the same flat name, so the prompt continues
  the one that made the call. Namespaces do not nest (400 naming the inner tool's
  ``type``): OpenAI's namespaces hold function and custom tools only, and Codex's
  tool names have one namespace.
- **Custom (freeform) tools** (Codex's ``apply_patch`` and code-mode ``exec`` are
  ``{"type": "custom", "format": {"type": "grammar", ...}}``) are offered as a
  function of one string argument, ``input``; a call comes back as a
  ``custom_tool_call`` item with that ``input``, which Codex runs as the tool's
  payload (router.rs matches ``ResponseItem::CustomToolCall { name, input, .. }``).
  The grammar is quoted to the model, not enforced.
- **Built-in tools** the server cannot run (``web_search``, ``web_search_preview``,
  ``file_search``, ``image_generation``, ``code_interpreter``,
  ``computer_use_preview``, ``local_shell``, ``mcp`` and any other type) are left out
  of the prompt, not refused; the response names their types in the
  ``kvchat-omitted-tools`` header and its ``kvchat_omitted_tools`` field (a
  kvchat field: ``metadata`` is the client's). A `tool_choice` naming one is a 400.

The number of tools offered to the model (a namespace's each) is bounded by the
server's ``max_tools`` setting (checked by the route).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvchat.chat.tool_requests import TOOL_NAME
from kvchat.errors import InvalidRequestError
from kvchat.server.errors import shown
from kvchat.server.response_objects import CallTarget

__all__ = ["ToolOffer", "chat_tools", "flat_name"]

_MAX_NAME = 64
_TOOL_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""What a tool's type may be: the types left out are named in a response header."""


def flat_name(namespace: str, name: str) -> str:
    """The chat function name a namespace's tool is offered under: Codex's canonical
    flat name (codex-rs/protocol/src/tool_name.rs, ``ToolName::canonical_flat_name``):
    the namespace and the name joined by ``__``, underscores at the join trimmed
    (``multi_agent_v1`` and ``spawn_agent``: ``multi_agent_v1__spawn_agent``); if that
    is longer than 64 characters, its first 55, ``_`` and 8 hex digits of a digest
    of the pair."""
    joined = _joined(namespace, name)
    return joined if len(joined) <= _MAX_NAME else _digested(namespace, name)


def _joined(namespace: str, name: str) -> str:
    return f"{namespace.rstrip('_')}__{name.lstrip('_')}"


def _digested(namespace: str, name: str) -> str:
    """The joined name cut to 55 characters, ``_`` and 8 hex digits of the pair's digest."""
    digest = hashlib.sha256(f"{namespace}\0{name}".encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{_joined(namespace, name)[: _MAX_NAME - 9]}_{digest}"


@dataclass(frozen=True)
class ToolOffer:
    """A request's tools as :meth:`kvchat.chat.ChatRuntime.complete` takes them, and
    how the model's calls map back (:func:`chat_tools`).

    `tools` (None: none offered) and `tool_choice` are chat's; `targets` maps each
    offered chat function name to what a call of it is in the Responses API;
    `omitted` holds the types of the tools left out of the prompt (each once, in
    order)."""

    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    targets: Mapping[str, CallTarget] = field(default_factory=dict)
    omitted: tuple[str, ...] = ()
    namespaced: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """(namespace, name) of each namespace's tool to the chat name it is offered under."""

    def chat_name(self, name: str, namespace: str | None = None) -> str:
        """The chat function name of the tool `name` in `namespace` (None: none): the
        name it is offered under here, or :func:`flat_name`'s for a namespaced tool
        this request does not offer."""
        if namespace is None:
            return name
        return self.namespaced.get((namespace, name)) or flat_name(namespace, name)


@dataclass(frozen=True)
class _Offered:
    """One tool offered to the model: its chat tool and what a call of it is."""

    chat: dict[str, Any]
    target: CallTarget | None


def chat_tools(tools: Sequence[Any] | None, tool_choice: str | Mapping[str, Any] | None) -> ToolOffer:
    """The chat tools and `tool_choice` of the Responses API's, and how calls map back.

    - ``function`` tools (also in the chat completions shape) are offered as they are;
    - ``custom`` tools as a function of one string argument, ``input`` (its grammar,
      if any, quoted in that argument's description, not enforced);
    - a ``namespace``'s function and custom tools under :func:`flat_name` (a name
      another tool has, or too long, gets the digest form), the namespace's
      description before theirs; namespaces do not nest;
    - any other type (the built-in tools ``web_search``, ``file_search``, ``mcp``,
      ``tool_search``, ...) is left out, and reported in `ToolOffer.omitted`.

    ``defer_loading`` is ignored: with no tool search to find them, deferred tools
    are offered like the others.

    `tool_choice`: ``"auto"``, ``"none"``, ``"required"``; ``{"type": "function" or
    "custom", "name", "namespace"?}`` forces that tool (the name may be the inner
    name of exactly one namespaced tool, or its flat name);
    ``{"type": "allowed_tools", "mode", "tools"}`` keeps the named tools, with its
    mode as the choice. A choice naming another type (a built-in tool) is refused.
    Raises `InvalidRequestError` (field ``tools[i]...`` or ``tool_choice``); the
    tools' names and schemas are checked by :meth:`kvchat.chat.ChatRuntime.complete`.
    """
    offered, omitted = _offered(tools or ())
    namespaced = {
        (item.target.namespace, item.target.name): item.chat["function"]["name"]
        for item in offered
        if item.target is not None and item.target.namespace is not None
    }
    targets = {item.chat["function"]["name"]: item.target for item in offered if item.target is not None}
    chat = [item.chat for item in offered] or None  # none offered (say, only built-in tools): no tools
    offer = ToolOffer(chat, None, targets, tuple(omitted), namespaced)
    return _with_choice(offer, tool_choice)


def _offered(tools: Sequence[Any]) -> tuple[list[_Offered], list[str]]:
    """The tools offered, in the request's order (a namespace's in its place), and the
    types left out. The tools outside namespaces keep their names; a namespace's
    tools are named after them."""
    kept: list[tuple[str, str, Mapping[str, Any]]] = []
    omitted: dict[str, None] = {}
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        kind = _tool_type(tool, where)
        if kind in ("function", "custom", "namespace"):
            kept.append((kind, where, tool))
        else:
            omitted[kind] = None
    taken = _Names({name for kind, _, tool in kept if kind != "namespace" and isinstance(name := _own_name(tool), str)})
    offered: list[_Offered] = []
    for kind, where, tool in kept:
        if kind == "function":
            offered.append(_function_tool(tool))
        elif kind == "custom":
            offered.append(_custom_tool(tool, where, tool.get("name"), None))
        else:
            offered.extend(_member_tool(*member, taken) for member in _namespace_members(tool, where))
    return offered, list(omitted)


@dataclass
class _Names:
    """The chat names taken (first by the tools outside namespaces), and the
    (namespace, name) pairs offered so far."""

    names: set[str]
    pairs: set[tuple[str, str]] = field(default_factory=set)

    def claim(self, namespace: str, name: str, where: str) -> str:
        """A chat name for the tool `name` of `namespace` (at `where`): its
        :func:`flat_name`, or the digest form if that is taken. Raises
        `InvalidRequestError` for a pair offered before, or no free name."""
        if (namespace, name) in self.pairs:
            raise InvalidRequestError(
                f"{where}.name: the namespace {namespace!r} already has a tool {name!r}", field=f"{where}.name"
            )
        chat_name = flat_name(namespace, name)
        if chat_name in self.names:
            chat_name = _digested(namespace, name)
        if chat_name in self.names:
            raise InvalidRequestError(
                f"{where}.name: another tool is named {chat_name!r}, the name this one is offered under",
                field=f"{where}.name",
            )
        self.pairs.add((namespace, name))
        self.names.add(chat_name)
        return chat_name


def _own_name(tool: Mapping[str, Any]) -> Any:
    """A tool's name, in the Responses shape or the chat completions one."""
    function = tool.get("function")
    return function.get("name") if isinstance(function, Mapping) else tool.get("name")


def _tool_type(tool: Any, where: str) -> str:
    kind = tool.get("type") if isinstance(tool, Mapping) else None
    if not isinstance(kind, str) or not _TOOL_TYPE.fullmatch(kind):
        raise InvalidRequestError(f"{where}.type must name a tool type, not {shown(kind)}", field=f"{where}.type")
    return kind


def _function_tool(tool: Mapping[str, Any], name: str | None = None) -> _Offered:
    """A function tool in the Responses shape (or the chat completions one, which
    some clients send here) as a chat tool, offered under `name` (default: its own)."""
    if isinstance(tool.get("function"), Mapping):
        function = dict(tool["function"])
    else:
        function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
    own = function.get("name")
    if name is not None:
        function["name"] = name
    target = CallTarget(own) if isinstance(own, str) else None
    return _Offered({"type": "function", "function": function}, target)


def _custom_tool(tool: Mapping[str, Any], where: str, name: Any, namespace: str | None) -> _Offered:
    """A custom (freeform) tool as a chat function of one string argument, ``input``."""
    argument = {"type": "string", "description": _custom_input_note(tool.get("format"), f"{where}.format")}
    function: dict[str, Any] = {"name": name}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    function["parameters"] = {"type": "object", "properties": {"input": argument}, "required": ["input"]}
    own = tool.get("name")
    target = CallTarget(own, namespace, "custom") if isinstance(own, str) else None
    return _Offered({"type": "function", "function": function}, target)


def _custom_input_note(fmt: Any, where: str) -> str:
    """The description of a custom tool's ``input``: free text, or text in its grammar."""
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if fmt is None or kind == "text":
        return "The tool's input, as free text."
    syntax, definition = (fmt.get("syntax"), fmt.get("definition")) if isinstance(fmt, Mapping) else (None, None)
    if kind != "grammar" or not isinstance(syntax, str) or not isinstance(definition, str):
        raise InvalidRequestError(
            f"{where} must be {{'type': 'text'}} or {{'type': 'grammar', 'syntax', 'definition'}}", field=where
        )
    return f"The tool's input: text in this {syntax} grammar:\n{definition}"


def _namespace_members(tool: Mapping[str, Any], where: str) -> list[tuple[str, str | None, Mapping[str, Any], str]]:
    """A namespace's tools, each with the namespace's name and description and its place."""
    namespace, description, members = tool.get("name"), tool.get("description"), tool.get("tools")
    if not isinstance(namespace, str) or not TOOL_NAME.fullmatch(namespace):
        raise InvalidRequestError(f"{where}.name must be 1 to 64 letters, digits, '_' or '-'", field=f"{where}.name")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(f"{where}.description must be a string", field=f"{where}.description")
    if not isinstance(members, list):
        raise InvalidRequestError(f"{where}.tools must be a list of function and custom tools", field=f"{where}.tools")
    found = []
    for index, member in enumerate(members):
        inner = f"{where}.tools[{index}]"
        kind = _tool_type(member, inner)
        if kind not in ("function", "custom"):
            nesting = "namespaces do not nest; " if kind == "namespace" else ""
            raise InvalidRequestError(
                f"{inner}: {nesting}a namespace holds function and custom tools, not {shown(kind)}",
                field=f"{inner}.type",
            )
        name = member.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise InvalidRequestError(
                f"{inner}.name must be 1 to 64 letters, digits, '_' or '-'", field=f"{inner}.name"
            )
        found.append((namespace, description, member, inner))
    return found


def _member_tool(
    namespace: str, description: str | None, member: Mapping[str, Any], where: str, taken: _Names
) -> _Offered:
    """A namespace's tool offered under a chat name no other tool has (claimed in `taken`)."""
    name = member["name"]
    chat_name = taken.claim(namespace, name, where)
    if member["type"] == "custom":
        offered = _custom_tool(member, where, chat_name, namespace)
    else:
        offered = _function_tool(member, chat_name)
        offered = _Offered(offered.chat, CallTarget(name, namespace))
    own = offered.chat["function"].get("description")
    if description and (own is None or isinstance(own, str)):  # another own description: chat refuses it
        offered.chat["function"]["description"] = f"{description}\n\n{own}" if own else description
    return offered


def _with_choice(offer: ToolOffer, tool_choice: str | Mapping[str, Any] | None) -> ToolOffer:
    """`offer` with chat's `tool_choice` for the request's (and, for ``allowed_tools``,
    only the tools it allows)."""
    if tool_choice is None or isinstance(tool_choice, str):
        if tool_choice not in (None, "auto", "none", "required"):
            raise InvalidRequestError(
                f"tool_choice must be 'auto', 'none', 'required' or an object, not {shown(tool_choice)}",
                field="tool_choice",
            )
        return replace(offer, tool_choice=tool_choice)
    kind = tool_choice.get("type")
    if kind in ("function", "custom"):
        name = _resolved(offer, tool_choice.get("name"), tool_choice.get("namespace"))
        return replace(offer, tool_choice={"type": "function", "function": {"name": name}})
    if kind == "allowed_tools":
        mode, allowed = tool_choice.get("mode", "auto"), tool_choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise InvalidRequestError(
                "tool_choice allowed_tools needs a mode ('auto' or 'required') and a list of tools",
                field="tool_choice",
            )
        resolved = (_resolved(offer, tool.get("name"), tool.get("namespace")) for tool in allowed if _is_map(tool))
        names = {name for name in resolved if isinstance(name, str)}
        kept = [tool for tool in offer.tools or () if _is_str_in(_own_name(tool), names)]
        return replace(offer, tools=kept or None, tool_choice=mode if kept else "none")
    left_out = " (it was left out of the prompt)" if kind in offer.omitted else ""
    raise InvalidRequestError(
        f"tool_choice names a tool of type {shown(kind)}{left_out}: this server runs no built-in tools, "
        "only function, custom and namespace tools are offered",
        field="tool_choice",
    )


def _resolved(offer: ToolOffer, name: Any, namespace: Any) -> Any:
    """The chat name of the tool a choice names: by its namespace and name, by the name
    it is offered under, or by the inner name of exactly one namespaced tool; else
    `name` itself (which the chat runtime refuses as not among the tools)."""
    if isinstance(namespace, str) and isinstance(name, str):
        return offer.namespaced.get((namespace, name), name)
    if not isinstance(name, str) or name in offer.targets:
        return name
    inner = [chat for (_, own), chat in offer.namespaced.items() if own == name]
    return inner[0] if len(inner) == 1 else name


def _is_map(value: object) -> bool:
    return isinstance(value, Mapping)


def _is_str_in(value: object, names: set[str]) -> bool:
    return isinstance(value, str) and value in names
