"""`KVChatReplica`: one Serve replica holding one engine and kvchat's whole HTTP app.

Every route, schema, API-key check, cache namespace, limit and error shape is
the one ``kvchat serve`` has: the replica runs :func:`kvchat.server.create_app`
and the ingress forwards requests to it (:mod:`.forwarding`). The replica
publishes what the router needs with ``record_routing_stats``: its cache
capacity and its Prometheus metrics. Its response ids begin with a tag derived
from its Serve replica id (:func:`replica_response_tag`), which the router
computes for every candidate replica, so ``GET``/``DELETE /v1/responses/{id}``
and ``previous_response_id`` reach the replica that stored the response from
its first request on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from kvchat.engine import Engine, EngineSettings
from kvchat.models import resolve
from kvchat.server import ServerSettings, create_app
from kvchat.server.ray_serve.forwarding import ForwardedRequest, ResponseHead, run_asgi
from kvchat.server.ray_serve.routing_text import RoutingHint, replica_response_tag

__all__ = ["KVChatReplica"]


class KVChatReplica:
    """A Serve deployment class (wrapped by :func:`kvchat.server.ray_serve.build_app`)."""

    def __init__(self, model: str, engine_settings: EngineSettings, server_settings: ServerSettings) -> None:
        import dataclasses

        from ray import serve

        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        # A replica that Serve starts again gets a new replica id, hence a new tag.
        self.response_tag = replica_response_tag(self.name)
        self.started = time.time()
        self.engine = Engine(resolve(model), engine_settings)
        settings = dataclasses.replace(server_settings, response_id_tag=self.response_tag)
        self.app = create_app(self.engine, settings)
        self._state = self.app.state.kvchat

    async def forward(self, request: ForwardedRequest, hint: RoutingHint) -> AsyncIterator[ResponseHead | bytes]:
        """Serve `request` (routed by `hint`, which the router read); stream the answer."""
        async for part in run_asgi(self.app, request, self.name):
            yield part

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router and the ingress read about this replica (every stats period)."""
        settings = self.engine.settings
        return {
            "replica": self.name,
            "started": self.started,
            "reported": time.time(),
            "capacity_tokens": settings.n_ctx,
            "metrics": self._state.metrics.render().decode(),
        }

    def check_health(self) -> None:
        """Serve's health check: the engine's worker thread must be alive."""
        if self.engine.closed:
            raise RuntimeError("the engine is closed")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
