"""`PrefixCache`: unit tests and a stateful property test against a brute-force model."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvchat.engine.eviction_queue import EvictionQueue
from kvchat.engine.prefix_cache import Eviction, InsertResult, IntegrityError, MatchResult, Node, PrefixCache


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TickClock:
    """A clock that advances by one at every reading (every touch gets its own time)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> PrefixCache:
    return PrefixCache(clock=clock)


def _insert(cache: PrefixCache, tokens: list[int], seq_id: int, **kwargs: object) -> InsertResult:
    result = cache.insert(tokens, seq_id, **kwargs)  # type: ignore[arg-type]
    cache.check_integrity()
    return result


# -- match ----------------------------------------------------------------------


def test_match_exact_and_longer(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3], 7)
    m = cache.match([1, 2, 3])
    assert (m.length, m.holder) == (3, 7) and m.node is not None and m.node.end == 3
    assert cache.match([1, 2, 3, 4, 5]).length == 3


def test_match_partial_edge(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3, 4], 7)
    m = cache.match([1, 2, 9])
    assert (m.length, m.holder) == (2, 7)
    assert m.node is not None and m.node.start < 2 <= m.node.end  # matched only partly
    assert cache.match([1, 2]).length == 2


def test_no_match(cache: PrefixCache) -> None:
    assert cache.match([1]) == MatchResult(0, None, None)
    _insert(cache, [1, 2], 7)
    assert cache.match([2, 1]) == MatchResult(0, None, None)
    assert cache.match([]) == MatchResult(0, None, None)


def test_match_touches_path_and_peek_does_not(cache: PrefixCache, clock: FakeClock) -> None:
    _insert(cache, [1, 2], 7)
    clock.now = 5.0
    node = cache.peek([1, 2]).node
    assert node is not None and node.last_used == 0.0
    cache.match([1])
    assert node.last_used == 5.0


def test_namespaces_are_isolated(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3], 1, namespace="a")
    assert cache.match([1, 2, 3]).length == 0
    assert cache.match([1, 2, 3], namespace="b").length == 0
    assert cache.match([1, 2, 3], namespace="a").holder == 1
    assert _insert(cache, [1, 2, 3], 2).stored  # the default namespace stores it again
    assert cache.total_tokens == 6
    with pytest.raises(ValueError):
        cache.insert([5], 1, namespace="b")  # a seq id is parked once, whatever the namespace
    assert cache.remove_namespace("a") == [1]
    assert cache.remove_namespace("a") == []
    cache.check_integrity()
    assert cache.holders() == {2} and cache.total_tokens == 3


# -- insert ---------------------------------------------------------------------


def test_insert_splits_an_edge(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3, 4], 1)
    result = _insert(cache, [1, 2, 5], 2)
    assert result == InsertResult(added_tokens=1, stored=True, redundant=(), shared_from=((1, 0, 2),))
    root_child = cache.match([1]).node
    assert root_child is not None and root_child.tokens == (1, 2) and set(root_child.children) == {3, 5}
    assert root_child.holder in {1, 2}
    assert cache.total_tokens == 5 and cache.holders() == {1, 2}
    assert cache.match([1, 2, 3, 4]).holder == 1 and cache.match([1, 2, 5]).holder == 2


def test_insert_extending_a_leaf_makes_its_holder_redundant(cache: PrefixCache) -> None:
    _insert(cache, [1, 2], 1)
    result = _insert(cache, [1, 2, 3], 2, shared_prefix=2)
    assert result == InsertResult(added_tokens=1, stored=True, redundant=(1,), shared_from=())
    assert cache.holders() == {2}
    assert cache.match([1]).holder == 2  # inner nodes moved to the new holder
    assert cache.total_tokens == 3


def test_insert_extending_reports_the_redundant_holder_as_the_source(cache: PrefixCache) -> None:
    _insert(cache, [1, 2], 1)
    result = _insert(cache, [1, 2, 3], 2)  # evaluated [0, 2) itself
    assert result.redundant == (1,) and result.shared_from == ((1, 0, 2),)


def test_insert_of_a_present_list_is_not_stored(cache: PrefixCache, clock: FakeClock) -> None:
    _insert(cache, [1, 2, 3], 1)
    for tokens in ([1, 2, 3], [1, 2], [1]):
        clock.now += 1
        assert _insert(cache, tokens, 2) == InsertResult(0, False, (), ())
        assert cache.peek([1]).node.last_used == clock.now  # type: ignore[union-attr]
    assert cache.holders() == {1} and cache.total_tokens == 3


