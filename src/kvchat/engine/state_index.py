"""`StateIndex`: a radix tree per namespace (on :mod:`kvchat.engine.radix`) over the
tokens of stored KV states.

`StateStore` asks it two things on the engine thread, at every admission and at
every eviction: which stored entry shares the longest prefix with a prompt (the
best-ranked one among those), and, when an entry is stored, which entries extend
it or are a prefix of it. Walking the tree along the query answers both in
O(len(query)) token comparisons plus one step per branching node on the way,
whatever the number of entries that do not share the query's prefix.

Each node keeps the best-ranked entry of its subtree (`best`), so the answer at
the node where the walk stops needs no look at the entries below it. A rank only
rises by :meth:`StateIndex.touch`; an entry that falls in rank (moved to another
tier) is removed and added again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from kvchat.engine.radix import RadixNode

if TYPE_CHECKING:
    from typing_extensions import Self


class IndexedEntry(Protocol):
    """What the index needs of an entry: a unique key, a namespace and its tokens."""

    @property
    def key(self) -> str: ...

    @property
    def namespace(self) -> str | None: ...

    @property
    def tokens(self) -> tuple[int, ...]: ...


E = TypeVar("E", bound=IndexedEntry)


class _Node(RadixNode[tuple[int, ...]], Generic[E]):
    """An edge of tokens; `entries` end exactly here; `best` is the best-ranked entry
    in this subtree (None only in an empty root)."""

    __slots__ = ("entries", "best")

    def __init__(self, tokens: tuple[int, ...]) -> None:
        super().__init__(tokens)
        self.entries: dict[str, E] = {}
        self.best: E | None = None

    def upper_half(self, label: tuple[int, ...]) -> Self:
        """The upper part of a split leads the same subtree."""
        upper = type(self)(label)
        upper.best = self.best
        return upper


class _Walk(Generic[E]):
    """Where a walk along a query stopped: `length` tokens matched, the answer is
    `node.best`; `prefixes` are the entries ending strictly before the end of the
    query; `covered` is True when the whole query was matched."""

    __slots__ = ("length", "node", "prefixes", "covered")

    def __init__(self, length: int, node: _Node[E], prefixes: list[E], covered: bool) -> None:
        self.length = length
        self.node = node
        self.prefixes = prefixes
        self.covered = covered


class StateIndex(Generic[E]):
    """Entries by namespace and token prefix, ranked by `rank` (higher wins).

    Not thread-safe (the store's owner, the engine's worker thread, calls it).
    `steps` is the number of tree nodes the last query visited, for tests: it
    does not grow with entries that share no prefix with the query.
    """

    def __init__(self, rank: Callable[[E], tuple[int, ...]]) -> None:
        self._rank = rank
        self._roots: dict[str | None, _Node[E]] = {}
        self._nodes: dict[str, _Node[E]] = {}  # entry key -> the node it ends at
        self.steps = 0

    def __len__(self) -> int:
        return len(self._nodes)

    def longest_match(self, tokens: Sequence[int], namespace: str | None) -> tuple[int, E] | None:
        """The best-ranked entry among those sharing the longest prefix with `tokens`,
        and that length; None if no entry of `namespace` shares a token."""
        walk = self._walk(tuple(tokens), namespace)
        if walk is None or walk.length == 0 or walk.node.best is None:
            return None
        return walk.length, walk.node.best

    def matches(self, tokens: Sequence[int], namespace: str | None) -> list[tuple[int, E]]:
        """The entries whose tokens are a prefix of `tokens` (with their lengths), and the
        best-ranked one sharing the longest prefix with it (with that length), longest first."""
        walk = self._walk(tuple(tokens), namespace)
        if walk is None:
            return []
        found = [(len(e.tokens), e) for e in reversed(walk.prefixes)]
        if walk.length and walk.node.best is not None:
            found.insert(0, (walk.length, walk.node.best))
        return found

    def extension_and_prefixes(self, tokens: Sequence[int], namespace: str | None) -> tuple[E | None, list[E]]:
        """The best-ranked entry whose tokens start with (or equal) `tokens`, if any,
        and the entries whose tokens are a strict prefix of `tokens`."""
        walk = self._walk(tuple(tokens), namespace)
        if walk is None:
            return None, []
        return (walk.node.best if walk.covered else None), walk.prefixes

    def add(self, entry: E) -> None:
        """Index `entry` (its key must not be indexed)."""
        root = self._roots.get(entry.namespace)
        if root is None:
            root = self._roots[entry.namespace] = _Node(())
        node = root.insert(entry.tokens)
        node.entries[entry.key] = entry
        self._nodes[entry.key] = node
        self._raise(node, entry)

    def remove(self, entry: E) -> None:
        """Unindex `entry` (no-op if it is not indexed)."""
        node = self._nodes.pop(entry.key, None)
        if node is None:
            return
        del node.entries[entry.key]
        kept = node.prune(lambda n: bool(n.entries))
        walk: _Node[E] | None = kept
        if kept.parent is not None and not kept.entries and len(kept.children) == 1:
            walk = kept.merge_into_child().parent  # its child (which never held `entry`) takes its place
        while walk is not None and walk.best is entry:  # the subtrees that `entry` led
            walk.best = self._best_of(walk)
            walk = walk.parent
        root = self._roots[entry.namespace]
        if not root.children:
            del self._roots[entry.namespace]

    def touch(self, entry: E) -> None:
        """`entry`'s rank rose: let it lead the subtrees where it now ranks first."""
        node = self._nodes.get(entry.key)
        if node is not None:
            self._raise(node, entry)

    def _walk(self, query: tuple[int, ...], namespace: str | None) -> _Walk[E] | None:
        root = self._roots.get(namespace)
        self.steps = 0
        if root is None:
            return None
        node, length = root, 0
        prefixes: list[E] = []
        for node, length in root.descend(query):
            self.steps += 1
            if length == node.end and length < len(query):
                prefixes.extend(node.entries.values())
        return _Walk(length, node, prefixes, length == len(query))

    def _raise(self, node: _Node[E] | None, entry: E) -> None:
        rank = self._rank(entry)
        while node is not None and (node.best is None or node.best is entry or rank > self._rank(node.best)):
            node.best = entry
            node = node.parent

    def _best_of(self, node: _Node[E]) -> E | None:
        candidates = [*node.entries.values(), *(c.best for c in node.children.values() if c.best is not None)]
        return max(candidates, key=self._rank, default=None)
