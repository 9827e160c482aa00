"""`build_app`: the Serve application (ingress + kvchat replicas) and `run` for ``kvchat serve --ray``."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal, cast

from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig
from ray.serve.deployment import Application, Deployment

from kvchat.engine import EngineSettings
from kvchat.server import ServerSettings
from kvchat.server.middleware import host_name, is_loopback
from kvchat.server.ray_serve.ingress import REPLICA_DEPLOYMENT, IngressOptions, KVChatIngress
from kvchat.server.ray_serve.replica import KVChatReplica
from kvchat.server.ray_serve.router import LoadBalancedRouter, PrefixAffinityRouter

__all__ = ["allow_bound_host", "build_app", "run"]

log = logging.getLogger("kvchat.server.ray_serve")

Routing = Literal["prefix", "default"]

INGRESS_SPARE_REQUESTS = 16
"""Requests the ingress takes beyond what the replicas and the handle's queue hold:
``/health``, ``/metrics`` and the requests it refuses at once (401, 403, 413, 429)."""


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
    max_queued_requests: int | None = None,
) -> Application:
    """The application: `num_replicas` replicas of `model` (each one engine with
    `engine_settings` and kvchat's HTTP app with `server_settings`), routed by
    prefix affinity (`routing="prefix"`) or by Ray Serve's default choice
    (``"default"``), behind one ingress.

    Each replica takes as many requests at once as its own admission does
    (`max_running` + `max_queued`). Beyond them, requests wait in the ingress's
    handle queue, which holds `max_queued_requests` (Ray Serve's option of that
    name; default: `server_settings.max_queued`, at least 1); past it the ingress
    answers 429 with ``Retry-After`` at once. The ingress itself takes all of
    these plus :data:`INGRESS_SPARE_REQUESTS`, and lets as many more wait in front
    of it (Ray's proxy answers 429 past them, in plain text).
    """
    engine_settings = engine_settings or EngineSettings()
    if max_queued_requests is None:
        max_queued_requests = max(1, server_settings.max_queued)
    if max_queued_requests < 1:
        raise ValueError("max_queued_requests must be at least 1")
    per_replica = engine_settings.max_running + server_settings.max_queued
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
        max_ongoing_requests=per_replica,
        max_queued_requests=max_queued_requests,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(**router_config),
    )
    ingress = cast(Deployment, serve.deployment(KVChatIngress)).options(
        name="kvchat-ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        # Serve's default (5) would make the ingress the bottleneck: a stream holds
        # its place for as long as it runs.
        max_ongoing_requests=num_replicas * per_replica + max_queued_requests + INGRESS_SPARE_REQUESTS,
        max_queued_requests=max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=server_settings.retry_after),
    )
    options = ingress_options or IngressOptions(
        max_body_bytes=server_settings.max_body_bytes,
        retry_after=server_settings.retry_after,
        allowed_hosts=server_settings.allowed_hosts,
        api_keys=server_settings.api_keys,
    )
    return ingress.bind(replicas.bind(model, engine_settings, server_settings), options)


def allow_bound_host(settings: ServerSettings, host: str) -> ServerSettings:
    """`settings` with the address the application is served on (`host`, as
    ``kvchat serve --ray --host`` gives it) among the allowed ``Host`` names, as
    :func:`kvchat.server.serve` does for one process: clients that reach the
    server by that address are expected. Loopback addresses are always allowed;
    for every address (``0.0.0.0``, ``::``) only `settings.allowed_hosts` are
    (a warning says so when there are none). Pass the result to :func:`build_app`:
    the ingress and every replica check the ``Host`` header."""
    everywhere = host in ("", "0.0.0.0", "::")
    named = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if not everywhere and not is_loopback(host_name(named) or ""):
        if named.lower() in settings.allowed_hosts:
            return settings
        return dataclasses.replace(settings, allowed_hosts=(*settings.allowed_hosts, named))
    if everywhere and not settings.allowed_hosts:
        log.warning(
            "listening on every address, but answering only requests for localhost; "
            "allow the names clients use with --allowed-host NAME (or '*')"
        )
    return settings


def run(
    application: Application,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    num_cpus: int | None = None,
) -> None:
    """Start (or join, with `address`) a Ray cluster, serve `application` on
    `host`:`port` and block until interrupted. Build `application` with settings
    that allow `host` (:func:`allow_bound_host`) for clients to reach it by it."""
    import ray

    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    log.info("kvchat on Ray Serve: http://%s:%s/v1", host, port)
    serve.run(application, name="kvchat", route_prefix="/", blocking=True)
