"""`Admission`: which model requests the server takes in, in total and per API key.

A request is *in flight* from the moment it is admitted until its response
ends. In flight, it either holds its *running places* (its work is with the
engine, or with the embedding worker) or waits for them. The server bounds:

- all places in flight: the engine's `max_running` plus `max_queued`;
- with two or more API keys, each key's share of both: at most
  ``ceil(max_running * key_share)`` of a key's places are running places
  (the key's other requests wait here, in arrival order) and at most
  ``ceil(max_queued * key_share)`` places wait.

Beyond either bound a request gets 429 with ``Retry-After`` at once, before any
work. So one key that floods the server gets 429s while the other keys' requests
are still taken in and reach the engine at once (the flood holds no more than
its share of the running places).

**A request counts one place per item** it runs: a prompt of a
``/v1/completions`` request with a list of prompts, a text of a
``/v1/embeddings`` request; a chat or a response is one item. Its places are
taken together (all or none, in one step: it is admitted or refused as a whole,
and it waits for its running places in arrival order, with no other request of
the key overtaking it). A request never counts more than :attr:`Admission.most_places`
places, the running places its key may hold (the engine's `max_running`
without per-key shares).

Decision, for a request with more items than that (say 16 prompts when a key
holds 2 running places): it is served, not refused. It counts as the key's
whole running share, so it waits until none of the key's other requests runs,
and it runs its items at most that many at a time (:meth:`Admission.places`
tells the route how many), in waves. So it never has more work with the engine
(or the embedding worker) at once than the places it holds: another key's
request is taken in and reaches the engine at once, and the large request
finishes later rather than never. A client that wants its items done sooner
sends them in separate requests, each of which counts on its own.

Decision: with one API key or none, every request is the one tenant's, and that
tenant may use the whole server, as before shares existed: requests are not
held back here at all (they queue in the engine), and only the server's bound
counts their places. A server without keys cannot tell its users apart; an
operator who shares it between people gives each their own key.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field

from kvchat.server.errors import APIError
from kvchat.server.metrics import ServerMetrics

__all__ = ["Admission", "Ticket"]


class _Places:
    """One key's running places: taken several at a time, in arrival order.

    A waiter is served only once every earlier waiter is, even when a later one
    asks for fewer places than are free: a large request is not overtaken
    forever by small ones. Nobody asks for more than `total`, so the first waiter
    is always served once the places it waits for are given back.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, count: int) -> None:
        """Take `count` places (at most `total`), waiting for them in arrival order.
        A cancelled wait takes nothing."""
        if not self._waiters and self.free >= count:
            self.free -= count
            return
        waiter = (count, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            if waiter[1].done() and not waiter[1].cancelled():
                self.release(count)  # given just before the cancel arrived: give it back
            else:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                self._serve()  # the next waiter may fit now
            raise

    def release(self, count: int) -> None:
        """Give `count` places back and serve the waiters they are enough for."""
        self.free += count
        self._serve()

    def _serve(self) -> None:
        while self._waiters and (self._waiters[0][1].done() or self._waiters[0][0] <= self.free):
            count, future = self._waiters.popleft()
            if not future.done():  # (a cancelled waiter takes nothing)
                self.free -= count
                future.set_result(None)


@dataclass
class _Tenant:
    """One API key's requests: the places they count, and the key's running places."""

    places: _Places | None
    in_flight: int = 0


@dataclass
class Ticket:
    """One admitted request's hold on the server: `weight` places, in flight and,
    once :meth:`Admission.take_place` returns, running. Give it back with
    :meth:`Admission.leave`."""

    key: str
    weight: int
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
        """Most places in flight."""
        share = key_share if shared else 1.0
        self.key_running: int | None = None
        """Most running places one key may hold (None: no per-key bound)."""
        self.key_capacity = self.capacity
        """Most places of one key in flight."""
        if share < 1:
            self.key_running = max(1, math.ceil(max_running * share))
            self.key_capacity = self.key_running + math.ceil(max_queued * share)
        self.most_places = max(1, self.key_running if self.key_running is not None else max_running)
        """Most places one request counts (and items it runs at once)."""
        self.retry_after = retry_after
        self.in_flight = 0
        """Places in flight, of all keys."""
        self.requests = 0
        """Requests in flight (the ``kvchat_http_requests_in_flight`` gauge)."""
        self._tenants: dict[str, _Tenant] = {}
        self._metrics = metrics

    def places(self, items: int) -> int:
        """The places a request of `items` items counts: one per item, at most
        :attr:`most_places`. The request runs at most this many items at once."""
        return max(1, min(items, self.most_places))

    def enter(self, key: str, items: int = 1) -> Ticket:
        """Admit a request of `key` (any string naming its API key) that runs
        `items` items, counting :meth:`places` places, or raise the 429 error."""
        weight = self.places(items)
        if self.in_flight + weight > self.capacity:
            raise self._busy(
                f"the server is busy ({self.in_flight} of its {self.capacity} places in flight, "
                f"this request needs {weight}); retry later"
            )
        tenant = self._tenants.get(key)
        if tenant is None:
            places = None if self.key_running is None else _Places(self.key_running)
            tenant = self._tenants[key] = _Tenant(places)
        if tenant.in_flight + weight > self.key_capacity:
            raise self._busy(
                f"this API key has {tenant.in_flight} places in flight (one per prompt or input) and this "
                f"request needs {weight}; its share of this server is {self.key_capacity} of {self.capacity}; "
                "retry later"
            )
        tenant.in_flight += weight
        self.in_flight += weight
        self.requests += 1
        self._metrics.in_flight.set(self.requests)
        return Ticket(key, weight, tenant)

    async def take_place(self, ticket: Ticket) -> None:
        """Wait for the ticket's running places of its key, all together (at once
        without a per-key bound). Cancelling the wait gives nothing up: the ticket
        still needs :meth:`leave`."""
        places = ticket._tenant.places
        if places is not None and not ticket.holds_place and not ticket.left:
            await places.acquire(ticket.weight)
            ticket.holds_place = True

    def leave(self, ticket: Ticket) -> None:
        """The request ended: free its running places and its slots (a second call does nothing)."""
        if ticket.left:
            return
        ticket.left = True
        tenant = ticket._tenant
        if ticket.holds_place and tenant.places is not None:
            ticket.holds_place = False
            tenant.places.release(ticket.weight)
        tenant.in_flight -= ticket.weight
        if tenant.in_flight == 0:
            del self._tenants[ticket.key]
        self.in_flight -= ticket.weight
        self.requests -= 1
        self._metrics.in_flight.set(self.requests)

    def _busy(self, message: str) -> APIError:
        return APIError(
            429,
            message,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(self.retry_after)},
        )