def test_insert_rejects_a_parked_seq_and_a_bad_shared_prefix(cache: PrefixCache) -> None:
    _insert(cache, [1, 2], 1)
    with pytest.raises(ValueError):
        cache.insert([3], 1)
    with pytest.raises(ValueError):
        cache.insert([3], 2, shared_prefix=2)
    cache.check_integrity()


def test_shared_from(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3, 4, 5], 1)
    _insert(cache, [1, 2, 3, 9], 2, shared_prefix=3)  # nothing duplicated
    assert _insert(cache, [1, 2, 3, 4, 7], 3, shared_prefix=2).shared_from == ((1, 2, 4),)
    assert _insert(cache, [1, 2, 8], 4, shared_prefix=0).shared_from[0][1:] == (0, 2)
    # shared more than the tree still has (the rest was evicted meanwhile): nothing to re-share
    assert _insert(cache, [6, 6, 6], 5, shared_prefix=3).shared_from == ()


# -- locks ----------------------------------------------------------------------


def test_lock_protects_from_eviction(cache: PrefixCache, clock: FakeClock) -> None:
    _insert(cache, [1, 2, 3], 1)
    clock.now = 1
    _insert(cache, [1, 2, 4], 2)
    node = cache.match([1, 2, 3]).node
    assert node is not None
    cache.lock(node)
    assert cache.protected_tokens == 3 and cache.evictable_tokens == 1
    with pytest.raises(ValueError):
        cache.evict_sequence(1)
    ev = cache.evict_lru()
    assert ev is not None and ev.seq_id == 2  # 1 is older but locked
    assert cache.evict_lru() is None
    cache.unlock(node)
    cache.check_integrity()
    assert cache.protected_tokens == 0
    assert [e.seq_id for e in cache.evict_sequence(1)] == [1, 1]  # [3], then [1, 2]
    assert cache.total_tokens == 0 and cache.evict_lru() is None


def test_evict_sequence_refuses_a_locked_inner_node_of_its_chain(cache: PrefixCache) -> None:
    _insert(cache, [1, 2], 1)
    _insert(cache, [1, 2, 3], 2)  # [1, 2] -> [3]: both only held by 2
    inner = cache.match([1, 2]).node
    assert inner is not None and inner.children
    cache.lock(inner)
    with pytest.raises(ValueError):
        cache.evict_sequence(2)
    cache.check_integrity()
    assert cache.total_tokens == 3
    assert cache.evict_lru() == Eviction(2, 2, (1, 2, 3), 1, False)  # the unlocked leaf can go
    assert cache.evict_lru() is None


def test_evict_sequence_allowed_when_only_shared_nodes_are_locked(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3], 1)
    _insert(cache, [1, 2, 4], 2)
    node = cache.match([1, 2]).node
    assert node is not None
    cache.lock(node)
    assert cache.evict_sequence(1) == [Eviction(1, 0, (1, 2, 3), 1, True)]
    cache.check_integrity()
    assert cache.match([1, 2]).holder == 2


def test_unlock_below_zero_and_stale_nodes_raise(cache: PrefixCache) -> None:
    _insert(cache, [1, 2], 1)
    node = cache.match([1, 2]).node
    assert node is not None
    with pytest.raises(ValueError):
        cache.unlock(node)
    cache.evict_sequence(1)
    with pytest.raises(ValueError):
        cache.lock(node)  # evicted: no longer in the tree
    cache.check_integrity()


def test_split_of_a_locked_node_keeps_both_halves_protected(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3, 4], 1)
    lower = cache.match([1]).node  # partial match: lock the whole edge
    assert lower is not None
    cache.lock(lower)
    assert cache.protected_tokens == 4
    _insert(cache, [1, 2, 9], 2)  # splits the locked edge after [1, 2]
    upper = cache.match([1]).node
    assert upper is not None and upper is not lower and lower.parent is upper
    assert (upper.lock_ref, lower.lock_ref) == (1, 1)
    assert cache.protected_tokens == 4 and cache.evictable_tokens == 1
    ev = cache.evict_lru()
    assert ev is not None and ev.seq_id == 2
    cache.unlock(lower)  # the engine still has the old object: it walks through the new upper node
    cache.check_integrity()
    assert cache.protected_tokens == 0 and upper.lock_ref == 0


