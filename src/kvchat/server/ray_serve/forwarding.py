"""Carrying an HTTP request from the ingress to a replica's kvchat app and back.

The ingress sends a :class:`ForwardedRequest`; the replica runs it through its
own kvchat FastAPI app in process (:func:`run_asgi`) and streams back a
:class:`ResponseHead` followed by the body's chunks. A cancelled stream (the
client went away) reaches the app as a disconnect, so kvchat frees the request's
sequence as it does for a direct client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ForwardedRequest", "ResponseHead", "run_asgi"]

ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[MutableMapping[str, Any]]], Callable[..., Awaitable[None]]],
    Awaitable[None],
]


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it (its body read whole)."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseHead:
    """The status and headers of a replica's answer, and which replica gave it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    replica: str

    def header(self, name: bytes) -> bytes | None:
        """The value of header `name` (lowercase), if present."""
        return next((value for key, value in self.headers if key.lower() == name), None)


async def run_asgi(app: ASGIApp, request: ForwardedRequest, replica: str) -> AsyncIterator[ResponseHead | bytes]:
    """Run `request` through the ASGI `app`; yield its head, then its body chunks."""
    messages: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        await messages.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": list(request.headers),
        "client": request.client,
        "server": ("127.0.0.1", 80),
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                headers = tuple((bytes(key), bytes(value)) for key, value in message.get("headers", ()))
                yield ResponseHead(message["status"], headers, replica)
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        await task  # an exception the app let out surfaces here
    finally:
        disconnected.set()
        if not task.done():
            # Give the app a moment to see the disconnect and cancel its engine request.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
