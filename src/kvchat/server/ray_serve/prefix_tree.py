"""`ReplicaPrefixTree`: an approximate record of the prompts each replica holds.

One radix tree over routing texts (see :mod:`kvchat.server.ray_serve.routing_text`),
each node tagged with the replicas that were sent a text running through it and
when. A replica that holds a node holds all its ancestors, so one walk down the
tree gives every replica's longest match. Each replica's share of the tree is
bounded by its cache capacity (in characters); past it, that replica's least
recently used leaves are forgotten, as its engine evicts least recently used
prefixes. No Ray here: the router and the simulation share it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

__all__ = ["ReplicaPrefixTree"]

ReplicaKey = Hashable


@dataclass(eq=False)
class _Node:
    label: str
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)
    last_used: dict[ReplicaKey, float] = field(default_factory=dict)
    """The replicas holding this node, with the logical time they last used it."""
    ends: set[ReplicaKey] = field(default_factory=set)
    """The replicas that were sent a text ending exactly here."""


class ReplicaPrefixTree:
    """Which replica was sent which text, as a radix tree with per-replica LRU bounds."""

    def __init__(self) -> None:
        self._root = _Node("", None)
        self._chars: dict[ReplicaKey, int] = {}
        self._capacity: dict[ReplicaKey, int] = {}
        self._clock = 0.0

    # -- reading ---------------------------------------------------------------

    def match(self, text: str) -> dict[ReplicaKey, int]:
        """For every replica whose record shares a prefix with `text`, that prefix's length."""
        matched: dict[ReplicaKey, int] = {}
        node, pos = self._root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            common = _common_prefix(child.label, text, pos)
            for replica in child.last_used:
                matched[replica] = pos + common
            pos += common
            if common < len(child.label):
                break
            node = child
        return matched

    def match_whole(self, text: str) -> dict[ReplicaKey, int]:
        """For every replica that was sent a text which is a prefix of `text` (a
        conversation's earlier turn), the longest such text's length."""
        whole: dict[ReplicaKey, int] = {}
        node, pos = self._root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None or not text.startswith(child.label, pos):
                break
            pos += len(child.label)
            for replica in child.ends:
                whole[replica] = pos
            node = child
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
        now = self._clock
        node, pos = self._root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                child = _Node(text[pos:], node)
                node.children[text[pos]] = child
            else:
                common = _common_prefix(child.label, text, pos)
                if common < len(child.label):
                    child = self._split(child, common)
            if replica not in child.last_used:
                self._chars[replica] = self._chars.get(replica, 0) + len(child.label)
            child.last_used[replica] = now
            pos += len(child.label)
            node = child
        if node is not self._root:
            node.ends.add(replica)
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

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node`'s label after `at` characters; return the new upper part."""
        assert node.parent is not None
        upper = _Node(node.label[:at], node.parent, last_used=dict(node.last_used))
        node.parent.children[upper.label[0]] = upper
        node.label = node.label[at:]
        node.parent = upper
        upper.children[node.label[0]] = node
        return upper  # each holder now holds both parts: its character count is unchanged

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
        while node is not self._root and not node.last_used and not node.children:
            parent = node.parent
            assert parent is not None
            del parent.children[node.label[0]]
            node = parent


def _common_prefix(label: str, text: str, start: int) -> int:
    if text.startswith(label, start):
        return len(label)
    limit = min(len(label), len(text) - start)
    index = 0
    while index < limit and label[index] == text[start + index]:
        index += 1
    return index