def test_nested_locks_count(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3], 1)
    _insert(cache, [1, 2, 4, 5], 2)
    a, b = cache.match([1, 2, 3]).node, cache.match([1, 2, 4]).node
    assert a is not None and b is not None
    for node in (a, b, b):
        cache.lock(node)
    assert cache.protected_tokens == 5 and a.parent is not None and a.parent.lock_ref == 3
    cache.unlock(b)
    cache.unlock(a)
    assert cache.protected_tokens == 4
    cache.unlock(b)
    cache.check_integrity()
    assert cache.protected_tokens == 0


# -- eviction -------------------------------------------------------------------


def test_lru_order(cache: PrefixCache, clock: FakeClock) -> None:
    for t, seq in enumerate((1, 2, 3)):
        clock.now = float(t)
        _insert(cache, [seq, seq], seq)
    clock.now = 10.0
    cache.match([1])  # 1 becomes the most recent
    order = []
    while (ev := cache.evict_lru()) is not None:
        cache.check_integrity()
        order.append(ev.seq_id)
    assert order == [2, 3, 1]


def test_lru_time_covers_the_whole_path(cache: PrefixCache, clock: FakeClock) -> None:
    _insert(cache, [1, 2], 1)
    clock.now = 0.5
    _insert(cache, [7], 3)
    clock.now = 1.0
    _insert(cache, [1, 2, 3], 2)  # touches [1, 2] too
    seven = cache.match([7]).node
    assert seven is not None and seven.last_used == 1.0
    clock.now = 0.5  # pretend [7] was matched at 0.5, then lock it
    cache.match([7])
    cache.lock(seven)
    assert cache.evict_lru() == Eviction(2, 2, (1, 2, 3), 1, False)  # [1, 2] is now 2's leaf, used at 1.0
    cache.unlock(seven)
    assert cache.evict_lru().seq_id == 3  # type: ignore[union-attr]


def test_lru_ties_go_to_the_first_touched(cache: PrefixCache) -> None:
    for seq in (3, 1, 2):
        _insert(cache, [seq], seq)
    assert [cache.evict_lru().seq_id for _ in range(3)] == [3, 1, 2]  # type: ignore[union-attr]


def test_lru_leaf_by_depth_and_evict_leaf(cache: PrefixCache, clock: FakeClock) -> None:
    clock.now = 0.0
    _insert(cache, [1], 1)  # the oldest, but only 1 token deep
    clock.now = 1.0
    _insert(cache, [2, 2, 2], 2)
    clock.now = 2.0
    _insert(cache, [3, 3, 3, 3], 3)
    assert cache.lru_leaf().holder == 1  # type: ignore[union-attr]
    deep = cache.lru_leaf(min_depth=3)
    assert deep is not None and deep.holder == 2
    assert cache.evict_leaf(deep) == Eviction(2, keep=0, tokens=(2, 2, 2), freed_tokens=3, released=True)
    cache.check_integrity()
    with pytest.raises(ValueError):
        cache.evict_leaf(deep)  # no longer in the tree
    three = cache.match([3, 3, 3, 3]).node
    cache.lock(three)
    assert cache.lru_leaf(min_depth=3) is None
    with pytest.raises(ValueError):
        cache.evict_leaf(three)
    assert cache.holders() == {1, 3}


def test_eviction_chain_trims_then_releases(cache: PrefixCache) -> None:
    _insert(cache, [1, 2], 1)
    _insert(cache, [1, 2, 3, 4], 2)  # [1, 2] -> [3, 4], all held by 2
    assert cache.evict_lru() == Eviction(2, keep=2, tokens=(1, 2, 3, 4), freed_tokens=2, released=False)
    cache.check_integrity()
    assert cache.holders() == {2} and cache.total_tokens == 2
    assert cache.evict_lru() == Eviction(2, keep=0, tokens=(1, 2), freed_tokens=2, released=True)
    assert cache.evict_lru() is None and cache.holders() == set() and cache.total_tokens == 0
    cache.check_integrity()


