"""`PrefixCache`: a radix tree over token ids that records which parked KV
sequence holds the cells of each token run.

Pure bookkeeping, after SGLang's radix cache: the engine asks what is resident
(:meth:`PrefixCache.match`), parks finished sequences (:meth:`PrefixCache.insert`)
and asks what to free (:meth:`PrefixCache.evict_lru`); the tree answers with the
KV operations to perform and never touches llama.cpp itself. The tree is built on
:mod:`kvchat.engine.radix`; its unlocked leaves wait in an
:class:`~kvchat.engine.eviction_queue.EvictionQueue`, least recently used first.

A parked sequence holds cells for exactly the positions ``[0, n)`` of its tokens,
and ``seq_copy`` shares cells between sequences. So every parked sequence owns
exactly one leaf and holds every token on the path from the root to it, and
every node's ``holder`` is the holder of a leaf below it: matching ``m`` tokens
that end inside node ``N`` means "share positions ``[0, m)`` from ``N.holder``".
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvchat.engine.eviction_queue import EvictionQueue
from kvchat.engine.radix import RadixNode

if TYPE_CHECKING:
    from typing_extensions import Self


class IntegrityError(Exception):
    """An invariant of the tree is broken (raised by `PrefixCache.check_integrity`)."""


class Node(RadixNode[tuple[int, ...]]):
    """One edge of the tree: `tokens` at positions ``[start, end)``, below `parent`.

    `children` are keyed by the first token of their edge. `holder` is the seq id
    of a leaf in this node's subtree (None only at a root). `lock_ref` counts the
    locks on this node or below it; `last_used` is the clock at the last match or
    insert through it.
    """

    __slots__ = ("holder", "lock_ref", "last_used", "stamp")

    def __init__(self, tokens: tuple[int, ...], holder: int | None = None) -> None:
        super().__init__(tokens)
        self.holder = holder
        self.lock_ref = 0
        self.last_used = 0.0
        self.stamp = 0  # order of the last touch: breaks ties between equal clock readings

    @property
    def tokens(self) -> tuple[int, ...]:
        """This edge's token ids (its label)."""
        return self.label

    def path(self) -> tuple[int, ...]:
        """Every token from the root to the end of this node's edge."""
        parts: list[tuple[int, ...]] = []
        node: Node | None = self
        while node is not None:
            parts.append(node.tokens)
            node = node.parent
        return tuple(itertools.chain.from_iterable(reversed(parts)))

    def upper_half(self, label: tuple[int, ...]) -> Self:
        """The upper part of a split inherits holder, lock count and use time: every
        lock counted on this node walks through it from now on, and the counters of
        the cache do not change."""
        upper = type(self)(label, self.holder)
        upper.lock_ref, upper.last_used, upper.stamp = self.lock_ref, self.last_used, self.stamp
        return upper

    def __repr__(self) -> str:
        return f"Node(start={self.start}, tokens={self.tokens}, holder={self.holder}, lock_ref={self.lock_ref})"


@dataclass(frozen=True)
class MatchResult:
    """The longest resident prefix of a token list.

    `holder` holds positions ``[0, length)``; `node` is the deepest node the match
    reached (possibly only partly: ``node.start < length <= node.end``), the one
    to :meth:`PrefixCache.lock`. Both are None when ``length == 0``.
    """

    length: int
    holder: int | None
    node: Node | None


@dataclass(frozen=True)
class Eviction:
    """One leaf removed from the tree, and what the engine does about it.

    The engine calls ``seq_remove(seq_id, keep, -1)``; `keep` is 0 when the
    sequence is freed entirely, which is exactly when `released` is True (the id
    can be recycled). `tokens` is the path ``[0, end)`` `seq_id` held before the
    trim, in `namespace` (for spilling to a lower tier); `freed_tokens` left the tree.
    """

    seq_id: int
    keep: int
    tokens: tuple[int, ...]
    freed_tokens: int
    released: bool
    namespace: str | None = None


@dataclass(frozen=True)
class InsertResult:
    """What :meth:`PrefixCache.insert` did, as KV operations for the engine.

    - `added_tokens`: new tokens stored (0: the whole list was already present);
    - `stored`: `seq_id` is now parked as a leaf's holder; False: the engine frees it;
    - `shared_from`: ``(holder, start, end)`` runs the tree already had that
      `seq_id` evaluated itself: the engine re-shares them
      (``seq_remove(seq_id, start, end)``, ``seq_copy(holder, seq_id, start, end)``);
    - `redundant`: other parked ids whose leaf the new tokens extend: the engine
      frees them entirely, *after* applying `shared_from` (which may name them).
    """

    added_tokens: int
    stored: bool
    redundant: tuple[int, ...] = ()
    shared_from: tuple[tuple[int, int, int], ...] = ()


