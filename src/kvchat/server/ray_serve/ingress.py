"""`KVChatIngress`: the one OpenAI endpoint in front of the kvchat replicas.

It first refuses, from the headers alone, a foreign ``Host``, a missing or
wrong API key and a declared body over `max_body_bytes`
(:class:`IngressAccess`): such a request's body is never read. Then it reads
the body (bounded by `max_body_bytes`), derives its routing hint
(:func:`routing_hint`) and forwards it through the replicas' handle, whose
router picks the replica; the replica's kvchat app answers and the answer is
streamed back unchanged. The handle's queue is bounded (the replicas'
``max_queued_requests``, see :func:`kvchat.server.ray_serve.build_app`): past
it the answer is an OpenAI-shaped 429 with ``Retry-After``. A replica that
dies before anything reached the client is retried on another (`retries`
times); one that dies mid-stream ends the stream with an error event. With no
replica left, the answer is an OpenAI-shaped 503 with ``Retry-After``.
``/health`` and ``/metrics`` cover every replica (their metrics carry a
``replica`` label) and the routing decisions by kind.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import ReplicaState

from kvchat.server.errors import APIError, anthropic_error_body, error_body, error_response, speaks_anthropic
from kvchat.server.ray_serve.access import IngressAccess
from kvchat.server.ray_serve.cluster_metrics import render_cluster_metrics
from kvchat.server.ray_serve.forwarding import ForwardedRequest, ResponseHead
from kvchat.server.ray_serve.router import RouterBook
from kvchat.server.ray_serve.routing_text import routing_hint

__all__ = ["IngressOptions", "KVChatIngress"]

REPLICA_ERRORS = (RayActorError, ActorUnavailableError)
"""What a call to a replica raises when the replica died or cannot be reached."""

REPLICA_DEPLOYMENT = "kvchat-replica"

ingress_app = FastAPI(title="kvchat on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@dataclass(frozen=True)
class IngressOptions:
    """The ingress's own settings (the replicas' come from `ServerSettings`;
    :func:`kvchat.server.ray_serve.build_app` copies the shared ones from there).

    - `max_body_bytes`: largest request body (413 beyond it).
    - `retries`: how many times a request is sent again when its replica died
      before anything reached the client.
    - `retry_after`: the ``Retry-After`` seconds of a 429 or 503.
    - `allowed_hosts`: host names a ``Host`` header may name besides loopback
      ones (as `ServerSettings.allowed_hosts`).
    - `api_keys`: if any, a ``/v1`` request without one of them is refused (401)
      before its body is read; the replica checks the key again.
    """

    max_body_bytes: int = 4 * 1024 * 1024
    retries: int = 2
    retry_after: int = 1
    allowed_hosts: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()


@dataclass
class _Counts:
    """The ingress's own counters: requests sent again, requests failed by replicas."""

    retried: int = 0
    failed: int = 0


async def _relay(first: bytes, stream: Any, path: str, counts: _Counts) -> AsyncIterator[bytes]:
    """The rest of a streamed answer; a replica lost mid-stream ends it with an error event."""
    try:
        if first:
            yield first
        async for chunk in stream:
            yield chunk
    except REPLICA_ERRORS:
        counts.failed += 1
        message = "the replica serving this request stopped; retry the request"
        error = error_body(message, type="server_error", code="replica_unavailable")
        if speaks_anthropic(path):
            event = anthropic_error_body(APIError(503, message, type="server_error", code="replica_unavailable"))
            yield f"event: error\ndata: {json.dumps(event)}\n\n".encode()
        elif path.endswith("responses"):
            event = {"type": "error", **error["error"]}
            yield f"event: error\ndata: {json.dumps(event)}\n\n".encode()
        else:
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        stream.cancel()


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The whole body, or None past `limit` bytes (read no further)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _running_replicas() -> int:
    """How many kvchat replicas Serve reports running (0 if it cannot say)."""
    try:
        status = serve.status()
    except (RayError, RayServeException):  # the controller is unreachable: nothing can be served
        return 0
    for application in status.applications.values():
        deployment = application.deployments.get(REPLICA_DEPLOYMENT)
        if deployment is not None:
            return int(deployment.replica_states.get(ReplicaState.RUNNING, 0))
    return 0


