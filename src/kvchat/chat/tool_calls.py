"""Tool calls in the model's own format: read them from (streamed) output, force them by grammar.

Formats: :data:`HERMES` (Qwen, Hermes: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
per call), :data:`LLAMA3` (``{"name": ..., "parameters": {...}}`` at the start of the reply or
after ``<|python_tag|>``) and :data:`MISTRAL` (``[TOOL_CALLS] [{"name": ..., "arguments": ...}]``).
The engine's text leaves out control tokens such as ``<|python_tag|>`` and ``[TOOL_CALLS]``, so
a reply that *starts* with ``{`` (Llama 3) or ``[`` (Mistral) is read as calls too: it is held
until its JSON closes and released as text if it is not calls. So is such a reply wrapped in a
Markdown code fence (```` ```json ````), as small models often write it. Whitespace that only
separates calls from each other or from the ends of the reply is dropped. A malformed call
becomes text (and a log line): parsing never raises; so does a call whose arguments nest
deeper than :data:`MAX_ARGUMENTS_DEPTH`. Validating tool requests and forcing a call by grammar
live in :mod:`kvchat.chat.tool_requests`.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from kvchat.errors import InvalidRequestError

__all__ = [
    "HERMES",
    "LLAMA3",
    "MAX_ARGUMENTS_DEPTH",
    "MAX_CALL_NAME_LENGTH",
    "check_call_name",
    "MISTRAL",
    "Event",
    "StreamingToolCallParser",
    "TextDelta",
    "ToolCall",
    "ToolCallEvent",
    "ToolCallFormat",
    "detect_format",
    "parse_tool_calls",
]

logger = logging.getLogger("kvchat.chat")

MAX_CALL_NAME_LENGTH = 256
"""Longest function name a parsed call may have; a call with a longer one is text. A
model may name a tool it was not offered, even with spaces in the name (seen: a
0.5B model named its call after the shell command). Such a call is still a call: the
client answers "no such tool" and the model can try again, so the APIs accept
these names when the call comes back in a history (any string up to this length)."""


def check_call_name(name: object, where: str) -> str:
    """`name` of a call sent back in a history at `where`, as a parsed call may have it
    (a string of 1 to `MAX_CALL_NAME_LENGTH` characters); `InvalidRequestError`
    (field ``{where}.name``) otherwise."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_CALL_NAME_LENGTH:
        raise InvalidRequestError(
            f"{where}.name must be a string of 1 to {MAX_CALL_NAME_LENGTH} characters", field=f"{where}.name"
        )
    return name


MAX_ARGUMENTS_DEPTH = 100
"""Deepest nesting of objects and arrays in a call's arguments; a deeper call is text.
Python's json recurses once per level within one recursion limit (1,000 frames) for the
whole stack, so arguments that parse here could fail to serialize in a deeper caller."""

_ID_ALPHABET = string.ascii_letters + string.digits
_FENCE = re.compile(r"```(?:json)?[ \t]*\n\s*")
"""A Markdown code fence opening a reply's calls (the closing fence ends them)."""
_FENCE_SO_FAR = re.compile(r"`{1,2}|```(?:j(?:s(?:o(?:n)?)?)?)?[ \t]*(?:\n\s*)?")
"""What the start of a reply looks like while it may still become `_FENCE`."""


