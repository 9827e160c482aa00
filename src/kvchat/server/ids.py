"""The ids the server makes (``resp_``, ``msg_``, ``fc_`` + 48 hex digits) and the
optional tag that begins their random part (on Ray Serve: the replica that made
a response, see `ServerSettings.response_id_tag`)."""

from __future__ import annotations

import secrets

__all__ = ["ID_HEX_DIGITS", "MAX_TAG_DIGITS", "is_hex", "new_id"]

ID_HEX_DIGITS = 48
"""Hex digits after an id's prefix."""
MAX_TAG_DIGITS = 16
"""Longest tag: the rest (at least 32 digits) stays random."""
_HEX = frozenset("0123456789abcdef")


def is_hex(text: str) -> bool:
    """Whether `text` holds only lowercase hex digits (True for "")."""
    return _HEX.issuperset(text)


def new_id(prefix: str, tag: str = "") -> str:
    """A fresh, unguessable id such as ``resp_`` + 48 hex digits, the first ones `tag`
    (an even count of hex digits naming who made it; the rest stay random)."""
    return f"{prefix}_{tag}{secrets.token_hex((ID_HEX_DIGITS - len(tag)) // 2)}"
