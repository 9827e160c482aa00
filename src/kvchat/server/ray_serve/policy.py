"""`PrefixAffinityPolicy`: which replica should serve a request, by prefix and by load.

The decision, for a request whose routing text is `text` (see
:mod:`kvchat.server.ray_serve.routing_text`):

1. A request that continues a stored response (``previous_response_id``) goes
   to the replica that stored it (`pinned`): only that replica can continue it.
2. The replicas within `max_imbalance` requests of the least loaded one are
   eligible. Among them, the one that was sent the longest earlier text which
   `text` extends (the conversation's previous turn, at least
   `min_match_chars` long) wins ("prefix"): its engine evaluates only the rest.
   A prefix merely shared with other conversations (a system prompt, the
   first words of a question) does not count: every replica soon holds it, and
   chasing it would crowd new conversations onto one replica. Nor does the
   text's `header` (the tenant and path that begin every routing text of a
   tenant, :attr:`RoutingHint.header`): `min_match_chars` counts past it.
3. Otherwise the least loaded eligible replica wins, ties going to the one with
   the least text recorded (the most cache room): "overloaded" when the
   conversation's replica was passed over for its load, "least_loaded" for a
   new conversation.

The chosen replica's record then grows by `text` (:meth:`record`), so the next
turn of the conversation, whose text extends this one, follows it. No Ray here:
the Ray Serve router and the simulation in ``benchmarks/scale_out_simulation.py`` both
drive this class.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Literal

from kvchat.server.ray_serve.prefix_tree import ReplicaPrefixTree

__all__ = ["DecisionKind", "PendingDecisions", "PrefixAffinityPolicy", "RoutingDecision"]

DecisionKind = Literal["pinned", "prefix", "overloaded", "least_loaded"]


@dataclass(frozen=True)
class RoutingDecision:
    """Where a request goes and why: `kind` (see the module doc) and how many
    characters of its routing text the chosen replica already held."""

    replica: Hashable
    kind: DecisionKind
    matched_chars: int


class PrefixAffinityPolicy:
    """Prefix affinity with a load bound, over replicas named by any hashable key.

    - `min_match_chars`: a shorter shared prefix is not worth a detour.
    - `max_imbalance`: how many more requests than the least loaded replica a
      replica may have and still be chosen for its prefix. kvchat decodes a
      replica's requests together in one batch, so a few extra requests cost a
      replica far less than re-reading a long history elsewhere.
    """

    def __init__(self, *, min_match_chars: int = 32, max_imbalance: int = 4) -> None:
        if min_match_chars < 1:
            raise ValueError("min_match_chars must be at least 1")
        if max_imbalance < 0:
            raise ValueError("max_imbalance must not be negative")
        self.min_match_chars = min_match_chars
        self.max_imbalance = max_imbalance
        self.tree = ReplicaPrefixTree()
        self._turn = 0

    def choose(
        self, text: str, loads: Mapping[Hashable, int], *, pinned: Hashable | None = None, header: int = 0
    ) -> RoutingDecision:
        """The replica among `loads` (replica → requests in flight) for a request
        with routing text `text`; `pinned` is the replica that must serve it, if any;
        `header` is how many leading characters of `text` hold no prompt (see
        :attr:`RoutingHint.header`): an earlier text counts only if it is at least
        `min_match_chars` longer."""
        if not loads:
            raise ValueError("no replica to choose from")
        matched = self.tree.match(text)
        if pinned is not None and pinned in loads:
            return RoutingDecision(pinned, "pinned", matched.get(pinned, 0))
        # Only a whole earlier text (this conversation's earlier turn) makes a home:
        # a prefix shared with other conversations (a system prompt) is soon on
        # every replica, and chasing it would crowd new conversations onto one.
        homes = {replica: length for replica, length in self.tree.match_whole(text).items() if replica in loads}
        needed = header + self.min_match_chars
        least = min(loads.values())
        eligible = [replica for replica, load in loads.items() if load <= least + self.max_imbalance]
        at_home = [replica for replica in eligible if homes.get(replica, 0) >= needed]
        if at_home:
            best = max(at_home, key=lambda replica: (homes[replica], -loads[replica]))
            return RoutingDecision(best, "prefix", matched.get(best, 0))
        passed_over = any(length >= needed for length in homes.values())
        chosen = self._least_loaded(eligible, loads)
        return RoutingDecision(chosen, "overloaded" if passed_over else "least_loaded", matched.get(chosen, 0))

    def record(self, replica: Hashable, text: str) -> None:
        """Note that `replica` was sent `text`: it now holds its prefixes."""
        self.tree.insert(replica, text)

    def set_capacity(self, replica: Hashable, chars: int | None) -> None:
        """How much text `replica`'s cache holds; older records past it are forgotten."""
        self.tree.set_capacity(replica, chars)

    def forget(self, replica: Hashable) -> None:
        """`replica` is gone (or restarted empty): drop its record."""
        self.tree.forget(replica)

    def _least_loaded(self, eligible: list[Hashable], loads: Mapping[Hashable, int]) -> Hashable:
        def rank(replica: Hashable) -> tuple[int, int]:
            return loads[replica], self.tree.chars(replica)

        lowest = min(rank(replica) for replica in eligible)
        ties = [replica for replica in eligible if rank(replica) == lowest]
        self._turn += 1
        return ties[self._turn % len(ties)]