@dataclass(frozen=True)
class ToolCall:
    """One call of a function tool, with its arguments decoded from JSON."""

    id: str
    name: str
    arguments: dict

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tool_calls`` entry: arguments as a JSON string."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family of models writes tool calls.

    `start` opens a call (or a list of calls); `end` closes one call, or is None when
    the JSON's own closing bracket ends it. `bare_start` is the character that opens
    calls written without the (control-token) `start` at the beginning of a reply.
    `grammar_prefix`/`grammar_suffix` wrap the forced call's JSON in a grammar.
    `id_length`: None gives ids ``call_`` + 24 hex digits; a number gives that many
    letters and digits (Mistral's template accepts only 9-character ids).
    """

    name: str
    start: str
    end: str | None
    arguments_key: str
    bare_start: str | None
    grammar_prefix: str
    grammar_suffix: str
    id_length: int | None = None

    def new_call_id(self) -> str:
        """A fresh, unique id for a call in this format."""
        n = self.id_length
        return "call_" + secrets.token_hex(12) if n is None else "".join(secrets.choice(_ID_ALPHABET) for _ in range(n))


HERMES = ToolCallFormat("hermes", "<tool_call>", "</tool_call>", "arguments", None, "<tool_call>\n", "\n</tool_call>")
LLAMA3 = ToolCallFormat("llama3", "<|python_tag|>", None, "parameters", "{", "", "")
MISTRAL = ToolCallFormat("mistral", "[TOOL_CALLS]", None, "arguments", "[", "[TOOL_CALLS][", "]", id_length=9)


def detect_format(chat_template_source: str) -> ToolCallFormat | None:
    """The tool-call format a chat template shows, or None if it shows none."""
    signs = ((HERMES, ["<tool_call>"]), (MISTRAL, ["[TOOL_CALLS]"]), (LLAMA3, ["<|python_tag|>", '"parameters"']))
    for fmt, marks in signs:
        if any(mark in chat_template_source for mark in marks):
            return fmt
    return None


@dataclass(frozen=True)
class TextDelta:
    """Text of the reply (outside any tool call) that can be shown now."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A whole tool call, emitted once its JSON is complete."""

    call: ToolCall


Event = TextDelta | ToolCallEvent
"""What the streaming parser emits."""


class StreamingToolCallParser:
    """Splits streamed model output into text deltas and whole tool calls.

    Text streams as it arrives, except a tail that could be the start of the call
    marker and whitespace that may turn out to only separate calls. The events do
    not depend on how the output is split into deltas.
    """

    def __init__(self, format: ToolCallFormat) -> None:
        self.format = format
        self._mode = "text"  # "text", "tagged" (start ... end) or "json" (JSON values, no end marker)
        self._end = format.end or ""  # what closes the current tagged call
        self._buf = ""  # unconsumed input of the current mode
        self._marker = ""  # text that opened the current call, given back as text if it is malformed
        self._blank = True  # the text since the start or the last call is whitespace so far
        self._at_start = True  # the reply has shown nothing but whitespace yet
        self._calls, self._finished = 0, False
        self._enter("text", bare=False)

    def feed(self, text_delta: str) -> list[Event]:
        """Add a piece of model output; return the events it completes."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text_delta
        return self._run(final=False)

    def finish(self) -> list[Event]:
        """End of output: return the events still held (an unclosed call becomes text)."""
        final, self._finished = not self._finished, True
        return self._run(final=True) if final else []

    def _run(self, *, final: bool) -> list[Event]:
        out: list[Event] = []
        while {"text": self._text_step, "tagged": self._tagged_step, "json": self._json_step}[self._mode](out, final):
            pass
        return out

    def _enter(self, mode: str, *, bare: bool) -> None:
        self._mode, self._bare, self._pos, self._value_start, self._depth = mode, bare, 0, 0, 0
        self._in_string = self._escape = False
        self._run_calls = 0

    def _emit_text(self, text: str, out: list[Event]) -> None:
        if text:
            out.append(TextDelta(text))
            self._blank = self._blank and not text.strip()

    def _emit_calls(self, calls: list[ToolCall], out: list[Event]) -> None:
        out.extend(ToolCallEvent(call) for call in calls)
        self._calls += len(calls)
        self._blank, self._at_start, self._marker = True, False, ""

    def _malformed(self, text: str, out: list[Event]) -> None:
        # A reply that merely starts like a bare call (plain JSON) is common and fine.
        logger.log(
            logging.DEBUG if self._bare else logging.WARNING,
            "malformed %s tool call passed through as text: %.200r",
            self.format.name,
            text,
        )
        self._emit_text(text, out)
        self._blank = False

    def _text_step(self, out: list[Event], final: bool) -> bool:
        fmt, buf = self.format, self._buf
        if self._at_start and fmt.bare_start is not None:
            stripped = buf.lstrip()
            if not final and (
                not stripped
                or (len(stripped) < len(fmt.start) and fmt.start.startswith(stripped))
                or _FENCE_SO_FAR.fullmatch(stripped)
            ):
                return False  # nothing yet, or perhaps the marker or a code fence
            if stripped.startswith(fmt.bare_start) and not stripped.startswith(fmt.start):
                self._marker, self._buf = buf[: len(buf) - len(stripped)], stripped
                self._enter("json", bare=True)
                return True
            fence = _FENCE.match(stripped)
            if fence and stripped[fence.end() :].startswith(fmt.bare_start):
                self._marker = buf[: len(buf) - len(stripped) + fence.end()]
                self._buf, self._end = stripped[fence.end() :], "```"
                self._enter("tagged", bare=True)
                return True
            self._at_start = False
        i = buf.find(fmt.start)
        if i >= 0:
            before, self._marker = buf[:i], fmt.start
            if self._blank and not before.strip():
                self._marker = before + fmt.start  # dropped if a call follows, text if not
            else:
                self._emit_text(before, out)
            self._buf, self._at_start, self._end = buf[i + len(fmt.start) :], False, fmt.end or ""
            self._enter("tagged" if fmt.end is not None else "json", bare=False)
            return True
        if final:
            self._buf = ""
            if not (self._calls and self._blank and not buf.strip()):
                self._emit_text(buf, out)
            return False
        m = fmt.start  # hold back the longest tail that could start the marker
        keep = next((n for n in range(min(len(buf), len(m) - 1), 0, -1) if m.startswith(buf[-n:])), 0)
        text = buf[: len(buf) - keep]
        if not (self._blank and not text.strip()):  # whitespace so far is held: a call may follow
            self._emit_text(text, out)
            self._buf = buf[len(text) :]
        return False

    def _tagged_step(self, out: list[Event], final: bool) -> bool:
        end = self._end
        j = self._buf.find(end, self._pos)
        if j < 0 and not final:
            self._pos = max(0, len(self._buf) - len(end) + 1)
            return False
        body, closing, rest = (self._buf, "", "") if j < 0 else (self._buf[:j], end, self._buf[j + len(end) :])
        calls = _read_calls(body, self.format, require_arguments=self._bare)
        if calls is None:
            self._malformed(self._marker + body + closing, out)
        else:
            self._emit_calls(calls, out)
        self._buf = rest
        self._enter("text", bare=False)
        return j >= 0

    def _json_step(self, out: list[Event], final: bool) -> bool:
        buf = self._buf
        while self._pos < len(buf):
            c = buf[self._pos]
            if self._depth == 0:
                if c.isspace() or (self._run_calls and c in ";,"):
                    self._pos += 1
                    continue
                if c not in "{[":  # the calls (if any) are over, the rest is text
                    if not self._run_calls:
                        self._malformed(self._marker + buf[: self._pos], out)
                        self._buf = buf[self._pos :]
                    self._enter("text", bare=False)
                    return True
                self._value_start = self._pos
            self._pos += 1
            if self._in_string:
                self._in_string = self._escape or c != '"'
                self._escape = not self._escape and c == "\\"
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    calls = _read_calls(buf[self._value_start : self._pos], self.format, require_arguments=self._bare)
                    if calls is None:
                        self._malformed(self._marker + buf[: self._pos], out)
                        self._buf = buf[self._pos :]
                        self._enter("text", bare=False)
                        return True
                    self._emit_calls(calls, out)
                    self._buf = buf = buf[self._pos :]
                    self._pos, self._run_calls = 0, self._run_calls + 1
        if final:
            if self._depth or not self._run_calls:
                self._malformed(self._marker + buf, out)  # cut off, or a marker with nothing after it
            self._buf = ""
            self._enter("text", bare=False)
        return False


def _read_calls(text: str, fmt: ToolCallFormat, *, require_arguments: bool) -> list[ToolCall] | None:
    """The calls in one JSON object or array, or None if it is not (only) calls."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    calls = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if not 0 < len(item["name"]) <= MAX_CALL_NAME_LENGTH:
            return None
        key = next((k for k in (fmt.arguments_key, "arguments", "parameters") if k in item), None)
        if key is None and require_arguments:
            return None
        arguments = {} if key is None else item[key]
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict) or _nests_deeper(arguments, MAX_ARGUMENTS_DEPTH):
            return None
        calls.append(ToolCall(fmt.new_call_id(), item["name"], arguments))
    return calls or None


def _nests_deeper(value: Any, limit: int) -> bool:
    """True if objects and arrays nest more than `limit` levels deep in `value`."""
    todo = [(value, 1)]
    while todo:
        node, depth = todo.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        todo.extend((child, depth + 1) for child in children)
    return False


def parse_tool_calls(text: str, format: ToolCallFormat) -> tuple[str | None, list[ToolCall]]:
    """Split a whole reply into its content and its tool calls.

    With calls, content is the text outside them, stripped, or None if that is empty;
    without calls it is the text unchanged.
    """
    parser = StreamingToolCallParser(format)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    return (content.strip() or None, calls) if calls else (content, calls)
