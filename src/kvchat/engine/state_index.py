"""`StateIndex`: a radix tree per namespace over the tokens of stored KV states.

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
from typing import Generic, Protocol, TypeVar


class IndexedEntry(Protocol):
    """What the index needs of an entry: a unique key, a namespace and its tokens."""

    @property
    def key(self) -> str: ...

    @property
    def namespace(self) -> str | None: ...

    @property
    def tokens(self) -> tuple[int, ...]: ...


E = TypeVar("E", bound=IndexedEntry)


class _Node(Generic[E]):
    """An edge of `tokens` below `parent`; `entries` end exactly here; `best` is the
    best-ranked entry in this subtree (None only in an empty root)."""

    __slots__ = ("tokens", "parent", "children", "entries", "best")

    def __init__(self, tokens: tuple[int, ...], parent: _Node[E] | None) -> None:
        self.tokens = tokens
        self.parent = parent
        self.children: dict[int, _Node[E]] = {}
        self.entries: dict[str, E] = {}
        self.best: E | None = None


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
            root = self._roots[entry.namespace] = _Node((), None)
        node, tokens, i = root, entry.tokens, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf: _Node[E] = _Node(tokens[i:], node)
                node.children[tokens[i]] = leaf
                node = leaf
                break
            common = _common_prefix_len(child.tokens, tokens[i : i + len(child.tokens)])
            if common < len(child.tokens):
                child = self._split(child, common)
            node, i = child, i + common
        node.entries[entry.key] = entry
        self._nodes[entry.key] = node
        self._raise(node, entry)

    def remove(self, entry: E) -> None:
        """Unindex `entry` (no-op if it is not indexed)."""
        node = self._nodes.pop(entry.key, None)
        if node is None:
            return
        del node.entries[entry.key]
        while node.parent is not None and not node.entries and not node.children:  # prune the empty branch
            parent = node.parent
            del parent.children[node.tokens[0]]
            node = parent
        if node.parent is not None and not node.entries and len(node.children) == 1:
            self._merge(node)  # its child (which never held `entry`) takes its place
            node = node.parent
        walk: _Node[E] | None = node
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

    # -- tree -------------------------------------------------------------------------------------

    def _walk(self, query: tuple[int, ...], namespace: str | None) -> _Walk[E] | None:
        root = self._roots.get(namespace)
        self.steps = 0
        if root is None:
            return None
        node, i = root, 0
        prefixes: list[E] = []
        while i < len(query):
            child = node.children.get(query[i])
            self.steps += 1
            if child is None:
                break
            common = _common_prefix_len(child.tokens, query[i : i + len(child.tokens)])
            i += common
            node = child
            if common < len(child.tokens):  # stopped inside this edge
                return _Walk(i, node, prefixes, i == len(query))
            if i < len(query):
                prefixes.extend(node.entries.values())
        return _Walk(i, node, prefixes, i == len(query))

    def _split(self, child: _Node[E], at: int) -> _Node[E]:
        """Cut `child`'s edge after `at` tokens; the new upper node is returned."""
        parent = child.parent
        assert parent is not None
        upper: _Node[E] = _Node(child.tokens[:at], parent)
        parent.children[child.tokens[0]] = upper
        child.tokens = child.tokens[at:]
        child.parent = upper
        upper.children[child.tokens[0]] = child
        upper.best = child.best
        return upper

    def _merge(self, node: _Node[E]) -> None:
        """Fold a node without entries into its only child."""
        parent = node.parent
        assert parent is not None
        [child] = node.children.values()
        child.tokens = node.tokens + child.tokens
        child.parent = parent
        parent.children[child.tokens[0]] = child

    def _raise(self, node: _Node[E] | None, entry: E) -> None:
        rank = self._rank(entry)
        while node is not None and (node.best is None or node.best is entry or rank > self._rank(node.best)):
            node.best = entry
            node = node.parent

    def _best_of(self, node: _Node[E]) -> E | None:
        candidates = [*node.entries.values(), *(c.best for c in node.children.values() if c.best is not None)]
        return max(candidates, key=self._rank, default=None)


def _common_prefix_len(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix, by slice comparisons (C speed) in a binary search."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