class PendingDecisions:
    """Each request's decision and routing text, by request id, from the choice until
    Ray reports where the request went.

    A request cancelled before it is routed never gets that report, so entries
    also leave by age (`max_age_s`), by number (`max_entries`) and by size
    (`max_bytes`: the memory of the ids and texts kept, as ``sys.getsizeof``
    counts it, plus :attr:`ENTRY_OVERHEAD` an entry), oldest first: the map stays
    bounded whatever clients send. A single entry larger than `max_bytes` is not
    kept at all. A request routed after its entry left (or that had none kept) is
    counted without its decision (its text is not recorded); its next turn is
    then routed as a new conversation, which costs one cache miss, not an error.
    """

    ENTRY_OVERHEAD = 256
    """Bytes an entry costs besides its id and text (the map's node, the tuple, the time)."""
    DEFAULT_MAX_BYTES = 64 * 1024 * 1024
    """The default `max_bytes`: many full-size (4 MB) request bodies' texts at once."""

    def __init__(
        self,
        *,
        max_age_s: float = 600.0,
        max_entries: int = 65_536,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age_s <= 0 or max_entries < 1 or max_bytes < 1:
            raise ValueError("max_age_s must be > 0, max_entries >= 1 and max_bytes >= 1")
        self._entries: OrderedDict[str, tuple[float, RoutingDecision, str, int]] = OrderedDict()
        self._max_age_s = max_age_s
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """The size of what is kept (see the class doc); never above `max_bytes`."""
        return self._bytes

    def put(self, request_id: str, decision: RoutingDecision, text: str) -> None:
        """Keep `request_id`'s latest decision (a request Ray retries is chosen again)."""
        now = self._clock()
        self._drop(request_id)
        size = sys.getsizeof(request_id) + sys.getsizeof(text) + self.ENTRY_OVERHEAD
        if size <= self._max_bytes:
            self._entries[request_id] = (now, decision, text, size)
            self._bytes += size
        while self._entries:
            oldest_id, (made, _, _, _) = next(iter(self._entries.items()))
            if (
                now - made <= self._max_age_s
                and len(self._entries) <= self._max_entries
                and self._bytes <= self._max_bytes
            ):
                break
            self._drop(oldest_id)

    def pop(self, request_id: str) -> tuple[RoutingDecision, str] | None:
        """`request_id`'s decision and routing text, if still kept; it leaves the map."""
        entry = self._drop(request_id)
        return None if entry is None else (entry[1], entry[2])

    def check_integrity(self) -> None:
        """Raise AssertionError unless the bounds hold and `bytes` is the sum of the entries' sizes."""
        sizes = [
            sys.getsizeof(key) + sys.getsizeof(text) + self.ENTRY_OVERHEAD
            for key, (_, _, text, _) in self._entries.items()
        ]
        assert sizes == [size for _, _, _, size in self._entries.values()], "an entry's size is off"
        assert self._bytes == sum(sizes) <= self._max_bytes, (self._bytes, sum(sizes), self._max_bytes)
        assert len(self._entries) <= self._max_entries

    def _drop(self, request_id: str) -> tuple[float, RoutingDecision, str, int] | None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._bytes -= entry[3]
        return entry