def test_release_hands_inner_nodes_to_another_holder(cache: PrefixCache, clock: FakeClock) -> None:
    _insert(cache, [1, 2, 3], 1)
    clock.now = 1
    _insert(cache, [1, 2, 4], 2)
    assert cache.match([1, 2]).holder == 1
    clock.now = 2
    cache.match([1, 2, 4])
    assert cache.evict_lru() == Eviction(1, 0, (1, 2, 3), 1, True)
    cache.check_integrity()
    assert cache.match([1, 2]).holder == 2


def test_evict_sequence_walks_the_chain(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 5], 1)
    _insert(cache, [1, 2, 3], 2)
    _insert(cache, [1, 2, 3, 4, 6], 3)  # 2 redundant; [1, 2] -> [3] -> [4, 6] held by 3
    assert cache.evict_sequence(3) == [
        Eviction(3, 3, (1, 2, 3, 4, 6), 2, False),
        Eviction(3, 0, (1, 2, 3), 1, True),
    ]
    cache.check_integrity()
    assert cache.holders() == {1} and cache.total_tokens == 3
    assert cache.evict_sequence(3) == []


def test_counters_and_clear(cache: PrefixCache) -> None:
    _insert(cache, [1, 2, 3], 1)
    _insert(cache, [1, 4], 2, namespace="x")
    _insert(cache, [1, 2, 5, 6], 3)
    assert (cache.total_tokens, cache.protected_tokens, cache.evictable_tokens) == (7, 0, 7)
    node = cache.match([1, 2, 5]).node
    assert node is not None
    cache.lock(node)
    assert (cache.protected_tokens, cache.evictable_tokens) == (4, 3)
    assert cache.clear() == [1, 2, 3]  # locked nodes too: a running request keeps its shared cells
    cache.check_integrity()
    assert (cache.total_tokens, cache.protected_tokens, cache.holders()) == (0, 0, set())
    _insert(cache, [1, 2, 5], 4)
    with pytest.raises(ValueError):
        cache.lock(node)  # dropped
    cache.unlock(node)  # the stale lock is released without touching the new tree's counters
    cache.check_integrity()
    with pytest.raises(ValueError):
        cache.unlock(node)
    assert cache.total_tokens == 3 and cache.clear() == [4] and cache.clear() == []


def test_remove_namespace_with_a_locked_node(cache: PrefixCache) -> None:
    _insert(cache, [1, 2], 1, namespace="x")
    _insert(cache, [1, 2], 2)
    locked = [cache.match([1], namespace=ns).node for ns in ("x", None)]
    for node in locked:
        cache.lock(node)  # type: ignore[arg-type]
    assert cache.protected_tokens == 4
    assert cache.remove_namespace("x") == [1]
    cache.check_integrity()
    assert (cache.total_tokens, cache.protected_tokens) == (2, 2)
    cache.unlock(locked[0])  # type: ignore[arg-type]
    assert cache.protected_tokens == 2
    cache.unlock(locked[1])  # type: ignore[arg-type]
    assert cache.protected_tokens == 0
    cache.check_integrity()


def test_empty_namespace_root_is_dropped(cache: PrefixCache) -> None:
    _insert(cache, [1], 1, namespace="x")
    assert cache.evict_lru() == Eviction(1, 0, (1,), 1, True, namespace="x")
    assert "x" not in cache._roots
    _insert(cache, [1], 2, namespace="x")
    assert cache.match([1], namespace="x").holder == 2


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda c: setattr(c.match([1, 2]).node, "holder", 99),
        lambda c: setattr(c.match([1]).node, "holder", 3),  # seq 3 holds no leaf below
        lambda c: setattr(c.match([1, 2, 3]).node, "lock_ref", 1),  # deeper lock than the parent
        lambda c: setattr(c.match([1, 2, 3]).node, "start", 3),
        lambda c: setattr(c, "_total", c._total + 1),
        lambda c: setattr(c, "_protected", 1),
        lambda c: c._leaf_of.pop(1),
        lambda c: c.match([1]).node.children.update({7: c.match([1, 2, 3]).node}),
        lambda c: c._namespace_of.clear(),
        lambda c: c._evictable.discard(c.match([5]).node),  # an unlocked leaf left out of the queue
        lambda c: c._evictable.push(c.match([1, 2]).node),  # an inner node queued
        lambda c: setattr(c.peek([5]).node, "last_used", 9.0),  # a new key the queue was not told of
        lambda c: c._evictable._heaps[0].clear(),
    ],
)
def test_check_integrity_catches_corruption(cache: PrefixCache, corrupt) -> None:  # type: ignore[no-untyped-def]
    _insert(cache, [1, 2, 3], 1)
    _insert(cache, [1, 2, 4], 2)
    _insert(cache, [5], 3)
    corrupt(cache)
    with pytest.raises(IntegrityError):
        cache.check_integrity()