def _headers(head: ResponseHead) -> list[tuple[bytes, bytes]]:
    """The replica's headers, plus ``x-kvchat-replica`` naming it."""
    return [*head.headers, (b"x-kvchat-replica", head.replica.encode())]


def _is_event_stream(head: ResponseHead) -> bool:
    return (head.header(b"content-type") or b"").startswith(b"text/event-stream")


def _queue_full(retry_after: int, path: str) -> JSONResponse:
    # The shape of kvchat's own 429 (kvchat.server.admission), so clients back off alike.
    return error_response(
        APIError(
            429,
            "the server is busy (every replica is full and the queue in front of them too); retry later",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},
        ),
        path=path,
    )


def _unavailable(retry_after: int, path: str) -> JSONResponse:
    return error_response(
        APIError(
            503,
            "no kvchat replica could serve the request; retry shortly",
            type="server_error",
            code="replica_unavailable",
            headers={"Retry-After": str(retry_after)},
        ),
        path=path,
    )


@serve.ingress(ingress_app)
class KVChatIngress:
    """The HTTP entry of the application made by :func:`kvchat.server.ray_serve.build_app`."""

    def __init__(self, replicas: DeploymentHandle, options: IngressOptions) -> None:
        self.replicas = replicas
        self.options = options
        self.access = IngressAccess(
            api_keys=options.api_keys, allowed_hosts=options.allowed_hosts, max_body_bytes=options.max_body_bytes
        )
        self.started = time.time()
        self.counts = _Counts()

    @property
    def book(self) -> RouterBook:
        # Imported here: Serve pickles this class with copies of the module's
        # globals, and the live registry is the router module's own.
        from kvchat.server.ray_serve import router

        return router.ROUTERS.get(REPLICA_DEPLOYMENT) or RouterBook()

    @ingress_app.get("/health")
    async def health(self, request: Request) -> Response:
        if (refused := self.access.host_refusal(request.headers)) is not None:
            return error_response(refused)
        running = await asyncio.to_thread(_running_replicas)
        replicas = self.book.snapshot()
        body = {
            "status": "ok" if running else "unavailable",
            "replicas_running": running,
            "replicas": replicas,
            "uptime_s": round(time.time() - self.started, 3),
        }
        return JSONResponse(body, status_code=200 if running else 503)

    @ingress_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        if (refused := self.access.host_refusal(request.headers)) is not None:
            return error_response(refused)
        text = render_cluster_metrics(self.book, retried=self.counts.retried, failed=self.counts.failed)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"])
    async def forward(self, path: str, request: Request) -> Response:
        # From the headers alone: a refused request's body is never read.
        url_path = request.url.path  # the error shapes follow it: Anthropic's on the Messages API's paths
        if (refused := self.access.refusal(request.method, url_path, request.headers)) is not None:
            return error_response(refused, path=url_path)
        body = await _read_body(request, self.options.max_body_bytes)
        if body is None:
            return error_response(self.access.too_large(), path=url_path)
        forwarded = ForwardedRequest(
            method=request.method,
            path=request.url.path,
            query_string=request.url.query.encode(),
            headers=tuple(request.headers.raw),
            body=body,
            client=(request.client.host, request.client.port) if request.client else None,
        )
        credential = request.headers.get("authorization") or request.headers.get("x-api-key")
        hint = routing_hint(request.url.path, body, credential)
        for attempt in range(self.options.retries + 1):
            if attempt:
                self.counts.retried += 1
            stream: DeploymentResponseGenerator[Any] = self.replicas.options(stream=True).forward.remote(  # type: ignore[assignment]
                forwarded, hint
            )
            try:
                head: ResponseHead = await stream.__anext__()
                if not _is_event_stream(head):
                    chunks = [chunk async for chunk in stream]
                    response = Response(b"".join(chunks), status_code=head.status)
                    response.raw_headers = _headers(head)
                    return response
                first = await anext(stream, b"")
            except BackPressureError:  # the handle's queue is full: not sent anywhere
                return _queue_full(self.options.retry_after, url_path)
            except REPLICA_ERRORS:
                continue
            except StopAsyncIteration:
                continue
            streaming = StreamingResponse(_relay(first, stream, url_path, self.counts), status_code=head.status)
            streaming.raw_headers = _headers(head)
            return streaming
        self.counts.failed += 1
        return _unavailable(self.options.retry_after, url_path)
