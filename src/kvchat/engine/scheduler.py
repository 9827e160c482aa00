"""`Scheduler`: the waiting queue and the running requests, and the KV room each one holds.

Requests are admitted in arrival order while fewer than `max_running` run and
their cells can be reserved (:class:`~kvchat.engine.admission.Admission`, or a
conversation's own sequence). A request reserves only what it needs now: its
uncached tokens and room for `reservation_step` generated tokens (fewer if its
`max_tokens` is smaller). Before every step, a request about to outgrow its
reservation grows it by another step, evicting parked cache entries as needed;
when nothing is left to evict, the youngest running request is preempted: its
KV is parked in the prefix cache like a finished request's, and it goes back to
the front of the queue, to resume where it stopped (from the parked KV, or by
evaluating its tokens again if that was evicted meanwhile). Its stream only
pauses. Before preempting itself, a request whose shared prefix keeps a large
parked entry locked stops sharing it (its sequence keeps the cells). A request
that cannot grow while no other request can give way ends with finish reason
``length``: the pool is full.

So requests without `max_tokens` (which may each generate thousands of tokens)
run together instead of each holding the whole context from the start.

A waiting request whose prompt shares a long prefix with a running request's, one
the prefix cache does not hold yet (agents' sessions that start together with
the same instructions and tools), waits while the running one evaluates that
prefix (`SHARED_PREFILL_MIN_TOKENS`), keeping its place in the queue while
the requests behind it go ahead; then the running request's cells are published
to the prefix cache (:meth:`KVPool.publish`) and the waiting one shares them: the
prefix is evaluated once, not once per request side by side.
"""

from __future__ import annotations

import logging
from collections import deque

from kvchat.engine.admission import Admission, usable_prefix
from kvchat.engine.kv_pool import KVPool
from kvchat.engine.pinning import PinnedSequences
from kvchat.engine.radix import common_prefix_length
from kvchat.engine.request import Request

logger = logging.getLogger("kvchat.engine")

SHARED_PREFILL_MIN_TOKENS = 256
"""A waiting request waits for a running request's prompt when the two share at least
this many more tokens than the prefix cache holds."""


class Scheduler:
    """Waiting and running requests of one engine (worker thread only)."""

    def __init__(self, pool: KVPool, admission: Admission, pinned: PinnedSequences, *, max_running: int) -> None:
        self._pool = pool
        self._admission = admission
        self._pinned = pinned
        self._max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        """Requests preempted since start."""

    def add(self, request: Request) -> None:
        """Queue a newly submitted request."""
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of whichever queue holds it (it is ending)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def admit(self) -> list[Request]:
        """Admit waiting requests in order while they fit; returns the admitted ones. A
        request that waits for a running request's prompt keeps its place, and the
        requests behind it may go first."""
        admitted: list[Request] = []
        for request in list(self.waiting):
            if len(self.running) >= self._max_running:
                break
            if self._waits_for_shared_prefill(request):
                continue
            if not self._admit(request):
                break
            self.waiting.remove(request)
            self.running.append(request)
            admitted.append(request)
        return admitted

    def _admit(self, request: Request) -> bool:
        if request.pinned is not None:
            return self._pinned.admit(request)
        return self._admission.admit(request)

    def _waits_for_shared_prefill(self, request: Request) -> bool:
        """True while a running request evaluates a long prefix `request` shares with
        it; once that is evaluated, it is published to the prefix cache for `request`."""
        found = self._prefill_to_share(request) if request.pinned is None else None
        if found is None:
            return False
        source, common = found
        if source.n_past < common:
            return True
        self._pool.publish(source)
        return False

    def _prefill_to_share(self, request: Request) -> tuple[Request, int] | None:
        """The running request whose tokens share the longest prefix with `request`'s
        (in its cache namespace), if that is `SHARED_PREFILL_MIN_TOKENS` longer than
        what the prefix cache holds; and that prefix's length."""
        cache = self._pool.cache
        if cache is None or request.shift is not None:
            return None
        tokens = request.admission_tokens
        best: tuple[Request, int] | None = None
        for other in self.running:
            if other.cache_key != request.cache_key or other.pinned is not None or other.shift is not None:
                continue
            common = usable_prefix(request, common_prefix_length(other.admission_tokens, tokens))
            if best is None or common > best[1]:
                best = (other, common)
        if best is None or best[1] < SHARED_PREFILL_MIN_TOKENS:
            return None
        held = cache.peek(tokens, namespace=request.cache_key).length
        return best if best[1] >= held + SHARED_PREFILL_MIN_TOKENS else None

    def reserve_step(self) -> list[Request]:
        """Make every running request's reservation cover what this step adds,
        oldest first, growing reservations and preempting the youngest as needed.
        Returns the requests that cannot go on for lack of room (the caller ends
        them with finish reason ``length``); they stay in `running` until then."""
        out_of_room = []
        for request in sorted(self.running, key=lambda r: r.request_id):
            if request not in self.running:  # preempted for an older request
                continue
            needed = request.own_cells + len(request.pending) - request.reserved_cells
            if needed > 0 and not self._grow(request, max(needed, request.decode_cells())):
                out_of_room.append(request)
        return out_of_room

    def _grow(self, request: Request, cells: int) -> bool:
        """Reserve `cells` more for `request`, preempting younger requests (or the
        request itself, if it is the youngest) until they fit. False if nothing can give way."""
        while not self._pool.make_room(cells, need_id=False):
            victim = self._youngest_preemptible()
            if victim in (None, request) and self._pool.unshare(request, cells):
                continue  # its shared prefix was what kept the room locked
            if victim is None or (victim is request and len(self.running) == 1):
                return False  # waiting would not make room: nothing else runs
            self._preempt(victim)
            if victim is request:
                return True  # it waits now; it reserves again when it resumes
        self._pool.grow_reservation(request, cells)
        return True

    def _youngest_preemptible(self) -> Request | None:
        """The most recently submitted running request whose cells can be parked
        (a conversation's cells stay with it, so preempting it frees nothing)."""
        candidates = [r for r in self.running if r.pinned is None]
        return max(candidates, key=lambda r: r.request_id, default=None)

    def _preempt(self, request: Request) -> None:
        """Park the request's KV in the prefix cache and queue it again, first."""
        logger.debug("preempting request %d after %d tokens", request.request_id, len(request.generated))
        self.running.remove(request)
        self._pool.finish(request, keep=True)
        self._pool.vacate(request)
        request.preemptions += 1
        request.pending = []
        self.waiting.appendleft(request)
        self.preemptions += 1