def test_lru_leaf_by_depth_follows_locks_touches_and_evictions(cache: PrefixCache, clock: FakeClock) -> None:
    for t, tokens in enumerate(([1] * 4, [2], [3] * 5, [4] * 2)):
        clock.now = float(t)
        _insert(cache, tokens, t)
    assert [cache.lru_leaf(d).holder for d in (0, 2, 4, 5)] == [0, 0, 0, 2]  # type: ignore[union-attr]
    assert cache.lru_leaf(6) is None
    clock.now = 10.0
    cache.match([1, 1])
    assert [cache.lru_leaf(d).holder for d in (0, 2, 4)] == [1, 2, 2]  # type: ignore[union-attr]
    three = cache.match([3]).node  # at the same time as 1, but later
    cache.lock(three)  # type: ignore[arg-type]
    assert [cache.lru_leaf(d).holder for d in (0, 4)] == [1, 0]  # type: ignore[union-attr]
    assert cache.evict_leaf(cache.lru_leaf(2)) == Eviction(3, 0, (4, 4), 2, True)  # type: ignore[arg-type]
    cache.unlock(three)  # type: ignore[arg-type]
    cache.check_integrity()
    assert [cache.lru_leaf(d).holder for d in (0, 2, 5)] == [1, 0, 2]  # type: ignore[union-attr]


def test_eviction_queue_keeps_stale_entries_bounded(cache: PrefixCache) -> None:
    for seq in range(10):
        _insert(cache, [seq, seq], seq)
    cache.lru_leaf(2)  # a second heap, kept up to date from now on
    for _ in range(200):
        for seq in range(10):
            cache.match([seq, seq])  # each touch queues the leaf again
    heaps = cache._evictable._heaps
    assert set(heaps) == {0, 2} and all(len(heap) <= 2 * 10 + 32 for heap in heaps.values())
    cache.check_integrity()
    assert [cache.evict_lru().seq_id for _ in range(10)] == list(range(10))  # type: ignore[union-attr]


def test_eviction_queue_keeps_a_few_depths() -> None:
    class Leaf:
        def __init__(self, end: int, last_used: float) -> None:
            self.end, self.last_used, self.stamp = end, last_used, 0

    queue: EvictionQueue[Leaf] = EvictionQueue()
    leaves = [Leaf(end, float(-end)) for end in range(1, 9)]  # the deepest is the oldest
    for leaf in leaves:
        queue.push(leaf)
    for depth in range(1, 9):
        assert queue.oldest(depth) is leaves[-1]
        assert len(queue._heaps) <= 4 and 0 in queue._heaps
    queue.discard(leaves[-1])
    assert queue.oldest(8) is None and queue.oldest(3) is leaves[-2] and len(queue) == 7
    assert queue.inconsistency(set(leaves[:-1])) is None
    assert queue.inconsistency(set(leaves)) is not None


# -- stateful property test -----------------------------------------------------

NAMESPACES = st.sampled_from([None, "a"])
TOKENS = st.lists(st.integers(0, 3), min_size=1, max_size=12).map(tuple)


