"""`ReplicaPrefixTree`: an approximate record of the prompts each replica holds.

One radix tree (on :mod:`kvchat.engine.radix`) over routing texts (see
:mod:`kvchat.server.ray_serve.routing_text`), each node tagged with the replicas
that were sent a text running through it and when. A replica that holds a node
holds all its ancestors, so one walk down the tree gives every replica's longest
match. Each replica's share of the tree is bounded by its cache capacity (in
characters); past it, that replica's least recently used leaves are forgotten,
as its engine evicts least recently used prefixes. No Ray here: the router and
the simulation share it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING

from kvchat.engine.radix import RadixNode

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ReplicaPrefixTree"]

ReplicaKey = Hashable


class _Node(RadixNode[str]):
    """A run of characters; `last_used` maps the replicas holding it to the logical
    time they last used it; `ends` are the replicas that were sent a text ending
    exactly here."""

    __slots__ = ("last_used", "ends")

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.last_used: dict[ReplicaKey, float] = {}
        self.ends: set[ReplicaKey] = set()

    def upper_half(self, label: str) -> Self:
        """Each holder of this node holds the upper part too (its character count is
        unchanged); no text ends there yet."""
        upper = type(self)(label)
        upper.last_used = dict(self.last_used)
        return upper


class ReplicaPrefixTree:
    """Which replica was sent which text, as a radix tree with per-replica LRU bounds."""

    def __init__(self) -> None:
        self._root = _Node("")
        self._chars: dict[ReplicaKey, int] = {}
        self._capacity: dict[ReplicaKey, int] = {}
        self._clock = 0.0

    # -- reading ---------------------------------------------------------------

    def match(self, text: str) -> dict[ReplicaKey, int]:
        """For every replica whose record shares a prefix with `text`, that prefix's length."""
        matched: dict[ReplicaKey, int] = {}
        for node, length in self._root.descend(text):
            for replica in node.last_used:
                matched[replica] = length
        return matched

    def match_whole(self, text: str) -> dict[ReplicaKey, int]:
        """For every replica that was sent a text which is a prefix of `text` (a
        conversation's earlier turn), the longest such text's length."""
        whole: dict[ReplicaKey, int] = {}
        for node, length in self._root.descend(text):
            if length < node.end:
                break
            for replica in node.ends:
                whole[replica] = length
        return whole

    def chars(self, replica: ReplicaKey) -> int:
        """Characters of text recorded for `replica`."""
        return self._chars.get(replica, 0)

    def replicas(self) -> list[ReplicaKey]:
        """The replicas with anything recorded."""
        return [replica for replica, count in self._chars.items() if count > 0]

    # -- writing ---------------------------------------------------------------

    def insert(self, replica: ReplicaKey, text: str) -> None:
        """Record that `replica` was sent `text` (and so holds its prefixes), then
        trim the replica's record to its capacity."""
        self._clock += 1
        end = self._root.insert(text)
        if end is not self._root:
            end.ends.add(replica)
        node: _Node | None = end
        while node is not None and node is not self._root:
            if replica not in node.last_used:
                self._chars[replica] = self._chars.get(replica, 0) + len(node.label)
            node.last_used[replica] = self._clock
            node = node.parent
        capacity = self._capacity.get(replica)
        if capacity is not None and self._chars.get(replica, 0) > capacity:
            self._trim(replica, capacity)

    def set_capacity(self, replica: ReplicaKey, chars: int | None) -> None:
        """Bound `replica`'s record to `chars` characters (None: unbounded)."""
        if chars is None:
            self._capacity.pop(replica, None)
            return
        self._capacity[replica] = max(0, chars)
        if self._chars.get(replica, 0) > chars:
            self._trim(replica, chars)

    def forget(self, replica: ReplicaKey) -> None:
        """Drop everything recorded for `replica` (it died or restarted with an empty cache)."""
        for node in list(self._nodes_of(replica)):
            del node.last_used[replica]
            node.ends.discard(replica)
            self._prune(node)
        self._chars.pop(replica, None)
        self._capacity.pop(replica, None)

    # -- internals -------------------------------------------------------------

    def _nodes_of(self, replica: ReplicaKey) -> Iterator[_Node]:
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if replica in node.last_used:
                yield node
                stack.extend(node.children.values())

    def _trim(self, replica: ReplicaKey, capacity: int) -> None:
        """Forget `replica`'s least recently used leaves until it is within 90% of `capacity`
        (the slack keeps trims rare)."""
        target = int(capacity * 0.9)
        order = itertools.count()  # breaks ties between equal times: nodes are not comparable
        leaves = [
            (node.last_used[replica], next(order), node)
            for node in self._nodes_of(replica)
            if not any(replica in child.last_used for child in node.children.values())
        ]
        heapq.heapify(leaves)  # the least recently used first
        while leaves and self._chars.get(replica, 0) > target:
            node = heapq.heappop(leaves)[2]
            del node.last_used[replica]
            node.ends.discard(replica)
            self._chars[replica] -= len(node.label)
            parent = node.parent
            self._prune(node)
            if (
                parent is not None
                and parent is not self._root
                and replica in parent.last_used
                and not any(replica in child.last_used for child in parent.children.values())
            ):
                # The parent became one of the replica's leaves: it takes its turn by its age.
                heapq.heappush(leaves, (parent.last_used[replica], next(order), parent))

    def _prune(self, node: _Node) -> None:
        """Remove `node` and its empty ancestors once no replica holds them."""
        node.prune(lambda n: bool(n.last_used))