class PrefixCache:
    """Radix tree of parked KV sequences, one tree per namespace.

    Requests in different namespaces never share. Eviction picks the least
    recently used unlocked leaf over all namespaces, from a queue of those leaves
    kept as the tree changes. Not thread-safe: the engine's worker thread owns it.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._roots: dict[str | None, Node] = {}
        self._namespace_of: dict[Node, str | None] = {}  # root -> its namespace
        self._leaf_of: dict[int, Node] = {}
        self._evictable: EvictionQueue[Node] = EvictionQueue()  # the unlocked leaves
        self._total = 0
        self._protected = 0
        self._stamps = itertools.count(1)

    def match(self, tokens: Sequence[int], *, namespace: str | None = None) -> MatchResult:
        """The longest resident prefix of `tokens`; marks its path as just used."""
        result = self.peek(tokens, namespace=namespace)
        self._touch(result.node)
        return result

    def peek(self, tokens: Sequence[int], *, namespace: str | None = None) -> MatchResult:
        """Like :meth:`match`, but leaves the last-use times alone."""
        length, node = self._walk(tuple(tokens), namespace)
        return MatchResult(length, node.holder, node) if node is not None else MatchResult(0, None, None)

    def holders(self) -> set[int]:
        """The seq ids currently parked in the tree."""
        return set(self._leaf_of)

    def held_tokens(self) -> dict[int, tuple[int, ...]]:
        """Each parked sequence and the tokens it holds (its leaf's path)."""
        return {seq_id: leaf.path() for seq_id, leaf in self._leaf_of.items()}

    @property
    def total_tokens(self) -> int:
        """Tokens stored in the tree (each position of each edge once)."""
        return self._total

    @property
    def protected_tokens(self) -> int:
        """Tokens in locked nodes (lock_ref > 0): not evictable."""
        return self._protected

    @property
    def evictable_tokens(self) -> int:
        """Tokens in unlocked nodes: ``total_tokens - protected_tokens``."""
        return self._total - self._protected

    def lock(self, node: Node) -> None:
        """Protect `node` and its ancestors from eviction (one more reference).

        Raises ValueError if `node` is no longer in the tree.
        """
        path, attached = self._path_to_root(node)
        if not attached:
            raise ValueError(f"{node!r} is no longer in the prefix cache")
        for n in path:
            n.lock_ref += 1
            if n.lock_ref == 1:
                self._protected += len(n.tokens)
        self._evictable.discard(node)

    def unlock(self, node: Node) -> None:
        """Drop one reference taken by :meth:`lock`; raises ValueError if there is none.

        A node dropped by :meth:`clear` or :meth:`remove_namespace` while locked
        can still be unlocked (it no longer counts anywhere).
        """
        path, attached = self._path_to_root(node)
        if node.lock_ref <= 0:
            raise ValueError(f"unlock of a node that is not locked: {node!r}")
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0 and attached:
                self._protected -= len(n.tokens)
        if attached:
            self._queue_if_evictable(node)

    def insert(
        self, tokens: Sequence[int], seq_id: int, *, shared_prefix: int = 0, namespace: str | None = None
    ) -> InsertResult:
        """Park `seq_id`, which holds exactly `tokens` (positions ``[0, len)``).

        Its first `shared_prefix` positions were shared from the tree at admission.
        Raises ValueError if `seq_id` is already parked or `shared_prefix` is out
        of range.
        """
        tokens = tuple(tokens)
        if seq_id in self._leaf_of:
            raise ValueError(f"seq {seq_id} is already parked in the prefix cache")
        if not 0 <= shared_prefix <= len(tokens):
            raise ValueError(f"shared_prefix {shared_prefix} is outside [0, {len(tokens)}]")
        length, deepest = self._walk(tokens, namespace)
        if length == len(tokens):
            self._touch(deepest)
            return InsertResult(0, False)
        parent = (deepest or self._root(namespace)).ending_at(length)
        shared_from: tuple[tuple[int, int, int], ...] = ()
        if length > shared_prefix and parent.holder is not None:  # evaluated again what the tree had
            shared_from = ((parent.holder, shared_prefix, length),)
        redundant: tuple[int, ...] = ()
        if parent.parent is not None and not parent.children:  # extends the leaf of another sequence
            old = parent.holder
            assert old is not None
            redundant = (old,)
            del self._leaf_of[old]
            self._evictable.discard(parent)
            self._reassign(parent, old, seq_id)
        leaf = parent.add_child(Node(tokens[length:], seq_id))
        self._leaf_of[seq_id] = leaf
        self._total += len(leaf.tokens)
        self._touch(leaf)
        self._queue_if_evictable(leaf)
        return InsertResult(len(leaf.tokens), True, redundant, shared_from)

    def evict_lru(self) -> Eviction | None:
        """Remove the least recently used unlocked leaf; None if every leaf is locked.

        If the leaf's parent is left childless (and is not a root) it becomes the
        holder's new leaf (``keep = parent.end``); otherwise the holder is released.
        """
        leaf = self.lru_leaf()
        return None if leaf is None else self._evict_leaf(leaf)

    def lru_leaf(self, min_depth: int = 0) -> Node | None:
        """The least recently used unlocked leaf ending at least `min_depth` tokens below
        its root; None if there is none."""
        return self._evictable.oldest(min_depth)

    def own_tokens(self, leaf: Node) -> int:
        """The tokens only `leaf`'s sequence holds (:func:`_own_nodes`). A spill of the
        sequence copies its whole state (`leaf.end` tokens) but frees only these."""
        return sum(len(node.tokens) for node in _own_nodes(leaf))

    def evict_leaf(self, leaf: Node) -> Eviction:
        """Remove `leaf` (an unlocked leaf, e.g. from :meth:`lru_leaf`) as :meth:`evict_lru` would."""
        if leaf.holder is None or self._leaf_of.get(leaf.holder) is not leaf or leaf.lock_ref:
            raise ValueError(f"{leaf!r} is not an unlocked leaf of this tree")
        return self._evict_leaf(leaf)

    def evict_sequence(self, seq_id: int) -> list[Eviction]:
        """Remove every node only `seq_id` holds, leaf by leaf; the last eviction releases it.

        Returns [] if `seq_id` is not parked. Raises ValueError (changing nothing)
        if one of those nodes is locked.
        """
        leaf = self._leaf_of.get(seq_id)
        if leaf is None:
            return []
        doomed = _own_nodes(leaf)
        if any(n.lock_ref for n in doomed):
            raise ValueError(f"seq {seq_id} holds locked tokens")
        evictions = [self._evict_leaf(leaf)]
        while not evictions[-1].released:
            evictions.append(self._evict_leaf(self._leaf_of[seq_id]))
        return evictions

    def remove_namespace(self, namespace: str | None) -> list[int]:
        """Drop a namespace's tree, locked nodes included; returns the released seq ids (sorted).

        Running requests keep the cells they share; their locks go stale (see :meth:`unlock`).
        """
        root = self._roots.pop(namespace, None)
        if root is None:
            return []
        del self._namespace_of[root]
        released: list[int] = []
        for node in root.subtree():
            self._total -= len(node.tokens)
            self._protected -= len(node.tokens) if node.lock_ref > 0 else 0
            self._evictable.discard(node)
            if node.holder is not None and not node.children:
                released.append(node.holder)
                del self._leaf_of[node.holder]
        return sorted(released)

    def clear(self) -> list[int]:
        """Drop everything, locked nodes included; returns the released seq ids (sorted)."""
        return sorted(seq for namespace in list(self._roots) for seq in self.remove_namespace(namespace))

    def check_integrity(self) -> None:
        """Recount everything from scratch; raise IntegrityError on any broken invariant."""
        total = protected = 0
        leaves: dict[int, Node] = {}
        _require(self._namespace_of == {root: ns for ns, root in self._roots.items()}, "roots and namespaces disagree")
        for namespace, root in self._roots.items():
            malformed = root.parent is not None or root.tokens or root.start != 0 or root.holder is not None
            _require(not malformed, f"namespace {namespace!r}: malformed root {root!r}")
            for node in root.subtree():
                total += len(node.tokens)
                protected += len(node.tokens) if node.lock_ref > 0 else 0
                _check_node(node)
                if node.parent is not None and not node.children:
                    if node.holder is None:
                        raise IntegrityError(f"leaf without a holder: {node!r}")
                    _require(node.holder not in leaves, f"two leaves held by seq {node.holder}")
                    leaves[node.holder] = node
        _require(leaves.keys() == self._leaf_of.keys(), f"holders() {self.holders()} != leaf holders {set(leaves)}")
        for holder, leaf in leaves.items():
            _require(self._leaf_of[holder] is leaf, f"seq {holder}: recorded leaf is not its leaf")
        for root in self._roots.values():
            for node in root.subtree():
                if node.parent is not None:
                    below = node.holder is not None and _is_below(leaves.get(node.holder), node)
                    _require(below, f"holder is not the holder of a leaf below: {node!r}")
        _require(total == self._total, f"total_tokens {self._total} != recount {total}")
        _require(protected == self._protected, f"protected_tokens {self._protected} != recount {protected}")
        problem = self._evictable.inconsistency({leaf for leaf in leaves.values() if leaf.lock_ref == 0})
        _require(problem is None, f"eviction queue: {problem}")

    def _root(self, namespace: str | None) -> Node:
        """`namespace`'s root, made if it has none."""
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = Node(())
            self._namespace_of[root] = namespace
        return root

    def _walk(self, tokens: tuple[int, ...], namespace: str | None) -> tuple[int, Node | None]:
        """Tokens matched and the deepest node reached (None if no token matched)."""
        root = self._roots.get(namespace)
        if root is None:
            return 0, None
        length, deepest = root.longest_match(tokens)
        return length, (deepest if length else None)

    def _touch(self, node: Node | None) -> None:
        """Mark `node` and its ancestors as just used (nothing if `node` is None)."""
        if node is None:
            return
        now, stamp = self._clock(), next(self._stamps)
        n: Node | None = node
        while n is not None:
            n.last_used, n.stamp = now, stamp
            n = n.parent
        if node in self._evictable:  # only `node` can be a leaf: its key changed
            self._evictable.push(node)

    def _queue_if_evictable(self, node: Node) -> None:
        """Queue `node` for eviction if it is an unlocked leaf."""
        if node.parent is not None and not node.children and node.lock_ref == 0:
            self._evictable.push(node)

    def _reassign(self, node: Node | None, old: int, new: int | None) -> None:
        """Replace holder `old` on `node` and its ancestors by `new` (None: by a child's holder)."""
        while node is not None:
            if node.holder == old:
                node.holder = new if new is not None else next(iter(node.children.values())).holder
            node = node.parent

    def _evict_leaf(self, leaf: Node) -> Eviction:
        holder, parent, tokens = leaf.holder, leaf.parent, leaf.path()
        assert holder is not None and parent is not None and leaf.lock_ref == 0
        path, _ = self._path_to_root(leaf)
        namespace = self._namespace_of[path[-1]]
        leaf.detach()
        self._evictable.discard(leaf)
        self._total -= len(leaf.tokens)
        if parent.parent is not None and not parent.children:  # the parent is the holder's new leaf
            self._leaf_of[holder] = parent
            self._queue_if_evictable(parent)
            return Eviction(holder, parent.end, tokens, len(leaf.tokens), False, namespace)
        del self._leaf_of[holder]
        self._reassign(parent, holder, None)
        if parent.parent is None and not parent.children and not parent.lock_ref:
            del self._roots[namespace], self._namespace_of[parent]
        return Eviction(holder, 0, tokens, len(leaf.tokens), True, namespace)

    def _path_to_root(self, node: Node) -> tuple[list[Node], bool]:
        """`node` and its ancestors, and whether they are still in the tree."""
        path: list[Node] = []
        n: Node | None = node
        while n is not None:
            path.append(n)
            n = n.parent
        return path, path[-1] in self._namespace_of


def _own_nodes(leaf: Node) -> list[Node]:
    """`leaf` and its ancestors up to the first that other entries branch from (or the
    root), bottom up: the nodes only `leaf`'s sequence holds."""
    nodes, node = [leaf], leaf.parent
    while node is not None and node.parent is not None and len(node.children) == 1:
        nodes.append(node)
        node = node.parent
    return nodes


def _is_below(leaf: Node | None, node: Node) -> bool:
    while leaf is not None and leaf is not node:
        leaf = leaf.parent
    return leaf is node


def _check_node(node: Node) -> None:
    _require(node.lock_ref >= 0, f"negative lock_ref: {node!r}")
    for key, child in node.children.items():
        _require(bool(child.tokens), f"empty edge below {node!r}")
        _require(key == child.tokens[0], f"child key {key} != first token of {child!r}")
        _require(child.parent is node, f"{child!r} does not point back to its parent {node!r}")
        _require(child.start == node.end, f"{child!r} starts at {child.start}, parent ends at {node.end}")
        _require(node.lock_ref >= child.lock_ref, f"{node!r} has a lower lock_ref than its child {child!r}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise IntegrityError(message)