def _lcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCacheMachine(RuleBasedStateMachine):
    """The model: parked seq id -> (namespace, tokens it holds), and the outstanding locks."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = TickClock()
        self.cache = PrefixCache(clock=self.clock)
        self.used: dict[tuple[str | None, tuple[int, ...]], float] = {}  # (namespace, prefix) -> last use
        self.parked: dict[int, tuple[str | None, tuple[int, ...]]] = {}
        self.locks: list[tuple[Node, str | None, tuple[int, ...]]] = []
        self.stale_locks: list[Node] = []  # locks on nodes that remove_namespace dropped
        self.next_id = 0

    def touched(self, ns: str | None, path: tuple[int, ...]) -> None:
        """The cache just marked every prefix of `path` as used (the clock was read once)."""
        for i in range(1, len(path) + 1):
            self.used[(ns, path[:i])] = self.clock.now

    def lists_in(self, ns: str | None, *, but: int | None = None) -> dict[int, tuple[int, ...]]:
        return {s: t for s, (n, t) in self.parked.items() if n == ns and s != but}

    def longest(self, ns: str | None, tokens: tuple[int, ...], *, but: int | None = None) -> int:
        return max((_lcp(tokens, t) for t in self.lists_in(ns, but=but).values()), default=0)

    @rule(ns=NAMESPACES, tokens=TOKENS, data=st.data())
    def insert(self, ns: str | None, tokens: tuple[int, ...], data: st.DataObject) -> None:
        if self.parked and data.draw(st.booleans(), label="build on a parked list"):
            # a prefix of a parked list (often all of it) + a short suffix: extensions, splits, repeats
            ns, base = self.parked[data.draw(st.sampled_from(sorted(self.parked)), label="base")]
            cut = data.draw(st.one_of(st.just(len(base)), st.integers(0, len(base))), label="cut")
            suffix = data.draw(st.lists(st.integers(0, 3), min_size=0 if cut else 1, max_size=6), label="suffix")
            tokens = base[:cut] + tuple(suffix)
        shared = data.draw(st.integers(0, len(tokens)), label="shared_prefix")
        seq, self.next_id = self.next_id, self.next_id + 1
        matched = self.longest(ns, tokens)
        before = self.lists_in(ns)
        total = self.cache.total_tokens
        result = self.cache.insert(tokens, seq, shared_prefix=shared, namespace=ns)
        if matched == len(tokens):
            assert result == InsertResult(0, False, (), ())
            self.touched(ns, self.cache.peek(tokens, namespace=ns).node.path())  # type: ignore[union-attr]
            return
        self.touched(ns, tokens)
        assert result.stored and result.added_tokens == len(tokens) - matched
        assert self.cache.total_tokens == total + result.added_tokens
        assert sorted(result.redundant) == sorted(s for s, t in before.items() if tokens[: len(t)] == t)
        if matched > shared:
            ((holder, start, end),) = result.shared_from
            assert (start, end) == (shared, matched) and before[holder][:matched] == tokens[:matched]
        else:
            assert result.shared_from == ()
        for s in result.redundant:
            del self.parked[s]
        self.parked[seq] = (ns, tokens)

    @rule(ns=NAMESPACES, tokens=st.lists(st.integers(0, 3), max_size=14).map(tuple))
    def match(self, ns: str | None, tokens: tuple[int, ...]) -> None:
        m = self.cache.match(tokens, namespace=ns)
        assert m.length == self.longest(ns, tokens)
        if m.length == 0:
            assert m.holder is None and m.node is None
            return
        assert m.node is not None and m.node.holder == m.holder
        self.touched(ns, m.node.path())
        assert m.node.start < m.length <= m.node.end and m.node.path()[: m.length] == tokens[: m.length]
        held = self.lists_in(ns).get(m.holder)  # type: ignore[arg-type]
        assert held is not None and held[: m.length] == tokens[: m.length]

    @precondition(lambda self: self.parked)
    @rule(data=st.data())
    def lock(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.parked)), label="seq")
        ns, tokens = self.parked[seq]
        n = data.draw(st.integers(1, len(tokens)), label="prefix")
        node = self.cache.match(tokens[:n], namespace=ns).node
        assert node is not None
        self.touched(ns, node.path())
        self.cache.lock(node)
        self.locks.append((node, ns, node.path()))

    @precondition(lambda self: self.locks or self.stale_locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) + len(self.stale_locks) - 1), label="lock")
        node = self.locks.pop(i)[0] if i < len(self.locks) else self.stale_locks.pop(i - len(self.locks))
        self.cache.unlock(node)

    @rule()
    def evict_lru(self) -> None:
        locked_paths = {(ns, path) for _, ns, path in self.locks}
        unlocked = {s: (ns, t) for s, (ns, t) in self.parked.items() if (ns, t) not in locked_paths}
        leaf_times = {s: self.used[(ns, t)] for s, (ns, t) in unlocked.items()}
        total = self.cache.total_tokens
        ev = self.cache.evict_lru()
        if ev is None:
            assert not unlocked  # every leaf is locked, or the tree is empty
            return
        assert ev.seq_id in unlocked and leaf_times[ev.seq_id] == min(leaf_times.values())
        ns, tokens = self.parked[ev.seq_id]
        assert ev.tokens == tokens and ev.namespace == ns and ev.freed_tokens == total - self.cache.total_tokens > 0
        assert ev.released == (ev.keep == 0)
        if ev.released:
            del self.parked[ev.seq_id]
        else:
            assert self.longest(ns, tokens, but=ev.seq_id) < ev.keep == len(tokens) - ev.freed_tokens
            self.parked[ev.seq_id] = (ns, tokens[: ev.keep])

    @rule(min_depth=st.integers(0, 13))
    def lru_leaf(self, min_depth: int) -> None:
        locked_paths = {(ns, path) for _, ns, path in self.locks}
        times = {
            s: self.used[(ns, t)]
            for s, (ns, t) in self.parked.items()
            if (ns, t) not in locked_paths and len(t) >= min_depth
        }
        leaf = self.cache.lru_leaf(min_depth)
        if leaf is None:
            assert not times
        else:
            assert leaf.holder in times and times[leaf.holder] == min(times.values())

    @precondition(lambda self: self.parked)
    @rule(data=st.data())
    def evict_sequence(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.parked)), label="seq")
        ns, tokens = self.parked[seq]
        branch = self.longest(ns, tokens, but=seq)
        blocked = any(n == ns and tokens[: len(p)] == p and len(p) > branch for _, n, p in self.locks)
        total = self.cache.total_tokens
        if blocked:
            with pytest.raises(ValueError):
                self.cache.evict_sequence(seq)
            assert self.cache.total_tokens == total
            return
        evictions = self.cache.evict_sequence(seq)
        assert evictions[-1].released and not any(e.released for e in evictions[:-1])
        held = tokens
        for e in evictions:
            assert e.seq_id == seq and e.namespace == ns and e.tokens == held and e.keep < len(held)
            assert e.released or e.keep > branch
            held = held[: e.keep]
        assert sum(e.freed_tokens for e in evictions) == total - self.cache.total_tokens == len(tokens) - branch
        del self.parked[seq]

    @rule(ns=NAMESPACES)
    def remove_namespace(self, ns: str | None) -> None:
        assert self.cache.remove_namespace(ns) == sorted(self.lists_in(ns))
        self.parked = {s: v for s, v in self.parked.items() if v[0] != ns}
        self.stale_locks += [node for node, n, _ in self.locks if n == ns]
        self.locks = [lock for lock in self.locks if lock[1] != ns]
        for node in self.stale_locks:
            with pytest.raises(ValueError):
                self.cache.lock(node)

    @invariant()
    def tree_matches_the_model(self) -> None:
        self.cache.check_integrity()
        assert self.cache.holders() == set(self.parked)
        prefixes = {(ns, t[:i]) for ns, t in self.parked.values() for i in range(1, len(t) + 1)}
        assert self.cache.total_tokens == len(prefixes)
        protected = {(ns, p[:i]) for _, ns, p in self.locks for i in range(1, len(p) + 1)}
        assert self.cache.protected_tokens == len(protected)
        assert self.cache.evictable_tokens == len(prefixes) - len(protected)
        nodes: dict[int, Node] = {}
        for seq, (ns, tokens) in self.parked.items():
            m = self.cache.peek(tokens, namespace=ns)
            assert (m.length, m.holder) == (len(tokens), seq) and m.node is not None and m.node.end == len(tokens)
            node: Node | None = m.node
            while node is not None:
                nodes[id(node)] = node
                if node.parent is not None:  # a touch covers whole nodes, so the times agree exactly
                    assert node.last_used == self.used[(ns, node.path())], node
                node = node.parent
        expected_refs: Counter[int] = Counter()
        for lock_node, ns, path in self.locks:
            assert lock_node.path() == path and self.cache.peek(path, namespace=ns).length == len(path)
            node = lock_node
            while node is not None:
                expected_refs[id(node)] += 1
                node = node.parent
        for key, node in nodes.items():
            assert node.lock_ref == expected_refs[key], node
        assert all(node.lock_ref > 0 for node in self.stale_locks)


TestPrefixCacheStateful = PrefixCacheMachine.TestCase
TestPrefixCacheStateful.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
