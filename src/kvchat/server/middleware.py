"""ASGI middleware: allowed Host names, request-body size limit and structured access logs.

All three are plain ASGI (not Starlette's ``BaseHTTPMiddleware``) so streamed
responses and client disconnects pass through untouched.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvchat.server.errors import APIError, error_response, valid_text

access_log = logging.getLogger("kvchat.server.access")

_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/models",
    "/health",
    "/metrics",
)


def endpoint_label(path: str) -> str:
    """A bounded label for `path` (unknown paths share one label): a path that
    carries an id or a name gets its route's template (``/v1/models/{model}``,
    ``/v1/responses/{id}``), never the id itself."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    response_id = path.removeprefix("/v1/responses/")
    if response_id != path and response_id and "/" not in response_id:
        return "/v1/responses/{id}"
    return "other"


_HOST_HEADER = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[^:\[\]]*)(?::[0-9]*)?")


def host_name(header: str) -> str | None:
    """The host name of a ``Host`` header, lower case, without port or trailing dot
    (an IPv6 address keeps its brackets); None if the header is malformed."""
    match = _HOST_HEADER.fullmatch(header.strip().lower())
    if match is None or not match["name"]:
        return None
    return match["name"].rstrip(".")


def is_loopback(name: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ``[::1]``)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


class HostCheck:
    """Answers 403 (in the shape of the path's API) to a request whose ``Host`` header names a host
    that is neither loopback nor in `allowed` (names; ``*.example.com`` for
    subdomains; ``*`` for any), whatever the port.

    A web page on another site cannot make the user's browser read this server's
    answers (no CORS), unless it gets the browser to believe that the server *is*
    that site: DNS rebinding points the page's own name at 127.0.0.1. The
    browser then sends that name as ``Host``; refusing names the server does not
    know stops the attack even when no API key is set. Starlette's
    ``TrustedHostMiddleware`` does the same check but answers in plain text and
    knows no loopback range, hence this one.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str] = ()) -> None:
        self.app = app
        patterns = [pattern.lower() for pattern in allowed]
        self.allow_any = "*" in patterns
        self.names = frozenset(p for p in patterns if not p.startswith("*"))
        self.suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))

    def allows(self, header: str | None) -> bool:
        """Whether a request with this ``Host`` header may reach the app."""
        if self.allow_any:
            return True
        name = host_name(header) if header is not None else None
        if name is None:
            return False
        return is_loopback(name) or name in self.names or name.endswith(self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allow_any:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host")
        if self.allows(header):
            await self.app(scope, receive, send)
            return
        shown = valid_text(header or "")[:200]
        await error_response(
            APIError(
                403,
                f"the Host header {shown!r} names a host this server does not answer for; "
                "its operator can allow it (kvchat serve --allowed-host NAME)",
                code="host_not_allowed",
            ),
            path=scope["path"],
        )(scope, receive, send)


class BodySizeLimit:
    """Answers 413 (in the shape of the path's API) to a request whose body exceeds `max_bytes`.

    The body is read here, up to the limit, and handed on whole, so the app
    never sees a partial body; later ``receive`` calls (disconnect detection)
    go to the client as usual.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(too_large, path=scope["path"])(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await error_response(too_large, path=scope["path"])(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class AccessLog:
    """Logs one JSON line per HTTP request to ``kvchat.server.access`` and counts it.

    Fields: time (UTC), method, path, status, duration_ms (until the last body byte, so a
    stream's whole length), client. `count(endpoint, status)` is called once
    per request (the requests-by-status metric).
    """

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # if the app fails before sending a response start

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = scope.get("path", "")
            self.count(endpoint_label(path), status)
            client = scope.get("client")
            access_log.info(
                json.dumps(
                    {
                        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                        "event": "http_request",
                        "method": scope.get("method"),
                        "path": path,
                        "status": status,
                        "duration_ms": round((time.monotonic() - started) * 1000, 1),
                        "client": f"{client[0]}:{client[1]}" if client else None,
                    }
                )
            )
