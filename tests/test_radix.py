"""The radix core (`kvchat.engine.radix`): `common_prefix_length` and `RadixNode`'s walk,
split, insert, prune and merge, against naive models (no model needed)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvchat.engine.radix import RadixNode, common_prefix_length


def naive_common(a: Sequence[object], b: Sequence[object], start: int = 0) -> int:
    rest = b[start:]
    return next((i for i, (x, y) in enumerate(zip(a, rest, strict=False)) if x != y), min(len(a), len(rest)))


# -- common_prefix_length -------------------------------------------------------------------------


@given(st.lists(st.integers(0, 2), max_size=80), st.lists(st.integers(0, 2), max_size=80), st.integers(0, 90))
def test_common_prefix_length_of_tuples_lists_and_str(a: list[int], b: list[int], start: int) -> None:
    expected = naive_common(a, b, start)
    assert common_prefix_length(tuple(a), tuple(b), start) == expected
    assert common_prefix_length(a, b, start) == expected
    assert common_prefix_length("".join(map(str, a)), "".join(map(str, b)), start) == expected
    assert common_prefix_length(tuple(a), (9,) * start + tuple(a), start) == len(a)


@pytest.mark.parametrize("kind", [tuple, "".join])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 1000, 5000])
def test_common_prefix_length_finds_every_difference_in_long_runs(kind: Callable[[list[str]], object], n: int) -> None:
    """A difference at each position class, alone (the last elements agree) or followed by
    a different tail: every branch of the chunked search and of the binary search."""
    rng = random.Random(n)
    a = [rng.choice("abcd") for _ in range(n)]
    positions = sorted({0, 1, n // 2, n - 1, *(rng.randrange(n) for _ in range(20))} - {n})
    for d in positions:
        for b in ([*a[:d], "z", *a[d + 1 :]], a[:d] + ["z"] * (n - d)):
            prefix = ["q"] * 3
            assert common_prefix_length(kind(a), kind(prefix + b), 3) == d, (d, b == a)
            assert common_prefix_length(kind(prefix + b), kind(prefix + a)) == 3 + d
    assert common_prefix_length(kind(a), kind(a)) == n
    assert common_prefix_length(kind(a), kind([*a, "x"])) == n == common_prefix_length(kind([*a, "x"]), kind(a))


def test_common_prefix_length_at_or_past_the_end() -> None:
    assert common_prefix_length((1, 2), (1, 2), 2) == 0
    assert common_prefix_length((1, 2), (1, 2), 5) == 0
    assert common_prefix_length((), (1,)) == 0 and common_prefix_length("", "") == 0


# -- RadixNode: examples --------------------------------------------------------------------------


class Counted(RadixNode[tuple[int, ...]]):
    """A node with a payload: how many stored keys end here, and a tag the split copies."""

    __slots__ = ("count", "tag")

    def __init__(self, label: tuple[int, ...]) -> None:
        super().__init__(label)
        self.count = 0
        self.tag = ""

    def upper_half(self, label: tuple[int, ...]) -> Counted:
        upper = Counted(label)
        upper.tag = self.tag + "^"
        return upper


def path_of(node: RadixNode[tuple[int, ...]]) -> tuple[int, ...]:
    labels = []
    n: RadixNode[tuple[int, ...]] | None = node
    while n is not None:
        labels.append(n.label)
        n = n.parent
    return tuple(x for label in reversed(labels) for x in label)


def test_insert_splits_and_walks() -> None:
    root = Counted(())
    abcd = root.insert((1, 2, 3, 4))
    assert (abcd.label, abcd.start, abcd.end, abcd.parent) == ((1, 2, 3, 4), 0, 4, root)
    abcd.tag = "leaf"
    ab = root.insert((1, 2))  # ends inside the edge: split
    assert ab.label == (1, 2) and ab.tag == "leaf^" and abcd.parent is ab and (abcd.label, abcd.start) == ((3, 4), 2)
    abx = root.insert((1, 2, 9, 9))  # leaves at a node boundary: a new leaf
    assert abx.parent is ab and abx.label == (9, 9) and set(ab.children) == {3, 9}
    assert root.insert((1, 2)) is ab and root.insert(()) is root
    assert [(n.label, length) for n, length in root.descend((1, 2, 3, 7))] == [((1, 2), 2), ((3, 4), 3)]
    assert root.longest_match((1, 2, 9, 9, 9)) == (4, abx)
    assert root.longest_match((5,)) == (0, root) and root.longest_match(()) == (0, root)
    assert next(root.subtree()) is root
    assert set(map(path_of, root.subtree())) == {(), (1, 2), (1, 2, 3, 4), (1, 2, 9, 9)}


def test_ending_at_prune_and_merge() -> None:
    root = Counted(())
    leaf = root.insert((1, 2, 3, 4))
    assert leaf.ending_at(4) is leaf
    upper = leaf.ending_at(1)
    assert upper.label == (1,) and leaf.label == (2, 3, 4) and leaf.start == 1
    other = root.insert((1, 5))
    assert other.prune(lambda n: False) is upper and 5 not in upper.children
    merged = upper.merge_into_child()
    assert merged is leaf and (leaf.label, leaf.start, leaf.parent) == ((1, 2, 3, 4), 0, root)
    assert upper.parent is None and not upper.children and root.children == {1: leaf}
    assert leaf.prune(lambda n: n is leaf) is leaf
    assert leaf.prune(lambda n: False) is root and not root.children and leaf.parent is None


def test_str_labels() -> None:
    root: RadixNode[str] = RadixNode("")
    root.insert("hello world")
    there = root.insert("hello there")
    assert there.label == "there" and there.parent is not None and there.parent.label == "hello "
    assert root.longest_match("help") == (3, there.parent)
    assert [length for _, length in root.descend("hello thermos")] == [6, 10]


# -- RadixNode: against a naive model -------------------------------------------------------------

KEYS = st.lists(st.integers(0, 3), max_size=10).map(tuple)


class RadixMachine(RuleBasedStateMachine):
    """The model: the multiset of stored keys. Removal prunes and merges as `StateIndex` does."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Counted(())
        self.keys: dict[tuple[int, ...], int] = {}

    @rule(key=KEYS)
    def insert(self, key: tuple[int, ...]) -> None:
        node = self.root.insert(key)
        assert path_of(node) == key and node.end == len(key)
        node.count += 1
        self.keys[key] = self.keys.get(key, 0) + 1

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.keys)))
        length, node = self.root.longest_match(key)
        assert length == len(key) and node.end == len(key)
        node.count -= 1
        self.keys[key] -= 1
        if not self.keys[key]:
            del self.keys[key]
        kept = node.prune(lambda n: n.count > 0)
        if kept.parent is not None and not kept.count and len(kept.children) == 1:
            kept.merge_into_child()

    @rule(key=st.lists(st.integers(0, 3), max_size=12).map(tuple))
    def longest_match(self, key: tuple[int, ...]) -> None:
        length, node = self.root.longest_match(key)
        assert length == max((naive_common(key, stored) for stored in self.keys), default=0)
        assert node.start < length <= node.end or (node is self.root and length == 0)
        assert path_of(node)[:length] == key[:length]
        walked = list(self.root.descend(key))
        assert all(matched == n.end for n, matched in walked[:-1])  # only the last may match in part
        assert (walked[-1] if walked else (self.root, 0)) == (node, length)

    @invariant()
    def tree_matches_the_model(self) -> None:
        ends: dict[tuple[int, ...], int] = {}
        for node in self.root.subtree():
            for first, child in node.children.items():
                assert child.label and child.label[0] == first and child.parent is node and child.start == node.end
                assert child.count or len(child.children) != 1, "a node that stores nothing has two children or none"
                assert child.count or child.children, "an empty leaf was not pruned"
            if node.count:
                ends[path_of(node)] = node.count
        assert ends == self.keys


TestRadixStateful = RadixMachine.TestCase
TestRadixStateful.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
