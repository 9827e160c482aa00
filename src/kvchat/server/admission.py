"""`Admission`: which model requests the server takes in, in total and per API key.

A request is *in flight* from the moment it is admitted until its response
ends. In flight, it either holds a *running place* (its work is with the engine,
or with the embedding worker) or waits for one. The server bounds:

- all requests in flight: the engine's `max_running` plus `max_queued`;
- with two or more API keys, each key's share of both: at most
  ``ceil(max_running * key_share)`` of a key's requests hold running places
  (the rest wait here, in arrival order) and at most
  ``ceil(max_queued * key_share)`` wait.

Beyond either bound a request gets 429 with ``Retry-After`` at once, before any
work. So one key that floods the server gets 429s while the other keys' requests
are still taken in and reach the engine at once (the flood holds no more than
its share of the running places).

Decision: with one API key or none, every request is the one tenant's, and that
tenant may use the whole server, as before shares existed: requests are not
held back here at all (they queue in the engine). A server without keys cannot
tell its users apart; an operator who shares it between people gives each their
own key.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from kvchat.server.errors import APIError
from kvchat.server.metrics import ServerMetrics

__all__ = ["Admission", "Ticket"]


@dataclass
class _Tenant:
    """One API key's requests: how many are in flight, and its running places."""

    places: asyncio.Semaphore | None
    in_flight: int = 0


@dataclass
class Ticket:
    """One admitted request's hold on the server. Give it back with :meth:`Admission.leave`."""

    key: str
    _tenant: _Tenant = field(repr=False)
    holds_place: bool = False
    left: bool = False


class Admission:
    """Takes in model requests within the server's bounds (see the module's docstring).

    `key_share` applies only when `shared` (the server has two or more API
    keys); 1 means no per-key bound. Call everything from the event loop.
    """

    def __init__(
        self,
        *,
        max_running: int,
        max_queued: int,
        key_share: float,
        shared: bool,
        retry_after: int,
        metrics: ServerMetrics,
    ) -> None:
        self.capacity = max_running + max_queued
        """Most requests in flight."""
        share = key_share if shared else 1.0
        self.key_running: int | None = None
        """Most running places one key may hold (None: no per-key bound)."""
        self.key_capacity = self.capacity
        """Most requests of one key in flight."""
        if share < 1:
            self.key_running = max(1, math.ceil(max_running * share))
            self.key_capacity = self.key_running + math.ceil(max_queued * share)
        self.retry_after = retry_after
        self.in_flight = 0
        self._tenants: dict[str, _Tenant] = {}
        self._metrics = metrics

    def enter(self, key: str) -> Ticket:
        """Admit a request of `key` (any string naming its API key), or raise the 429 error."""
        if self.in_flight >= self.capacity:
            raise self._busy(f"the server is busy ({self.in_flight} requests in flight); retry later")
        tenant = self._tenants.get(key)
        if tenant is None:
            places = None if self.key_running is None else asyncio.Semaphore(self.key_running)
            tenant = self._tenants[key] = _Tenant(places)
        if tenant.in_flight >= self.key_capacity:
            raise self._busy(
                f"this API key has {tenant.in_flight} requests in flight, its share of this server "
                f"({self.key_capacity} of {self.capacity}); retry later"
            )
        tenant.in_flight += 1
        self.in_flight += 1
        self._metrics.in_flight.set(self.in_flight)
        return Ticket(key, tenant)

    async def take_place(self, ticket: Ticket) -> None:
        """Wait for one of the key's running places (at once without a per-key bound).
        Cancelling the wait gives nothing up: the ticket still needs :meth:`leave`."""
        places = ticket._tenant.places
        if places is not None and not ticket.holds_place and not ticket.left:
            await places.acquire()
            ticket.holds_place = True

    def leave(self, ticket: Ticket) -> None:
        """The request ended: free its running place and its slot (a second call does nothing)."""
        if ticket.left:
            return
        ticket.left = True
        tenant = ticket._tenant
        if ticket.holds_place and tenant.places is not None:
            ticket.holds_place = False
            tenant.places.release()
        tenant.in_flight -= 1
        if tenant.in_flight == 0:
            del self._tenants[ticket.key]
        self.in_flight -= 1
        self._metrics.in_flight.set(self.in_flight)

    def _busy(self, message: str) -> APIError:
        return APIError(
            429,
            message,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(self.retry_after)},
        )
