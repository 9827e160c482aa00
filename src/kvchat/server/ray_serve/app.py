"""`build_app`: the Serve application (ingress + kvchat replicas) and `run` for ``kvchat serve --ray``."""

from __future__ import annotations

import logging
from typing import Any, Literal, cast

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application, Deployment

from kvchat.engine import EngineSettings
from kvchat.server import ServerSettings
from kvchat.server.ray_serve.ingress import REPLICA_DEPLOYMENT, IngressOptions, KVChatIngress
from kvchat.server.ray_serve.replica import KVChatReplica
from kvchat.server.ray_serve.router import LoadBalancedRouter, PrefixAffinityRouter

__all__ = ["build_app", "run"]

log = logging.getLogger("kvchat.server.ray_serve")

Routing = Literal["prefix", "default"]


def build_app(
    model: str,
    *,
    server_settings: ServerSettings,
    engine_settings: EngineSettings | None = None,
    num_replicas: int = 2,
    ray_actor_options: dict[str, Any] | None = None,
    routing: Routing = "prefix",
    router_options: dict[str, Any] | None = None,
    stats_period_s: float = 1.0,
    ingress_options: IngressOptions | None = None,
) -> Application:
    """The application: `num_replicas` replicas of `model` (each one engine with
    `engine_settings` and kvchat's HTTP app with `server_settings`), routed by
    prefix affinity (`routing="prefix"`) or by Ray Serve's default choice
    (``"default"``), behind one ingress."""
    engine_settings = engine_settings or EngineSettings()
    # Named by import path, not passed as a class: Serve would pickle a class with
    # copies of its module's globals, and the ingress reads the live registry.
    router_class = PrefixAffinityRouter if routing == "prefix" else LoadBalancedRouter
    router_config: dict[str, Any] = {
        "request_router_class": f"{router_class.__module__}.{router_class.__qualname__}",
        "request_router_kwargs": router_options or {},
        "request_routing_stats_period_s": stats_period_s,
        "request_routing_stats_timeout_s": 10.0,
    }
    replicas = cast(Deployment, serve.deployment(KVChatReplica)).options(
        name=REPLICA_DEPLOYMENT,
        num_replicas=num_replicas,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
        max_ongoing_requests=engine_settings.max_running + server_settings.max_queued,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(**router_config),
    )
    ingress = cast(Deployment, serve.deployment(KVChatIngress)).options(
        name="kvchat-ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}
    )
    options = ingress_options or IngressOptions(
        max_body_bytes=server_settings.max_body_bytes,
        retry_after=server_settings.retry_after,
        allowed_hosts=server_settings.allowed_hosts,
    )
    return ingress.bind(replicas.bind(model, engine_settings, server_settings), options)


def run(
    application: Application,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    num_cpus: int | None = None,
) -> None:
    """Start (or join, with `address`) a Ray cluster, serve `application` on
    `host`:`port` and block until interrupted."""
    import ray

    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    log.info("kvchat on Ray Serve: http://%s:%s/v1", host, port)
    serve.run(application, name="kvchat", route_prefix="/", blocking=True)
