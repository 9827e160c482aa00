"""The radix tree core shared by the prefix cache, the state store's index and the
Ray router's record of what each replica holds.

A tree is made of :class:`RadixNode` objects: each node is one edge, a run of
hashable elements (token ids in a tuple, or the characters of a str) called its
label, and its children are keyed by the first element of their label. A tree
subclasses the node with its own per-node payload; the walk, the split, the
insertion, the pruning and the merge are here, once, and so is the one routine
that compares two runs, :func:`common_prefix_length`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Generic, Protocol, SupportsIndex, TypeVar, overload

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Label", "RadixNode", "common_prefix_length"]


class Label(Protocol):
    """A run of hashable elements that slices and concatenates to its own type: a
    tuple of token ids, a str, a list (never an edge: labels must not change)."""

    def __len__(self) -> int: ...

    @overload
    def __getitem__(self, index: SupportsIndex, /) -> Hashable: ...

    @overload
    def __getitem__(self, index: slice, /) -> Self: ...

    def __add__(self, other: Self, /) -> Self: ...


L = TypeVar("L", bound=Label)

_LINEAR = 16
"""Below this many elements a Python loop finds the first difference faster than slicing."""


def common_prefix_length(a: L, b: L, start: int = 0) -> int:
    """How many leading elements of `a` equal those of `b` from index `start` on.

    Both must be of one type (a tuple never equals a list or a str). Runs are
    compared whole, at C speed, to bracket the first difference; a binary search
    narrows it down to a short run, which a loop finishes.
    """
    n = min(len(a), len(b) - start)
    if n <= 0:
        return 0
    if a[n - 1] == b[start + n - 1]:  # then most likely all agree: a tree walk mostly matches whole edges
        if isinstance(a, str) and isinstance(b, str):
            if b.startswith(a[:n], start):  # copies nothing
                return n
        elif a[:n] == b[start : start + n]:
            return n
    # Growing chunks find the difference at a cost in proportion to its position, not to `n`.
    lo, step = 0, _LINEAR
    while lo + step < n and a[lo : lo + step] == b[start + lo : start + lo + step]:
        lo, step = lo + step, step * 4
    hi = min(lo + step, n)
    while hi - lo > _LINEAR:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid
    while a[lo] == b[start + lo]:
        lo += 1
    return lo


class RadixNode(Generic[L]):
    """One edge: `label` at positions ``[start, end)`` of every key whose path runs
    through it, below `parent` (None at a root, whose label is empty, and at a node
    taken out of its tree). `children` are keyed by the first element of their label.

    Subclasses add their payload; they must be constructible from a label alone,
    and override :meth:`upper_half` to give the upper part of a split edge its share.
    """

    __slots__ = ("label", "start", "parent", "children")

    def __init__(self, label: L) -> None:
        self.label = label
        self.start = 0
        self.parent: Self | None = None
        self.children: dict[Hashable, Self] = {}

    @property
    def end(self) -> int:
        """The position after this edge's last element (its depth below the root)."""
        return self.start + len(self.label)

    # -- reading --------------------------------------------------------------------------------

    def descend(self, key: L) -> Iterator[tuple[Self, int]]:
        """The nodes below this one along `key` (from its position `end` on), each with
        the length of `key` matched once in it: the node's `end` when its whole edge
        matches, less when `key` leaves or ends inside the edge (that node comes last)."""
        node, pos = self, self.end
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                return
            matched = common_prefix_length(child.label, key, pos)
            pos += matched
            yield child, pos
            if matched < len(child.label):
                return
            node = child

    def longest_match(self, key: L) -> tuple[int, Self]:
        """The length of `key`'s longest prefix that is a path from this node, and the
        deepest node that path reaches (possibly partly; this node when none)."""
        length, deepest = self.end, self
        for node, matched in self.descend(key):
            length, deepest = matched, node
        return length, deepest

    # -- writing --------------------------------------------------------------------------------

    def add_child(self, child: Self) -> Self:
        """Hang `child`, a node out of any tree, below this one; returns it."""
        child.parent, child.start = self, self.end
        self.children[child.label[0]] = child
        return child

    def detach(self) -> None:
        """Take this node, with its subtree, out of its parent's children."""
        assert self.parent is not None
        del self.parent.children[self.label[0]]
        self.parent = None

    def upper_half(self, label: L) -> Self:
        """A new node, out of any tree, for the first part of this edge when it is
        split (`label`), with its share of the payload; the base class has none."""
        return type(self)(label)

    def split(self, k: int) -> Self:
        """Cut this edge after `k` elements: the upper part takes this node's place and
        this node, keeping the rest of its label and all its payload, hangs below it.
        Returns the upper part."""
        parent = self.parent
        assert parent is not None and 0 < k < len(self.label)
        upper = self.upper_half(self.label[:k])
        upper.parent, upper.start = parent, self.start
        parent.children[self.label[0]] = upper
        self.label, self.start, self.parent = self.label[k:], self.start + k, upper
        upper.children[self.label[0]] = self
        return upper

    def ending_at(self, depth: int) -> Self:
        """The node on this one's path that ends exactly at `depth` (within this edge):
        this node, or its upper part after a split."""
        return self if depth == self.end else self.split(depth - self.start)

    def insert(self, key: L) -> Self:
        """Make `key` a path from this node (a root): split the edge it leaves or ends
        inside, and hang a new node (made from the rest's label) where it leaves the
        tree. Returns the node `key` ends at (this node when `key` is empty)."""
        length, deepest = self.longest_match(key)
        node = deepest.ending_at(length)
        return node if length == len(key) else node.add_child(type(self)(key[length:]))

    def prune(self, needed: Callable[[Self], bool]) -> Self:
        """Take this node and then each ancestor out of the tree while it is childless,
        not a root and not `needed`; returns the deepest node left."""
        node = self
        while node.parent is not None and not node.children and not needed(node):
            parent = node.parent
            node.detach()
            node = parent
        return node

    def merge_into_child(self) -> Self:
        """Fold this node (not a root, one child) into its child, which takes its place
        with both labels; this node's payload is dropped. Returns the child."""
        parent = self.parent
        assert parent is not None
        [child] = self.children.values()
        child.label, child.start, child.parent = self.label + child.label, self.start, parent
        parent.children[child.label[0]] = child
        self.parent, self.children = None, {}
        return child

    def subtree(self) -> Iterator[Self]:
        """This node and every node below it, parents first."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
