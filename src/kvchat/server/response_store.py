"""`ResponseStore`: the responses of ``/v1/responses`` that a later request may
continue (``previous_response_id``), read or delete, kept in memory and bounded.

Each entry belongs to one tenant (an API key's digest, see
:class:`kvchat.server.state.Tenant`): it is found only under that tenant's key,
so one key can never read, continue or delete another's responses, nor learn
that they exist. The bounds:

- `max_entries` responses and `max_bytes` of their size (:func:`approximate_size`
  of what each holds; a chain's entries share their earlier messages in memory,
  but each counts its whole conversation, so the bound is an upper bound);
- `ttl` seconds from when a response was stored, after which it is gone;
- beyond a bound, the least recently used (stored or read) entries go first;
- with `key_share` < 1 (a server with several API keys), one tenant's entries
  hold at most that share of the count and of the bytes, rounded up: a key that
  stores many responses evicts its own oldest ones, not the other keys'.

An entry larger than the byte bound (or the tenant's share of it) is not kept.
Nor is one that cannot be written as JSON: :meth:`ResponseStore.put` encodes
the body first (:func:`encode_response`, the bytes a ``GET`` returns unchanged)
and raises :class:`UnencodableResponseError` without storing anything if that
fails, so a stored response can always be read.
Call it from one thread (the event loop).
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ResponseStore", "StoredResponse", "UnencodableResponseError", "approximate_size", "encode_response"]


class UnencodableResponseError(ValueError):
    """A response body that cannot be written as JSON: a string that is not valid
    Unicode (a lone surrogate), a number JSON has no form for (NaN, infinity), a
    value of another type, or nesting too deep for the encoder."""


def encode_response(body: Mapping[str, Any]) -> bytes:
    """`body` as the JSON bytes the server sends: UTF-8, as Starlette's
    ``JSONResponse`` writes it (no ASCII escapes, no NaN, compact separators).
    Raises :class:`UnencodableResponseError`."""
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise UnencodableResponseError(f"the response cannot be written as JSON: {exc}") from None


@dataclass(frozen=True)
class StoredResponse:
    """One stored response: its `content` (the response object as the JSON bytes a
    ``GET`` returns, see :func:`encode_response`) and the `history` a continuation
    starts from (chat messages: the conversation's input and output, without any
    request's instructions)."""

    content: bytes
    history: Sequence[Mapping[str, Any]]
    size: int = field(default=0, compare=False)
    expires: float = field(default=0.0, compare=False)

    @property
    def body(self) -> dict[str, Any]:
        """The response object (decoded from `content`)."""
        body: dict[str, Any] = json.loads(self.content)
        return body


class ResponseStore:
    """A bounded, expiring map from (tenant, response id) to :class:`StoredResponse`."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        ttl: float,
        key_share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._key_entries = max_entries if key_share >= 1 else math.ceil(max_entries * key_share)
        self._key_bytes = max_bytes if key_share >= 1 else math.ceil(max_bytes * key_share)
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], StoredResponse] = OrderedDict()
        self._tenants: dict[str, OrderedDict[str, None]] = {}
        self._tenant_bytes: dict[str, int] = {}
        self.bytes = 0
        """Total size of the entries held."""

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self,
        tenant: str,
        response_id: str,
        body: Mapping[str, Any],
        history: Sequence[Mapping[str, Any]],
        *,
        content: bytes | None = None,
    ) -> bool:
        """Store a response of `tenant` (replacing one with the same id); False if it
        is too large to keep (or the store keeps none).

        `content` is `body` already encoded by :func:`encode_response` (saves a
        second encoding); without it, the body is encoded here. A body that
        cannot be encoded raises :class:`UnencodableResponseError` and changes
        nothing: an entry with the same id stays.
        """
        if content is None:
            content = encode_response(body)
        self.delete(tenant, response_id)
        size = approximate_size(body) + approximate_size(history)
        if self.max_entries == 0 or size > min(self.max_bytes, self._key_bytes):
            return False
        self._expire()
        now = self._clock()
        own = self._tenants.setdefault(tenant, OrderedDict())
        while own and (len(own) >= self._key_entries or self._tenant_bytes[tenant] + size > self._key_bytes):
            self._remove((tenant, next(iter(own))))
        while self._entries and (len(self._entries) >= self.max_entries or self.bytes + size > self.max_bytes):
            self._remove(next(iter(self._entries)))
        self._entries[(tenant, response_id)] = StoredResponse(content, tuple(history), size, now + self.ttl)
        self._tenants.setdefault(tenant, OrderedDict())[response_id] = None
        self._tenant_bytes[tenant] = self._tenant_bytes.get(tenant, 0) + size
        self.bytes += size
        return True

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """`tenant`'s response `response_id` (now the most recently used), or None if
        there is none: unknown, another tenant's, expired or evicted."""
        key = (tenant, response_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        self._tenants[tenant].move_to_end(response_id)
        return entry

    def delete(self, tenant: str, response_id: str) -> bool:
        """Remove `tenant`'s response `response_id`; False if there was none (or it had expired)."""
        key = (tenant, response_id)
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._remove(key)
        return entry.expires > self._clock()

    def _expire(self) -> None:
        now = self._clock()
        for key in [key for key, entry in self._entries.items() if entry.expires <= now]:
            self._remove(key)

    def _remove(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        tenant, response_id = key
        own = self._tenants[tenant]
        del own[response_id]
        self._tenant_bytes[tenant] -= entry.size
        self.bytes -= entry.size
        if not own:
            del self._tenants[tenant]
            del self._tenant_bytes[tenant]


def approximate_size(value: object) -> int:
    """Roughly the bytes `value` (JSON-like: mappings, sequences, strings, numbers)
    takes: its strings' lengths plus a small cost per value. Iterative, so nesting
    of any depth is measured without recursion."""
    size = 0
    pending: list[object] = [value]
    while pending:
        item = pending.pop()
        size += 16
        if isinstance(item, (str, bytes)):
            size += len(item)
        elif isinstance(item, Mapping):
            for key, inner in item.items():
                pending.append(key)
                pending.append(inner)
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return size
