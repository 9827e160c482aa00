"""Ray Serve request routers for kvchat replicas.

- :class:`PrefixAffinityRouter`: kvchat's router, which decides by
  :class:`~kvchat.server.ray_serve.policy.PrefixAffinityPolicy`;
- :class:`LoadBalancedRouter`: Ray Serve's default choice (power of two choices
  by queue length) with the same bookkeeping, for comparison.

Both count decisions and requests in flight per replica, read the stats each
replica publishes (cache capacity, metrics) and register
themselves in :data:`ROUTERS`, where the ingress (whose process holds the
routers of its handles) reads them for ``/metrics`` and ``/health``.
"""

from __future__ import annotations

import importlib
import time
from collections import Counter
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvchat.server.ray_serve.policy import PendingDecisions, PrefixAffinityPolicy
from kvchat.server.ray_serve.routing_text import RoutingHint, replica_response_tag

__all__ = ["ROUTERS", "LoadBalancedRouter", "PrefixAffinityRouter", "RouterBook"]

ROUTERS: dict[str, RouterBook] = {}
"""The routers made in this process, by deployment name (the last one made wins)."""

CHARS_PER_TOKEN = 4
"""Routing texts are characters, caches hold tokens: about four characters a token."""


class RouterBook:
    """What a router knows and counts: replicas' published stats, requests in flight,
    decisions by kind."""

    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()
        self.stats: dict[str, dict[str, Any]] = {}

    def refresh(self, replicas: list[RunningReplica]) -> None:
        """Take in the stats the replicas published last."""
        for replica in replicas:
            stats = replica.routing_stats or {}
            if stats:
                self.stats[replica.replica_id.unique_id] = stats

    def drop(self, key: str) -> None:
        """Forget replica `key` (it died)."""
        self.stats.pop(key, None)
        self.in_flight.pop(key, None)

    def snapshot(self) -> dict[str, Any]:
        """The replicas as ``/health`` shows them."""
        now = time.time()
        return {
            key: {
                "requests_in_flight": self.in_flight.get(key, 0),
                "stats_age_s": round(now - float(stats.get("reported", now)), 3),
                "started": stats.get("started"),
            }
            for key, stats in self.stats.items()
        }


def _registry() -> dict[str, RouterBook]:
    """:data:`ROUTERS` of the imported module. Serve may ship a router class by
    value, with a copy of this module's globals; the ingress reads the real one."""
    return importlib.import_module(__name__).ROUTERS


def _hint(pending_request: PendingRequest | None) -> RoutingHint | None:
    if pending_request is None:
        return None
    for value in (*pending_request.args, *pending_request.kwargs.values()):
        if isinstance(value, RoutingHint):
            return value
    return None


class _Bookkeeping(RequestRouter):
    """The shared part: registration, stats, in-flight counts, decisions."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.book = RouterBook()
        _registry()[self._deployment_id.name] = self.book

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._count(replica_id.unique_id, "load_balanced")

    def _count(self, key: str, kind: str) -> None:
        """A request went to replica `key`, chosen as `kind`."""
        self.book.in_flight[key] += 1
        self.book.decisions[kind] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        key = replica_id.unique_id
        if self.book.in_flight.get(key, 0) > 0:
            self.book.in_flight[key] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.book.drop(replica_id.unique_id)
        self.book.decisions["replica_died"] += 1

    def _load(self, replica: RunningReplica) -> int:
        queued = self._replica_queue_len_cache.get(replica.replica_id) or 0
        return max(queued, self.book.in_flight.get(replica.replica_id.unique_id, 0))


class PrefixAffinityRouter(_Bookkeeping):
    """Sends each request to the replica that holds the longest prefix of its
    routing text, within a load bound (see :class:`PrefixAffinityPolicy`).

    A request about a stored response (its hint names a response tag) goes to the
    replica whose tag it is, and waits for that replica when it is full: no other
    replica holds the response. Each candidate's tag is computed from its replica
    id (:func:`replica_response_tag`), so this holds from a replica's first request.

    Router kwargs: `min_match_chars`, `max_imbalance` (the policy's),
    `pending_bytes` (the bound on :class:`PendingDecisions`).
    """

    def initialize_state(
        self,
        min_match_chars: int = 32,
        max_imbalance: int = 4,
        pending_bytes: int = PendingDecisions.DEFAULT_MAX_BYTES,
        **kwargs: Any,
    ) -> None:
        super().initialize_state(**kwargs)
        self.policy = PrefixAffinityPolicy(min_match_chars=min_match_chars, max_imbalance=max_imbalance)
        self._pending = PendingDecisions(max_bytes=pending_bytes)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        hint = _hint(pending_request)
        if hint is None or not candidate_replicas or pending_request is None:
            return [candidate_replicas]
        self.book.refresh(candidate_replicas)
        by_key = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        for key, stats in self.book.stats.items():
            if key in by_key and stats.get("capacity_tokens"):
                self.policy.set_capacity(key, int(stats["capacity_tokens"]) * CHARS_PER_TOKEN)
        pinned = _owner(hint.response_tag, by_key) if hint.response_tag else None
        decision = self.policy.choose(
            hint.text, {key: self._load(replica) for key, replica in by_key.items()}, pinned=pinned, header=hint.header
        )
        self._pending.put(pending_request.metadata.internal_request_id, decision, hint.text)
        chosen = by_key[str(decision.replica)]
        others = [replica for replica in candidate_replicas if replica is not chosen]
        if decision.kind == "pinned" or not others:
            return [[chosen]]  # only it can serve the request: wait for it if it is full
        # The chosen replica first; if Ray finds its queue full, the others by load.
        return [[chosen], others]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = replica_id.unique_id
        chosen = self._pending.pop(pending_request.metadata.internal_request_id)
        if chosen is None:
            self._count(key, "load_balanced")
            return
        decision, text = chosen
        self.policy.record(key, text)
        # Another replica than the chosen one: Ray found the chosen one's queue full.
        self._count(key, decision.kind if decision.replica == key else "full")

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id.unique_id)


def _owner(tag: str, replicas: dict[str, RunningReplica]) -> str | None:
    """The replica among `replicas` (by replica id) whose response tag is `tag`."""
    return next((key for key in replicas if replica_response_tag(key) == tag), None)


class LoadBalancedRouter(_Bookkeeping, PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default routing (power of two choices) with kvchat's bookkeeping;
    a request about a stored response still goes to the replica that stored it."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        self.book.refresh(candidate_replicas)
        hint = _hint(pending_request)
        if hint is not None and hint.response_tag:
            by_key = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
            owner = _owner(hint.response_tag, by_key)
            if owner is not None:
                return [[by_key[owner]]]
        return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
