"""`EvictionQueue`: the prefix cache's evictable leaves, least recently used first,
kept up to date as the tree changes instead of found by a scan of every leaf.

The queue holds a set of leaves and, for each minimum depth asked for, a heap of
``(last_used, stamp)`` keys. Nothing is ever removed from a heap in place: a
leaf that is touched again gets a new entry, and an entry is live only while it
is its leaf's latest one (lazy deletion). A heap that grows past twice its live
entries is rebuilt, so stale entries cost memory in proportion to the live ones.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Set
from typing import Generic, Protocol, TypeVar

__all__ = ["EvictionQueue", "Queueable"]


class Queueable(Hashable, Protocol):
    """What the queue reads of a leaf: its last-use key and its depth."""

    last_used: float
    stamp: int

    @property
    def end(self) -> int: ...


N = TypeVar("N", bound=Queueable)

_MAX_HEAPS = 4
"""Heaps kept at once (the depth-0 one and the latest others asked for): a caller asks
for one or two minimum depths, and a new one costs one pass over the queued leaves."""

_SLACK = 32
"""Stale entries a heap may hold beyond its live ones before it is rebuilt."""


class EvictionQueue(Generic[N]):
    """Leaves ordered by ``(last_used, stamp)``, oldest first.

    The caller pushes a leaf when it becomes evictable and again whenever its key
    changes, and discards it when it stops being evictable. Keys must be distinct
    between leaves (the prefix cache's stamps are).
    """

    def __init__(self) -> None:
        self._live: dict[N, int] = {}  # leaf -> the id of its latest entries
        self._heaps: dict[int, list[tuple[float, int, int, N]]] = {0: []}  # min depth -> entries
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, node: object) -> bool:
        return node in self._live

    def push(self, node: N) -> None:
        """Queue `node` with its current key (again, if it was queued)."""
        entry = (node.last_used, node.stamp, next(self._ids), node)
        self._live[node] = entry[2]
        for depth, heap in self._heaps.items():
            if node.end >= depth:
                heapq.heappush(heap, entry)
                if len(heap) > 2 * len(self._live) + _SLACK:
                    self._heaps[depth] = self._rebuilt(depth)

    def discard(self, node: N) -> None:
        """Take `node` out of the queue (nothing if it is not queued)."""
        self._live.pop(node, None)

    def oldest(self, min_depth: int = 0) -> N | None:
        """The queued leaf with the lowest key among those ending at least `min_depth`
        below their root; None if there is none."""
        depth = max(min_depth, 0)
        heap = self._heaps.get(depth)
        if heap is None:
            if len(self._heaps) >= _MAX_HEAPS:
                del self._heaps[next(d for d in self._heaps if d != 0)]
            heap = self._heaps[depth] = self._rebuilt(depth)
        while heap and self._live.get(heap[0][3]) != heap[0][2]:
            heapq.heappop(heap)
        return heap[0][3] if heap else None

    def inconsistency(self, evictable: Set[N]) -> str | None:
        """What is wrong if the queue does not hold exactly `evictable`, each leaf once
        per heap under its current key; None if nothing is."""
        if self._live.keys() != evictable:
            return f"queued leaves {set(self._live)} != evictable leaves {set(evictable)}"
        for depth, heap in self._heaps.items():
            live = [entry for entry in heap if self._live.get(entry[3]) == entry[2]]
            if len(live) != len({entry[3] for entry in live}):
                return f"a leaf is queued twice in the heap of depth {depth}"
            if {entry[3] for entry in live} != {node for node in evictable if node.end >= depth}:
                return f"the heap of depth {depth} does not hold every evictable leaf that deep"
            for last_used, stamp, _, node in live:
                if (last_used, stamp) != (node.last_used, node.stamp):
                    return f"{node!r} is queued under an old key {(last_used, stamp)}"
        return None

    def _rebuilt(self, depth: int) -> list[tuple[float, int, int, N]]:
        """A heap of the live entries of the leaves ending at least `depth` deep."""
        heap = [(node.last_used, node.stamp, i, node) for node, i in self._live.items() if node.end >= depth]
        heapq.heapify(heap)
        return heap
