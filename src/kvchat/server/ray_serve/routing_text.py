"""What the router matches on: a request's routing text, read from its JSON body.

The text follows the order in which kvchat renders a prompt (tools, then the
messages in order), so a conversation's next turn has this turn's text as a
prefix, and it starts with the tenant (a digest of the API key) and the path
(`RoutingHint.header`): kvchat keeps each key's cache apart, so one key's
prefixes must never draw another key's requests. Each message ends with a
separator, so an earlier text is a whole prefix of a later one only at a
message boundary: "Hello" is not an earlier turn of "Hello, can you...".

A request about a stored response names the replica holding it through the tag
that begins the response's id (:func:`response_tag`): ``previous_response_id``
in a ``POST /v1/responses`` body, or the id in the path of ``GET`` and
``DELETE /v1/responses/{id}``. Each replica's tag is derived from its Serve
replica id alone (:func:`replica_response_tag`), so the router knows the tag of
every replica it can choose, with no stats round trip.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kvchat.server.ids import ID_HEX_DIGITS, is_hex

__all__ = ["RoutingHint", "make_response_tag", "replica_response_tag", "response_tag", "routing_hint"]

_RESPONSE_PREFIX = "resp_"
_STORED_RESPONSE = "/responses/"
"""What precedes a response id in a path (``/v1/responses/{id}``, ``/v1/responses/{id}/...``)."""
_TAG_LENGTH = 8

_SEPARATOR = "\x1e"
_FIELD = "\x1f"


@dataclass(frozen=True)
class RoutingHint:
    """What the router needs of a request: its routing text, for a chained
    response the tag of the replica that stored the previous one, and `header`:
    how many leading characters of `text` name the tenant and the path (every
    request of the tenant to that path shares them; they hold no prompt)."""

    text: str
    response_tag: str | None = None
    header: int = 0


def routing_hint(path: str, body: bytes, authorization: str | None) -> RoutingHint:
    """The hint for a request to `path` with JSON `body`; a body that is not a JSON
    object gives just the tenant (the replica then answers with the proper error).
    A request for one stored response (``/v1/responses/{id}``: GET, DELETE) gives the
    tenant and the id's tag; its body is not read."""
    tenant = hashlib.sha256((authorization or "").encode()).hexdigest()[:16]
    _, found, rest = path.partition(_STORED_RESPONSE)
    if found:
        return RoutingHint(tenant, response_tag(rest.partition("/")[0]), header=len(tenant))
    try:
        data = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return RoutingHint(tenant, header=len(tenant))
    try:
        return _hint(tenant, path, data)
    except RecursionError:  # content nested too deep to read: route by tenant alone
        return RoutingHint(tenant, header=len(tenant))


def _hint(tenant: str, path: str, data: dict[str, Any]) -> RoutingHint:
    parts = [tenant, path]
    header = len(tenant) + len(path) + 2 * len(_SEPARATOR)
    tag = None
    end = _SEPARATOR  # after the last message: a turn's text is a whole prefix of the next turn's
    if path.endswith("/chat/completions"):
        parts.append(_tools(data.get("tools")))
        parts.extend(_message(item) for item in _list(data.get("messages")))
    elif path.endswith("/responses"):
        previous = data.get("previous_response_id")
        tag = response_tag(previous) if isinstance(previous, str) else None
        parts.append(_tools(data.get("tools")))
        parts.append(_text(data.get("instructions")))
        source = data.get("input")
        parts.extend(_message(item) for item in (_list(source) if isinstance(source, list) else [source]))
    elif path.endswith("/v1/messages"):  # Anthropic's Messages API
        parts.append(_tools(data.get("tools")))
        parts.append(_text(data.get("system")))
        parts.extend(_message(item) for item in _list(data.get("messages")))
    elif path.endswith("/completions"):
        end = ""  # a prompt may go on where the last one stopped: no boundary to keep
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # several prompts: route by the first (a list of ints is one prompt of token ids)
        parts.append(_text(prompt))
    return RoutingHint(_SEPARATOR.join(parts) + end, tag, header=header)


def make_response_tag(seed: bytes) -> str:
    """A replica's response tag: `_TAG_LENGTH` hex digits drawn from `seed`."""
    return hashlib.sha256(seed).hexdigest()[:_TAG_LENGTH]


def replica_response_tag(replica: str) -> str:
    """The tag that begins the response ids of the replica whose Serve replica id
    (``ReplicaID.unique_id``) is `replica`: the replica sets it, the router
    recomputes it from its candidates' ids."""
    return make_response_tag(replica.encode())


def response_tag(response_id: str) -> str | None:
    """The replica tag of a response id made by a replica on Ray Serve (None for other ids)."""
    digits = response_id[len(_RESPONSE_PREFIX) :]
    if not response_id.startswith(_RESPONSE_PREFIX) or len(digits) != ID_HEX_DIGITS or not is_hex(digits):
        return None
    return digits[:_TAG_LENGTH]


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _tools(tools: Any) -> str:
    return _json(tools) if tools else ""


def _message(item: Any) -> str:
    if not isinstance(item, dict):
        return _text(item)
    fields = [_text(item.get("role") or item.get("type"))]
    for name in ("content", "output", "arguments", "name"):
        if name in item:
            fields.append(_text(item[name]))
    if "tool_calls" in item:  # a list of dicts, but not of text parts: the calls are all prompt
        fields.append(_json(item["tool_calls"]))
    return _FIELD.join(fields)


def _text(value: Any) -> str:
    """The text of a content value: a string, a list of parts, or anything JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) for part in value):
        return "".join(_text(part.get("text", part.get("content", ""))) for part in value)
    return _json(value)


def _json(value: Any) -> str:
    """`value` as compact JSON, or "" if it cannot be written (nested too deep)."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        return ""
