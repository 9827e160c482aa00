"""Prefix-affinity routing for Ray Serve, without a Ray cluster or a model: `ReplicaPrefixTree`
(against brute-force references), `PrefixAffinityPolicy`, `PendingDecisions`, the routing
text read from OpenAI request bodies (`routing_hint`, response tags), including hostile
bodies, and the parts of the Serve application that need no cluster: the router's
choice for a stored response, the ingress's header checks, the deployments' queue
bounds and the Host names `kvchat serve --ray --host` allows."""

from __future__ import annotations

import hashlib
import itertools
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvchat.server.ray_serve.policy import PendingDecisions, PrefixAffinityPolicy, RoutingDecision
from kvchat.server.ray_serve.prefix_tree import ReplicaPrefixTree
from kvchat.server.ray_serve.routing_text import (
    RoutingHint,
    make_response_tag,
    replica_response_tag,
    response_tag,
    routing_hint,
)

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
MESSAGES = "/v1/messages"

REPLICAS = ("a", "b", "c")
SMALL_TEXTS = st.text(alphabet="xyz", max_size=12)
"""Texts over a small alphabet, so that they share prefixes often."""


def _lcp(a: str, b: str) -> int:
    return next((index for index, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _prefixes(texts: list[str] | set[str] | dict[str, int]) -> set[str]:
    """Every non-empty prefix of `texts`: what a replica sent them holds."""
    return {text[:end] for text in texts for end in range(1, len(text) + 1)}


def _brute_force_match(text: str, records: dict[str, list[str]]) -> dict[str, int]:
    longest = {
        replica: max((_lcp(text, sent) for sent in sent_texts), default=0) for replica, sent_texts in records.items()
    }
    return {replica: length for replica, length in longest.items() if length > 0}


def _brute_force_whole(text: str, records: dict[str, list[str]] | dict[str, set[str]]) -> dict[str, int]:
    longest = {
        replica: max((len(sent) for sent in sent_texts if sent and text.startswith(sent)), default=0)
        for replica, sent_texts in records.items()
    }
    return {replica: length for replica, length in longest.items() if length > 0}


def _check_structure(tree: ReplicaPrefixTree) -> None:
    """The tree's internal invariants (the one place the tests look inside it): every
    node is held by someone (unheld nodes are pruned), a holder of a node holds its
    parent and used it no earlier, children are keyed by their label's first character,
    a replica's character count is the length of the labels it holds, and a text
    ends only at a node its replica holds."""
    counted: Counter[object] = Counter()
    stack = [tree._root]
    while stack:
        node = stack.pop()
        for first, child in node.children.items():
            assert child.label and child.label[0] == first and child.parent is node
            assert child.ends <= child.last_used.keys()
            assert child.last_used, "a node nobody holds was not pruned"
            for replica, used in child.last_used.items():
                counted[replica] += len(child.label)
                if node is not tree._root:
                    assert node.last_used[replica] >= used
            stack.append(child)
    assert not tree._root.ends and not tree._root.last_used
    assert {replica: tree.chars(replica) for replica in counted} == dict(counted)
    assert set(tree.replicas()) == set(counted)


# -- ReplicaPrefixTree: examples ------------------------------------------------------------------


def test_match_gives_each_replicas_longest_shared_prefix() -> None:
    tree = ReplicaPrefixTree()
    tree.insert("a", "hello world")
    tree.insert("b", "hello there")
    tree.insert("c", "goodbye")
    assert tree.match("hello world, again") == {"a": 11, "b": 6}
    assert tree.match("hello") == {"a": 5, "b": 5}
    assert tree.match("help") == {"a": 3, "b": 3}
    assert tree.match("good") == {"c": 4}
    assert tree.match("xyz") == {} and tree.match("") == {}
    assert (tree.chars("a"), tree.chars("b"), tree.chars("c"), tree.chars("nobody")) == (11, 11, 7, 0)
    _check_structure(tree)


def test_match_whole_gives_each_replicas_longest_text_that_the_text_extends() -> None:
    tree = ReplicaPrefixTree()
    tree.insert("a", "hello")
    tree.insert("a", "hello world")
    tree.insert("b", "hello there")
    tree.insert("c", "hel")
    assert tree.match_whole("hello world, again") == {"a": 11, "c": 3}
    assert tree.match_whole("hello there") == {"a": 5, "b": 11, "c": 3}
    assert tree.match_whole("hello") == {"a": 5, "c": 3}
    assert tree.match_whole("hell") == {"c": 3}  # "hello" is held, but "hell" was never sent whole
    assert tree.match_whole("help") == {"c": 3} and tree.match_whole("he") == {} and tree.match_whole("") == {}


def test_an_empty_tree_matches_nothing_and_an_empty_text_records_nothing() -> None:
    tree = ReplicaPrefixTree()
    assert tree.match("anything") == {} and tree.replicas() == []
    tree.insert("a", "")
    assert tree.chars("a") == 0 and tree.replicas() == [] and tree.match("") == {}


def test_splitting_a_node_keeps_every_holders_count() -> None:
    tree = ReplicaPrefixTree()
    tree.insert("a", "abcdef")
    tree.insert("b", "abcxyz")  # splits "abcdef" after "abc"
    tree.insert("c", "ab")  # splits "abc" after "ab"
    tree.insert("a", "abcdef")  # again: nothing new
    assert (tree.chars("a"), tree.chars("b"), tree.chars("c")) == (6, 6, 2)
    assert tree.match("abcdeq") == {"a": 5, "b": 3, "c": 2}
    assert tree.match_whole("abcdef!") == {"a": 6, "c": 2} and tree.match_whole("abc") == {"c": 2}
    _check_structure(tree)


def test_forget_drops_a_replica_entirely_and_prunes_what_nobody_else_holds() -> None:
    tree = ReplicaPrefixTree()
    tree.insert("a", "shared prefix, then a")
    tree.insert("b", "shared prefix, then b")
    tree.insert("a", "only a holds this")
    tree.set_capacity("a", 1_000)
    assert tree.match("shared prefix, then b") == {"a": 20, "b": 21}
    tree.forget("a")
    assert tree.chars("a") == 0 and tree.replicas() == ["b"]
    assert tree.match("only a holds this") == {}
    assert tree.match("shared prefix, then a") == {"b": len("shared prefix, then ")}
    assert tree.match("shared prefix, then b") == {"b": 21}
    _check_structure(tree)
    tree.forget("b")
    tree.forget("never seen")
    assert tree._root.children == {}  # nothing is left that nobody holds


# -- ReplicaPrefixTree: properties ----------------------------------------------------------------

_TREE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.sampled_from(REPLICAS), SMALL_TEXTS),
        st.tuples(st.just("forget"), st.sampled_from(REPLICAS), st.just("")),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=_TREE_OPS, probes=st.lists(SMALL_TEXTS, max_size=8))
def test_match_and_chars_equal_a_brute_force_reference(ops: list[tuple[str, str, str]], probes: list[str]) -> None:
    tree = ReplicaPrefixTree()
    records: dict[str, list[str]] = {replica: [] for replica in REPLICAS}
    for op, replica, text in ops:
        if op == "insert":
            tree.insert(replica, text)
            records[replica].append(text)
        else:
            tree.forget(replica)
            records[replica] = []
    sent = [text for texts in records.values() for text in texts]
    for probe in [*probes, *sent, *(text + "z" for text in sent), *(text[:-1] for text in sent)]:
        assert tree.match(probe) == _brute_force_match(probe, records), probe
        assert tree.match_whole(probe) == _brute_force_whole(probe, records), probe
    for replica in REPLICAS:
        assert tree.chars(replica) == len(_prefixes(records[replica]))
    assert set(tree.replicas()) == {replica for replica in REPLICAS if any(records[replica])}
    _check_structure(tree)


@settings(max_examples=200, deadline=None)
@given(
    inserts=st.lists(st.tuples(st.sampled_from(REPLICAS), SMALL_TEXTS), max_size=30),
    gone=st.sampled_from(REPLICAS),
    probes=st.lists(SMALL_TEXTS, max_size=8),
)
def test_forget_leaves_the_other_replicas_matches_unchanged(
    inserts: list[tuple[str, str]], gone: str, probes: list[str]
) -> None:
    tree = ReplicaPrefixTree()
    for replica, text in inserts:
        tree.insert(replica, text)
    probes = [*probes, *(text for _, text in inserts)]
    before = [(tree.match(probe), tree.match_whole(probe)) for probe in probes]
    chars_before = {replica: tree.chars(replica) for replica in REPLICAS}
    tree.forget(gone)
    for probe, (was, was_whole) in zip(probes, before, strict=True):
        was.pop(gone, None)
        was_whole.pop(gone, None)
        assert (tree.match(probe), tree.match_whole(probe)) == (was, was_whole)
    assert tree.chars(gone) == 0 and gone not in tree.replicas()
    assert all(tree.chars(replica) == chars_before[replica] for replica in REPLICAS if replica != gone)
    _check_structure(tree)


class TreeMachine(RuleBasedStateMachine):
    """Inserts, capacity changes and forgetting against a model of what each replica
    was sent and when. A replica's record is the prefixes of its texts the tree still
    holds (read back with `match`); with a capacity it holds the most recently used ones."""

    def __init__(self) -> None:
        super().__init__()
        self.tree = ReplicaPrefixTree()
        self.clock = 0
        self.sent: dict[str, dict[str, int]] = {replica: {} for replica in REPLICAS}
        """replica → text → the logical time it was last sent."""
        self.capacity: dict[str, int | None] = dict.fromkeys(REPLICAS)
        self.whole: dict[str, set[str]] = {replica: set() for replica in REPLICAS}
        """replica → the texts it was sent and has held whole ever since."""

    def keep_whole(self, replica: str) -> None:
        """Drop the texts that lost any of their prefixes (a later send holds them again,
        but only a new send of the text itself makes it whole again)."""
        self.whole[replica] = {
            text for text in self.whole[replica] if self.tree.match(text).get(replica, 0) == len(text)
        }

    def held(self, replica: str) -> set[str]:
        return {
            text[:end] for text in self.sent[replica] for end in range(1, self.tree.match(text).get(replica, 0) + 1)
        }

    def last_used(self, replica: str, prefix: str) -> int:
        return max(used for text, used in self.sent[replica].items() if text.startswith(prefix))

    def check_trim(self, replica: str, wanted: set[str], capacity: int | None) -> None:
        """After an insert or a new capacity: trimmed only past the capacity, then to
        within 90% of it, by whole nodes (no more than one label past that)."""
        held = self.held(replica)
        if capacity is None or len(wanted) <= capacity:
            assert held == wanted
            return
        target = int(capacity * 0.9)
        assert held <= wanted and len(held) <= target
        longest = max(len(text) for text in self.sent[replica])
        assert len(held) + longest > target, "trimmed more than needed"

    @rule(replica=st.sampled_from(REPLICAS), text=SMALL_TEXTS)
    def insert(self, replica: str, text: str) -> None:
        wanted = self.held(replica) | _prefixes([text])
        self.clock += 1
        self.sent[replica][text] = self.clock
        self.tree.insert(replica, text)
        self.whole[replica].add(text)
        self.keep_whole(replica)
        capacity = self.capacity[replica]
        self.check_trim(replica, wanted, capacity)
        if capacity is None or len(text) <= int(capacity * 0.9):
            assert self.tree.match(text).get(replica, 0) == len(text), "the latest text was trimmed"

    @rule(replica=st.sampled_from(REPLICAS), capacity=st.none() | st.integers(0, 40))
    def set_capacity(self, replica: str, capacity: int | None) -> None:
        wanted = self.held(replica)
        self.tree.set_capacity(replica, capacity)
        self.capacity[replica] = capacity
        self.keep_whole(replica)
        self.check_trim(replica, wanted, capacity)

    @rule(replica=st.sampled_from(REPLICAS))
    def forget(self, replica: str) -> None:
        others = {other: self.held(other) for other in REPLICAS if other != replica}
        self.tree.forget(replica)
        self.sent[replica] = {}
        self.whole[replica] = set()
        self.capacity[replica] = None  # forgetting a replica drops its capacity too
        assert all(self.held(other) == held for other, held in others.items())

    @invariant()
    def records_are_the_most_recently_used_prefixes(self) -> None:
        for replica in REPLICAS:
            held = self.held(replica)
            assert self.tree.chars(replica) == len(held)  # nothing held beyond the texts' prefixes
            capacity = self.capacity[replica]
            assert capacity is None or len(held) <= capacity
            dropped = _prefixes(self.sent[replica]) - held
            if held and dropped:
                newest_dropped = max(self.last_used(replica, prefix) for prefix in dropped)
                oldest_held = min(self.last_used(replica, prefix) for prefix in held)
                assert newest_dropped <= oldest_held, "a more recently used prefix went first"
        assert set(self.tree.replicas()) == {replica for replica in REPLICAS if self.held(replica)}
        _check_structure(self.tree)

    @invariant()
    def whole_matches_are_the_texts_held_whole(self) -> None:
        sent = {text for texts in self.sent.values() for text in texts}
        for probe in {*sent, *(text + "x" for text in sent), *(text[:-1] for text in sent)}:
            assert self.tree.match_whole(probe) == _brute_force_whole(probe, self.whole)


TestTreeStateful = TreeMachine.TestCase
TestTreeStateful.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# -- ReplicaPrefixTree: capacity examples ---------------------------------------------------------


def test_capacity_forgets_the_least_recently_used_texts_first() -> None:
    tree = ReplicaPrefixTree()
    tree.set_capacity("a", 100)
    texts = ["ABCDEFGH"[index] + "x" * 19 for index in range(8)]  # 20 characters each, no shared prefix
    for text in texts[:5]:
        tree.insert("a", text)
    assert tree.chars("a") == 100  # at the capacity: nothing forgotten yet
    tree.insert("a", texts[0])  # used again: now the most recent
    tree.insert("a", texts[5])  # 120 > 100: trimmed to at most 90
    assert tree.chars("a") <= 90
    kept = [text for text in texts[:6] if tree.match(text).get("a") == len(text)]
    assert kept == [texts[0], texts[3], texts[4], texts[5]]
    assert tree.match(texts[1]) == {} and tree.match(texts[2]) == {}
    _check_structure(tree)


def test_capacity_trims_a_conversations_old_branch_before_its_shared_prefix() -> None:
    tree = ReplicaPrefixTree()
    tree.set_capacity("a", 60)
    system = "s" * 20
    tree.insert("a", system + "first question")
    tree.insert("a", system + "second question")
    tree.insert("a", system + "third question, which is longer")  # 20 + 14 + 15 + 31 = 80 > 60
    assert tree.chars("a") <= 54
    assert tree.match(system + "third question, which is longer") == {"a": 51}
    assert tree.match(system + "first question") == {"a": 20}  # its own branch went, the shared part stays


def test_the_latest_text_stays_whole_when_it_fits_and_goes_when_it_cannot() -> None:
    tree = ReplicaPrefixTree()
    tree.set_capacity("a", 50)
    for index in range(20):
        text = f"{index:02d}" + "y" * 30
        tree.insert("a", text)
        assert tree.chars("a") <= 50
        assert tree.match(text) == {"a": 32}
    tree.insert("a", "z" * 80)  # longer than the capacity: nothing of it can be kept
    assert tree.chars("a") <= 45 and tree.match("z" * 80).get("a", 0) <= 45


def test_set_capacity_trims_at_once_and_none_unbounds() -> None:
    tree = ReplicaPrefixTree()
    texts = [chr(0x4E00 + index) + "w" * 9 for index in range(100)]  # 10 characters each, no shared prefix
    for text in texts:
        tree.insert("a", text)
    tree.insert("b", texts[0])
    assert tree.chars("a") == 1_000
    tree.set_capacity("a", 200)
    assert tree.chars("a") == 180  # within 90% of the capacity, by whole texts
    assert all(tree.match(text).get("a") == 10 for text in texts[-18:])
    assert tree.match(texts[0]) == {"b": 10}  # another replica's record is its own
    tree.set_capacity("a", None)
    for text in texts:
        tree.insert("a", text)
    assert tree.chars("a") == 1_000
    tree.set_capacity("a", 0)
    assert tree.chars("a") == 0 and tree.replicas() == ["b"]
    tree.insert("a", "anything")
    assert tree.chars("a") == 0
    _check_structure(tree)


# -- ReplicaPrefixTree: large inputs --------------------------------------------------------------


def test_a_million_character_text_inserts_and_matches_quickly() -> None:
    text = "".join(random.Random(0).choices("abcd", k=1_000_000))
    started = time.monotonic()
    tree = ReplicaPrefixTree()
    tree.insert("a", text)
    tree.insert("b", text[:500_000] + "z")
    tree.insert("c", text[:-1] + "z")
    assert tree.match(text) == {"a": 1_000_000, "b": 500_000, "c": 999_999}
    assert tree.match(text + "more") == {"a": 1_000_000, "b": 500_000, "c": 999_999}
    assert (tree.chars("a"), tree.chars("b"), tree.chars("c")) == (1_000_000, 500_001, 1_000_000)
    tree.set_capacity("c", 900_000)
    assert tree.match(text) == {"a": 1_000_000, "b": 500_000, "c": 500_000}
    tree.forget("a")
    assert tree.match(text) == {"b": 500_000, "c": 500_000}
    assert time.monotonic() - started < 5


def test_thousands_of_texts_match_the_brute_force_reference() -> None:
    rng = random.Random(1)
    tree = ReplicaPrefixTree()
    records: dict[str, list[str]] = {replica: [] for replica in "wxyz"}
    conversations = ["".join(rng.choices("ab", k=6)) for _ in range(200)]
    for _ in range(3_000):
        index = rng.randrange(len(conversations))
        conversations[index] += "".join(rng.choices("abc", k=rng.randrange(1, 12)))
        replica = rng.choice("wxyz")
        tree.insert(replica, conversations[index])
        records[replica].append(conversations[index])
    for probe in rng.sample(conversations, 20) + ["".join(rng.choices("abc", k=40)) for _ in range(10)]:
        assert tree.match(probe) == _brute_force_match(probe, records)
        assert tree.match_whole(probe) == _brute_force_whole(probe, records)
    for replica, texts in records.items():
        assert tree.chars(replica) == len(_prefixes(texts))
    _check_structure(tree)
    tree.set_capacity("w", 1_000)
    assert tree.chars("w") <= 1_000
    _check_structure(tree)


def test_trimming_a_deep_old_chain_under_many_newer_leaves_is_fast() -> None:
    """Thousands of nested texts (a chain of nodes, each a leaf in turn as the one
    below goes) under thousands of newer leaves: each trim step takes the oldest leaf
    without rescanning the others."""
    depth = 4_000
    tree = ReplicaPrefixTree()
    for length in range(depth, 0, -1):  # longest first: each insert splits one node
        tree.insert("a", "x" * length)
    leaves = [f"y{index:05d}" for index in range(depth)]
    for leaf in leaves:
        tree.insert("a", leaf)
    assert tree.chars("a") == depth + len(_prefixes(leaves))
    started = time.monotonic()
    tree.set_capacity("a", depth)
    elapsed = time.monotonic() - started
    assert tree.match("x" * depth) == {} and tree.match(f"y{depth - 1:05d}") == {"a": 6}
    assert tree.chars("a") <= int(depth * 0.9)
    assert elapsed < 1.0, f"trim took {elapsed:.2f}s"


# -- PrefixAffinityPolicy -------------------------------------------------------------------------


def _chat(messages: list[dict[str, Any]], *, key: str = "key-1", tools: list[Any] | None = None) -> RoutingHint:
    body: dict[str, Any] = {"model": "m", "messages": messages}
    if tools:
        body["tools"] = tools
    return routing_hint(CHAT, json.dumps(body).encode(), f"Bearer {key}")


def _route(policy: PrefixAffinityPolicy, hint: RoutingHint, loads: dict[str, int], **kw: Any) -> RoutingDecision:
    decision = policy.choose(hint.text, loads, header=hint.header, **kw)
    policy.record(decision.replica, hint.text)
    return decision


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randrange(2, 9))) for _ in range(words))


def test_each_conversations_next_turn_goes_to_the_replica_that_served_the_last() -> None:
    rng = random.Random(2)
    policy = PrefixAffinityPolicy()
    loads = dict.fromkeys(("r0", "r1", "r2", "r3"), 0)
    system = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
    conversations = [[system, {"role": "user", "content": _sentence(rng, 12)}] for _ in range(8)]
    served: dict[int, str] = {}
    for _turn in range(5):
        for index, messages in enumerate(conversations):
            decision = _route(policy, _chat(messages), loads)
            if index in served:
                assert (decision.replica, decision.kind) == (served[index], "prefix")
            served[index] = str(decision.replica)
            loads[served[index]] += 1  # busier replicas stay within the default bound
            messages += [{"role": "assistant", "content": _sentence(rng, 6)}, {"role": "user", "content": "more"}]
        loads = dict.fromkeys(loads, 0)


def test_tenants_never_match_each_others_records() -> None:
    policy = PrefixAffinityPolicy()
    loads = {"r0": 0, "r1": 0}
    messages = [{"role": "system", "content": "A long shared system prompt " * 4}, {"role": "user", "content": "hi"}]
    first = _route(policy, _chat(messages, key="alice"), loads)
    again = _route(policy, _chat(messages, key="alice"), loads)
    assert again.replica == first.replica and again.kind == "prefix"
    other = _chat(messages, key="bob")
    assert all(length < 16 for length in policy.tree.match(other.text).values())  # not even the tenant
    decision = policy.choose(other.text, loads, header=other.header)
    assert decision.kind == "least_loaded" and decision.replica != first.replica  # the emptier replica


@settings(max_examples=100, deadline=None)
@given(
    keys=st.lists(st.text(max_size=20), min_size=2, max_size=2, unique=True),
    content=st.text(min_size=1, max_size=200),
)
def test_one_tenants_records_never_draw_another_tenants_request(keys: list[str], content: str) -> None:
    policy = PrefixAffinityPolicy(min_match_chars=1)
    messages = [{"role": "user", "content": content}]
    bodies = json.dumps({"messages": messages}).encode()
    mine, theirs = (routing_hint(CHAT, bodies, key) for key in keys)
    policy.record("r0", mine.text)
    assert all(length < 16 for length in policy.tree.match(theirs.text).values())
    assert policy.choose(theirs.text, {"r0": 0, "r1": 0}, header=theirs.header).kind == "least_loaded"
    assert policy.choose(mine.text, {"r0": 0, "r1": 0}, header=mine.header).kind == "prefix"


def test_decision_kinds() -> None:
    policy = PrefixAffinityPolicy(min_match_chars=8, max_imbalance=2)
    history = "a conversation long enough to matter"
    assert policy.choose(history, {"r0": 1, "r1": 0}) == RoutingDecision("r1", "least_loaded", 0)
    policy.record("r0", history)
    # r0 was sent the history, which this text extends, and is within the bound: "prefix".
    assert policy.choose(history + ", continued", {"r0": 2, "r1": 0}) == RoutingDecision("r0", "prefix", len(history))
    # Past the bound: "overloaded", to the least loaded.
    assert policy.choose(history + ", continued", {"r0": 3, "r1": 0}) == RoutingDecision("r1", "overloaded", 0)
    # No earlier text that this one extends (only a shared start): "least_loaded".
    assert policy.choose("a conv", {"r0": 0, "r1": 0}).kind == "least_loaded"
    assert policy.choose("a cone of ice cream", {"r0": 5, "r1": 0}).kind == "least_loaded"
    # Pinned: the replica holding the stored response, whatever its load.
    assert policy.choose("unrelated", {"r0": 0, "r1": 99}, pinned="r1") == RoutingDecision("r1", "pinned", 0)
    assert policy.choose(history, {"r0": 99, "r1": 0}, pinned="r0") == RoutingDecision("r0", "pinned", len(history))
    # A pinned replica that is gone: routed as usual.
    assert policy.choose(history, {"r1": 0, "r2": 0}, pinned="r0").kind == "least_loaded"
    # A prefix merely shared (not a whole earlier text) is no home, however long.
    policy.record("r2", history + " about the weather")
    assert policy.choose(history + " about the news", {"r0": 9, "r1": 9, "r2": 9}).kind == "prefix"  # r0's whole text
    assert policy.choose(history + " about the news", {"r1": 0, "r2": 0}).kind == "least_loaded"
    # Two replicas were sent the history: the less loaded one.
    policy.record("r1", history)
    assert policy.choose(history + "!", {"r0": 1, "r1": 0}) == RoutingDecision("r1", "prefix", len(history))
    # The only eligible replica, and the history's: "prefix".
    assert policy.choose(history, {"r0": 0, "r2": 3}) == RoutingDecision("r0", "prefix", len(history))


def _asking(text: str) -> Callable[[int], RoutingHint]:
    return lambda index: _chat([{"role": "user", "content": text.format(index)}])


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        pytest.param(_chat([]), _asking("Question {} of a new conversation"), id="empty"),
        pytest.param(
            routing_hint(CHAT, b'{"model": "m"}', "Bearer key-1"),
            _asking("Question {} of a new conversation"),
            id="no messages",
        ),
        pytest.param(
            _chat([{"role": "user", "content": "Hello"}]),
            _asking("Hello, can you help me plan trip {} to Lisbon?"),
            id="short opening",
        ),
        pytest.param(
            _chat([{"role": "user", "content": "Summarize the following article about the economy"}]),
            _asking("Summarize the following article about the economy of country {}"),
            id="message that merely starts another",
        ),
        pytest.param(
            routing_hint(COMPLETIONS, b'{"prompt": "a"}', "Bearer key-1"),
            lambda index: routing_hint(
                COMPLETIONS, json.dumps({"prompt": f"a story ({index}) about a lighthouse"}).encode(), "Bearer key-1"
            ),
            id="short prompt",
        ),
    ],
)
def test_an_earlier_request_that_shares_only_the_header_or_a_fragment_is_no_home(
    earlier: RoutingHint, later: Callable[[int], RoutingHint]
) -> None:
    """The tenant and path (`header`) begin every request of a tenant: a request with
    little or no prompt must not draw all the tenant's later requests to its replica."""
    policy = PrefixAffinityPolicy()
    loads = dict.fromkeys(("r0", "r1", "r2", "r3"), 0)
    policy.record("r0", earlier.text)
    for index in range(4):  # four new conversations of the tenant, on idle replicas
        hint = later(index)
        assert hint.text.startswith(earlier.text[: earlier.header])
        decision = _route(policy, hint, loads)
        assert decision.kind == "least_loaded"
        loads[str(decision.replica)] += 1
    assert loads == dict.fromkeys(loads, 1)


def test_the_header_does_not_count_toward_the_minimum_match() -> None:
    policy = PrefixAffinityPolicy(min_match_chars=8)
    hint = _chat([])
    assert hint.header == 16 + len(CHAT) + 2 and len(hint.text) < hint.header + 8
    policy.record("r0", hint.text)
    other = _chat([{"role": "user", "content": "a new conversation"}])
    assert policy.choose(other.text, {"r0": 0, "r1": 0}).kind == "prefix"  # counting the header, it would draw
    assert policy.choose(other.text, {"r0": 0, "r1": 0}, header=other.header).kind == "least_loaded"
    turn = _chat([{"role": "user", "content": "a new conversation"}, {"role": "assistant", "content": "ok"}])
    policy.record("r1", other.text)
    assert policy.choose(turn.text, {"r0": 0, "r1": 0}, header=turn.header).replica == "r1"  # its earlier turn


def test_new_conversations_on_idle_replicas_spread_evenly() -> None:
    policy = PrefixAffinityPolicy(min_match_chars=4)
    loads = dict.fromkeys(("r0", "r1", "r2", "r3"), 0)
    rng = random.Random(3)
    texts = {"".join(rng.choices("abcdefghij", k=40)) for _ in range(8)}
    assert len({text[:4] for text in texts}) == 8  # unrelated: no shared prefix worth following
    chosen = [policy.choose(text, loads) for text in texts]
    for decision, text in zip(chosen, texts, strict=True):
        policy.record(decision.replica, text)
    assert Counter(decision.replica for decision in chosen) == dict.fromkeys(loads, 2)
    assert all(decision.kind == "least_loaded" for decision in chosen)


def test_new_chat_conversations_of_one_tenant_spread_over_idle_replicas() -> None:
    policy = PrefixAffinityPolicy()
    loads = dict.fromkeys(("r0", "r1", "r2", "r3"), 0)
    rng = random.Random(4)
    counts: Counter[object] = Counter()
    for index in range(8):
        content = f"{'ABCDEFGH'[index]}: {_sentence(rng, 8)}"[:40].ljust(40, ".")
        decision = _route(policy, _chat([{"role": "user", "content": content}]), loads)
        assert decision.kind == "least_loaded"
        counts[decision.replica] += 1
    assert counts == dict.fromkeys(loads, 2)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        PrefixAffinityPolicy(min_match_chars=0)
    with pytest.raises(ValueError):
        PrefixAffinityPolicy(max_imbalance=-1)
    PrefixAffinityPolicy(min_match_chars=1, max_imbalance=0)
    with pytest.raises(ValueError):
        PrefixAffinityPolicy().choose("text", {})
    with pytest.raises(ValueError):
        PrefixAffinityPolicy().choose("text", {}, pinned="r0")


def test_forget_and_capacity_pass_through_to_the_record() -> None:
    policy = PrefixAffinityPolicy(min_match_chars=4)
    policy.record("r0", "some conversation")
    assert policy.choose("some conversation!", {"r0": 0, "r1": 0}).kind == "prefix"
    policy.forget("r0")
    assert policy.choose("some conversation!", {"r0": 0, "r1": 0}).kind == "least_loaded"
    policy.set_capacity("r1", 10)
    policy.record("r1", "some conversation")
    assert policy.tree.chars("r1") <= 10


_LOADS = st.dictionaries(st.sampled_from(("r0", "r1", "r2", "r3")), st.integers(0, 8), min_size=1)


@settings(max_examples=200, deadline=None)
@given(
    min_match=st.integers(1, 4),
    max_imbalance=st.integers(0, 3),
    steps=st.lists(
        st.tuples(SMALL_TEXTS, _LOADS, st.none() | st.sampled_from(("r0", "r1", "gone")), st.integers(0, 3)),
        max_size=30,
    ),
)
def test_the_choice_is_a_given_replica_within_the_load_bound(
    min_match: int, max_imbalance: int, steps: list[tuple[str, dict[str, int], str | None, int]]
) -> None:
    policy = PrefixAffinityPolicy(min_match_chars=min_match, max_imbalance=max_imbalance)
    for text, loads, pinned, header in steps:
        decision = policy.choose(text, loads, pinned=pinned, header=header)
        least = min(loads.values())
        matched = policy.tree.match(text)
        homes = {
            replica: length
            for replica, length in policy.tree.match_whole(text).items()
            if replica in loads and length - header >= min_match
        }
        assert decision.replica in loads
        assert decision.matched_chars == matched.get(decision.replica, 0)
        eligible_homes = {
            replica: length for replica, length in homes.items() if loads[replica] <= least + max_imbalance
        }
        if pinned in loads:
            assert (decision.replica, decision.kind) == (pinned, "pinned")
        elif eligible_homes:
            assert decision.kind == "prefix" and homes[decision.replica] == max(eligible_homes.values())
        else:
            assert decision.kind == ("overloaded" if homes else "least_loaded") and loads[decision.replica] == least
        assert decision.kind == "pinned" or loads[decision.replica] <= least + max_imbalance
        policy.record(decision.replica, text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    min_match=st.integers(24, 64),
    max_imbalance=st.integers(0, 3),
    steps=st.lists(
        st.tuples(
            st.integers(0, 5), st.text(min_size=1, max_size=30), st.lists(st.integers(0, 6), min_size=4, max_size=4)
        ),
        max_size=25,
    ),
    seed=st.integers(0, 2**16),
)
def test_turns_follow_their_replica_unless_it_is_past_the_bound(
    min_match: int, max_imbalance: int, steps: list[tuple[int, str, list[int]]], seed: int
) -> None:
    rng = random.Random(seed)
    policy = PrefixAffinityPolicy(min_match_chars=min_match, max_imbalance=max_imbalance)
    conversations: dict[int, list[dict[str, Any]]] = {}
    served: dict[int, object] = {}
    holders: dict[int, set[object]] = {}
    for index, said, load_list in steps:
        loads = dict(zip(("r0", "r1", "r2", "r3"), load_list, strict=True))
        least = min(loads.values())
        if index in conversations:
            conversations[index] += [
                {"role": "assistant", "content": _sentence(rng, 3)},
                {"role": "user", "content": said},
            ]
        else:
            conversations[index] = [{"role": "user", "content": f"Conversation {index:03d}: {_sentence(rng, 30)}"}]
        decision = _route(policy, _chat(conversations[index]), loads)
        assert loads[decision.replica] <= least + max_imbalance
        if index not in served:
            assert decision.kind == "least_loaded" and loads[decision.replica] == least
        elif loads[served[index]] <= least + max_imbalance:
            assert (decision.replica, decision.kind) == (served[index], "prefix")
        elif any(loads[holder] <= least + max_imbalance for holder in holders[index]):
            # An earlier turn's replica is within the bound: it holds the longest eligible prefix.
            assert decision.kind == "prefix" and decision.replica in holders[index] - {served[index]}
        else:
            assert decision.kind == "overloaded" and loads[decision.replica] == least
        served[index] = decision.replica
        holders.setdefault(index, set()).add(decision.replica)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


DECISION = RoutingDecision("r1", "least_loaded", 0)


def test_a_pending_decision_is_popped_once_by_its_request() -> None:
    pending = PendingDecisions()
    pending.put("a", DECISION, "text a")
    assert pending.pop("b") is None
    assert pending.pop("a") == (DECISION, "text a")
    assert pending.pop("a") is None and len(pending) == 0


def test_a_retried_request_keeps_only_its_latest_decision() -> None:
    pending = PendingDecisions()
    later = RoutingDecision("r2", "prefix", 12)
    pending.put("a", DECISION, "text")
    pending.put("a", later, "text")
    assert len(pending) == 1 and pending.pop("a") == (later, "text")


def test_decisions_of_requests_never_routed_leave_by_age() -> None:
    clock = FakeClock()
    pending = PendingDecisions(max_age_s=60, clock=clock)
    for i in range(1000):  # cancelled before routing: no pop ever comes
        pending.put(f"cancelled-{i}", DECISION, "x" * 100)
    clock.now = 61
    pending.put("live", DECISION, "live text")
    assert len(pending) == 1 and pending.pop("live") == (DECISION, "live text")


def test_pending_decisions_stay_bounded_in_number_oldest_out_first() -> None:
    clock = FakeClock()
    pending = PendingDecisions(max_entries=100, clock=clock)
    for i in range(1_000_000):
        pending.put(str(i), DECISION, "")
    assert len(pending) == 100
    assert pending.pop("999899") is None and pending.pop("999900") == (DECISION, "")


def test_pending_decisions_stay_bounded_in_bytes_with_huge_keys_and_texts() -> None:
    bound = 1_000_000
    pending = PendingDecisions(max_bytes=bound, clock=FakeClock())

    def key(index: int) -> str:
        return f"{index:06d}" + "k" * 100_000  # a request id as large as a client could make one

    for index in range(300):
        text = ("t" if index % 2 else "\U0001f600") * 100_000  # 100 kB, or 400 kB of 4-byte characters
        pending.put(key(index), DECISION, text)
        assert pending.bytes <= bound
    assert 1 <= len(pending) <= 10
    assert pending.pop(key(299)) == (DECISION, "t" * 100_000)  # the newest stays
    assert pending.pop(key(0)) is None  # the oldest went first
    for index in range(300):
        pending.pop(key(index))
    assert len(pending) == 0 and pending.bytes == 0


def test_an_entry_larger_than_the_bound_is_not_kept_and_pushes_nothing_out() -> None:
    pending = PendingDecisions(max_bytes=100_000)
    pending.put("small", DECISION, "text")
    kept = pending.bytes
    pending.put("huge", DECISION, "x" * 200_000)
    assert pending.pop("huge") is None and pending.bytes == kept
    pending.put("small", DECISION, "x" * 200_000)  # a retried request whose new entry does not fit
    assert pending.pop("small") is None and pending.bytes == 0


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 20), st.integers(0, 5_000), st.integers(0, 5_000)), max_size=60
    ),
    bound=st.integers(1, 30_000),
)
def test_pending_bytes_are_the_size_of_what_is_kept(steps: list[tuple[bool, int, int, int]], bound: int) -> None:
    pending = PendingDecisions(max_bytes=bound, clock=FakeClock())
    for put, index, key_size, text_size in steps:
        request_id = str(index) + "k" * key_size
        if put:
            text = "t" * text_size
            pending.put(request_id, DECISION, text)
            size = sys.getsizeof(request_id) + sys.getsizeof(text) + PendingDecisions.ENTRY_OVERHEAD
            assert (pending.pop(request_id) is not None) == (size <= bound)  # kept if it fits at all
            pending.put(request_id, DECISION, text)
        else:
            pending.pop(request_id)
        pending.check_integrity()
        assert 0 <= pending.bytes <= bound


def test_pending_decisions_refuse_unbounded_settings() -> None:
    for kwargs in ({"max_age_s": 0}, {"max_entries": 0}, {"max_age_s": -1.0}, {"max_bytes": 0}):
        with pytest.raises(ValueError):
            PendingDecisions(**kwargs)


def test_a_chained_response_is_pinned_to_the_replica_that_stored_it() -> None:
    from kvchat.server.response_objects import new_id
    from kvchat.server.settings import ServerSettings

    tags = {make_response_tag(f"replica-{index}".encode()): f"r{index}" for index in range(4)}
    assert len(tags) == 4
    for tag in tags:
        ServerSettings(model_name="m", response_id_tag=tag)  # a tag the server accepts
    stored_by = "r2"
    tag = next(tag for tag, replica in tags.items() if replica == stored_by)
    previous = new_id("resp", tag)
    body = {"model": "m", "previous_response_id": previous, "input": "and then?"}
    hint = routing_hint(RESPONSES, json.dumps(body).encode(), "Bearer k")
    assert hint.response_tag == tag
    policy = PrefixAffinityPolicy()
    loads = {"r0": 0, "r1": 0, "r2": 9, "r3": 0}
    decision = policy.choose(hint.text, loads, pinned=tags.get(hint.response_tag or ""), header=hint.header)
    assert (decision.replica, decision.kind) == (stored_by, "pinned")


# -- routing_hint: chat completions ---------------------------------------------------------------

_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _parts(text: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": text[: len(text) // 2]}, {"type": "text", "text": text[len(text) // 2 :]}]


def _turns(style: str) -> list[list[dict[str, Any]]]:
    """Three turns of one conversation, each the last one's messages plus the reply and more."""
    content = _parts if style == "parts" else (lambda text: text)
    system = {"role": "system", "content": content("You are terse.")}
    turns = [[system, {"role": "user", "content": content("What is the weather in Paris?")}]]
    if style == "tool_calls":
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
        turns.append(
            [
                *turns[-1],
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"sky":"clear"}'},
            ]
        )
    else:
        turns.append([*turns[-1], {"role": "assistant", "content": content("Sunny.")}])
        turns[-1].append({"role": "user", "content": content("And in Rome?")})
    turns.append(
        [*turns[-1], {"role": "assistant", "content": content("Clear.")}, {"role": "user", "content": "Thanks"}]
    )
    return turns


@pytest.mark.parametrize("style", ["plain", "parts", "tools", "tool_calls"])
def test_a_chat_turns_text_extends_the_previous_turns(style: str) -> None:
    tools = _TOOLS if style in ("tools", "tool_calls") else None
    texts = [_chat(messages, tools=tools).text for messages in _turns(style)]
    for earlier, later in itertools.pairwise(texts):
        assert later.startswith(earlier) and len(later) > len(earlier)
    assert "Paris" in texts[0] and "Thanks" in texts[-1]
    if tools:
        assert "get_weather" in texts[0]


def test_the_text_distinguishes_what_the_prompt_distinguishes() -> None:
    def call(name: str, arguments: str) -> dict[str, Any]:
        function = {"name": name, "arguments": arguments}
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": function}],
        }

    user = {"role": "user", "content": "Weather?"}
    texts = [
        _chat([user]).text,
        _chat([user], tools=_TOOLS).text,
        _chat([{"role": "system", "content": "Weather?"}]).text,
        _chat([user, call("get_weather", '{"city":"Paris"}')]).text,
        _chat([user, call("get_weather", '{"city":"Rome"}')]).text,
        _chat([user, call("get_time", '{"city":"Paris"}')]).text,
        _chat([user], key="another key").text,
    ]
    assert len(set(texts)) == len(texts)
    assert _chat([{"role": "user", "content": _parts("Weather?")}]).text == texts[0]  # parts read as their text


_CONTENT = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.lists(st.builds(lambda text: {"type": "text", "text": text}, st.text(max_size=10)), max_size=3),
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _CONTENT},
    optional={
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "id": st.text(max_size=5),
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries({"name": st.text(max_size=8), "arguments": st.text(max_size=20)}),
                }
            ),
            max_size=2,
        ),
        "name": st.text(max_size=5),
    },
)


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(_MESSAGE, max_size=8), cut=st.integers(0, 8), tools=st.none() | st.just(_TOOLS))
def test_a_prefix_of_the_messages_gives_a_prefix_of_the_text(
    messages: list[dict[str, Any]], cut: int, tools: list[Any] | None
) -> None:
    earlier, later = _chat(messages[:cut], tools=tools), _chat(messages, tools=tools)
    assert later.text.startswith(earlier.text)
    assert earlier.header == later.header and earlier.response_tag is None


def test_the_header_covers_the_tenant_and_the_path() -> None:
    hint = routing_hint(CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}', "Bearer k")
    tenant = hashlib.sha256(b"Bearer k").hexdigest()[:16]
    assert hint.text.startswith(tenant) and CHAT in hint.text[: hint.header]
    assert "hi" not in hint.text[: hint.header] and "hi" in hint.text[hint.header :]
    assert routing_hint(CHAT, b"[]", "Bearer k").header <= hint.header
    assert routing_hint(COMPLETIONS, b"{}", "Bearer k").text[: hint.header] != hint.text[: hint.header]
    assert routing_hint(CHAT, b"{}", None).text == routing_hint(CHAT, b"{}", "").text  # no key: one tenant


def test_a_messages_turn_continues_the_text_of_the_turn_before() -> None:
    """Anthropic's Messages API: the tools, the system prompt (a string or text blocks)
    and the messages, in order, so a session's next call extends this call's text."""
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    system = [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}]
    first = [{"role": "user", "content": "Run ls."}]
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt"}]}

    def hint(messages: list[dict[str, Any]], key: str = "k") -> Any:
        body = {"model": "m", "max_tokens": 8, "tools": tools, "system": system, "messages": messages}
        return routing_hint(MESSAGES, json.dumps(body).encode(), key)

    earlier, later = hint(first), hint([*first, call, result])
    assert later.text.startswith(earlier.text) and later.text != earlier.text
    assert "You are a coding agent." in earlier.text and "Run ls." in earlier.text and "a.txt" in later.text
    assert earlier.text.index("Bash") < earlier.text.index("You are a coding agent.") < earlier.text.index("Run ls.")
    assert hint(first, key="other").text[: earlier.header] != earlier.text[: earlier.header]


# -- routing_hint: responses and completions ------------------------------------------------------


def test_responses_read_instructions_tools_and_input_in_order() -> None:
    def hint(items: list[Any] | str, **extra: Any) -> RoutingHint:
        body = {"model": "m", "instructions": "Be brief.", "tools": _TOOLS, "input": items, **extra}
        return routing_hint(RESPONSES, json.dumps(body).encode(), "Bearer k")

    first = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}]
    second = [
        *first,
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": '{"sky":"clear"}'},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Clear."}]},
        {"role": "user", "content": "Thanks"},
    ]
    texts = [hint(first).text, hint(second).text]
    assert texts[1].startswith(texts[0])
    for piece in ("Be brief.", "get_weather", "Weather in Paris?", '{"city":"Paris"}', '{"sky":"clear"}', "Thanks"):
        assert piece in texts[1]
    assert texts[1].index("Be brief.") < texts[1].index("Weather in Paris?") < texts[1].index("Thanks")
    assert "Weather in Paris?" in hint("Weather in Paris?").text
    assert hint(first).response_tag is None
    resp_id = "resp_" + "0123abcd" + "f" * 40
    assert hint("More?", previous_response_id=resp_id).response_tag == "0123abcd"
    assert hint("More?", previous_response_id="resp_foreign").response_tag is None


def test_completions_read_the_prompt() -> None:
    def hint(prompt: Any) -> RoutingHint:
        return routing_hint(COMPLETIONS, json.dumps({"model": "m", "prompt": prompt}).encode(), "Bearer k")

    text = hint("Once upon a time").text
    assert text.endswith("Once upon a time") and hint("Once upon a time, there").text.startswith(text)
    assert hint(["Once upon a time", "Another prompt"]).text == text  # several prompts: routed by the first
    tokens = list(range(100, 200))
    assert hint(tokens).text != hint([100, *range(300, 399)]).text  # a token prompt is all its tokens
    longer = hint([*tokens, 7, 8, 9])
    held = PrefixAffinityPolicy()
    held.record("r0", hint(tokens).text)
    assert held.tree.match(longer.text)["r0"] >= len(hint(tokens).text) - 1
    assert hint([tokens, [1, 2]]).text == hint(tokens).text
    assert hint([]).text.startswith(hint("").text[: hint("").header])


# -- response tags --------------------------------------------------------------------------------


def test_make_response_tag_gives_eight_hex_digits_per_seed() -> None:
    tags = {make_response_tag(f"replica-{index}".encode()) for index in range(50)}
    assert len(tags) == 50
    assert all(len(tag) == 8 and set(tag) <= set("0123456789abcdef") for tag in tags)
    assert make_response_tag(b"same") == make_response_tag(b"same")
    assert len(make_response_tag(b"")) == 8


@settings(max_examples=200, deadline=None)
@given(digits=st.text(alphabet="0123456789abcdef", min_size=48, max_size=48))
def test_response_tag_reads_the_first_eight_digits_of_a_replicas_id(digits: str) -> None:
    assert response_tag("resp_" + digits) == digits[:8]


@pytest.mark.parametrize(
    "foreign",
    [
        "",
        "resp_",
        "resp_abc",
        "resp_" + "a" * 47,
        "resp_" + "a" * 49,
        "msg_" + "a" * 48,
        "RESP_" + "a" * 48,
        "xresp_" + "a" * 47,
        "resp_" + "z" * 48,  # not hex: no replica made it
        "resp_" + "ABCDEF12" * 6,  # replicas write lowercase hex
        "resp_" + "0123abcd" + " " * 40,
        "resp_" + "é" * 48,
    ],
)
def test_response_tag_is_none_for_foreign_ids(foreign: str) -> None:
    assert response_tag(foreign) is None


# -- routing_hint: hostile bodies -----------------------------------------------------------------


def _deep(depth: int, inner: str = '"x"') -> str:
    return "[" * depth + inner + "]" * depth


def _deep_parts(depth: int) -> str:
    return '[{"type": "text", "text": ' * depth + '"x"' + "}]" * depth


def _messages(content: str) -> bytes:
    return ('{"model": "m", "messages": [{"role": "user", "content": ' + content + "}]}").encode()


HOSTILE_BODIES = {
    "invalid json": b"{not json",
    "truncated": b'{"messages": [',
    "array": b'[{"role": "user", "content": "hi"}]',
    "string": b'"hello"',
    "number": b"12",
    "null": b"null",
    "whitespace": b"   ",
    "not utf-8": b"\xff\xfe\xfa{}",
    "nul bytes": b"\x00\x00\x00{",
    "deep array body": _deep(5_000).encode(),
    "deep content lists": _messages(_deep(5_000)),
    "deep content dicts": _messages('{"a": ' * 5_000 + "1" + "}" * 5_000),
    "deep content parts": _messages(_deep_parts(5_000)),
    "parts too deep to read, shallow enough to parse": _messages(_deep_parts(400)),
    "lists shallow enough to parse": _messages(_deep(900)),
    "deep tools": ('{"tools": ' + _deep(5_000) + ', "messages": []}').encode(),
    "deep tools, parseable": ('{"tools": ' + _deep(900) + ', "messages": []}').encode(),
    "deep role": ('{"messages": [{"role": ' + _deep(900) + "}]}").encode(),
    "messages a string": b'{"messages": "hi"}',
    "messages a dict": b'{"messages": {"role": "user", "content": "hi"}}',
    "messages a number": b'{"messages": 5}',
    "odd messages": b'{"messages": [1, "x", null, [], true, {"role": 5, "content": 7}, {"content": {"a": [1]}}]}',
    "odd parts": b'{"messages": [{"role": "user", "content": [{"text": 5}, {"content": null}, {}, {"text": [{}]}]}]}',
    "odd tool calls": b'{"messages": [{"role": "assistant", "tool_calls": 5}, {"role": "tool", "tool_calls": [1]}]}',
    "numbers for strings": b'{"model": 1, "tools": 2, "messages": [{"role": 3, "content": 4, "name": 5}], "input": 6,'
    b' "instructions": 7, "previous_response_id": 8, "prompt": 9}',
    "odd responses": b'{"input": {"role": 1}, "instructions": [1], "previous_response_id": ["resp_"], "tools": "x"}',
    "odd prompts": b'{"prompt": [null, 1]}',
    "empty prompt list": b'{"prompt": []}',
    "nested prompt": b'{"prompt": [[[[1]]]]}',
    "huge number": b'{"messages": ' + b"9" * 5_000 + b"}",
    "non-finite": b'{"messages": [{"role": "user", "content": NaN}, {"role": "user", "content": [Infinity]}]}',
    "lone surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}], "prompt": "\\udfff"}',
    "duplicate keys": b'{"messages": [], "messages": 3}',
}


@pytest.mark.parametrize("path", [CHAT, RESPONSES, COMPLETIONS, "/v1/embeddings"])
@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_never_raise(name: str, path: str) -> None:
    hint = routing_hint(path, HOSTILE_BODIES[name], "Bearer k")
    assert isinstance(hint, RoutingHint) and isinstance(hint.text, str)
    assert hint.text.startswith(hashlib.sha256(b"Bearer k").hexdigest()[:16])
    assert 0 < hint.header <= len(hint.text) and hint.response_tag is None
    policy = PrefixAffinityPolicy()
    decision = policy.choose(hint.text, {"r0": 0, "r1": 1}, header=hint.header)
    policy.record(decision.replica, hint.text)
    assert policy.tree.match(hint.text) == {decision.replica: len(hint.text)}


def test_a_ten_megabyte_message_routes_quickly() -> None:
    content = "0123456789" * 1_000_000
    started = time.monotonic()
    hint = _chat([{"role": "user", "content": content}, {"role": "user", "content": _parts(content)}])
    assert hint.text.count(content) == 2
    policy = PrefixAffinityPolicy()
    policy.record("r0", hint.text)
    assert policy.choose(hint.text + "x", {"r0": 0, "r1": 0}, header=hint.header).kind == "prefix"
    assert routing_hint(COMPLETIONS, json.dumps({"prompt": [content]}).encode(), None).text.endswith(content)
    assert time.monotonic() - started < 5


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)
_KEYS = st.sampled_from(
    ["messages", "tools", "input", "instructions", "previous_response_id", "prompt", "role", "content", "text"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from([CHAT, RESPONSES, COMPLETIONS, "/other"]),
    body=st.dictionaries(_KEYS, _JSON, max_size=6) | _JSON,
    authorization=st.none() | st.text(max_size=30),
)
def test_any_json_body_gives_a_hint(path: str, body: Any, authorization: str | None) -> None:
    hint = routing_hint(path, json.dumps(body).encode(), authorization)
    assert isinstance(hint.text, str) and 16 <= hint.header <= len(hint.text)
    assert hint.response_tag is None or len(hint.response_tag) == 8


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200))
def test_any_bytes_give_a_hint(body: bytes) -> None:
    assert routing_hint(CHAT, body, "Bearer k").text.startswith(hashlib.sha256(b"Bearer k").hexdigest()[:16])


# -- stored responses: every request about one reaches the replica that stored it -----------------


def test_a_stored_responses_path_names_the_replica_that_made_its_id() -> None:
    from kvchat.server.response_objects import new_id
    from kvchat.server.settings import ServerSettings

    replicas = [f"kvchat-replica#{index:08x}" for index in range(8)]
    tags = {replica_response_tag(replica): replica for replica in replicas}
    assert len(tags) == len(replicas)
    tenant = hashlib.sha256(b"Bearer k").hexdigest()[:16]
    for tag, replica in tags.items():
        ServerSettings(model_name="m", response_id_tag=tag)  # a tag the replica's server accepts
        stored = new_id("resp", tag)
        for path in (f"/v1/responses/{stored}", f"/v1/responses/{stored}/input_items"):
            hint = routing_hint(path, b"not json: a GET or DELETE body is not read", "Bearer k")
            assert hint == RoutingHint(tenant, tag, header=len(tenant))
            assert tags[hint.response_tag or ""] == replica
    for foreign in ("resp_abc", "", "resp_" + "A" * 48, "msg_" + "a" * 48):
        assert routing_hint(f"/v1/responses/{foreign}", b"", "Bearer k").response_tag is None


class _Replica:
    """What a Ray Serve request router reads of a candidate replica."""

    def __init__(self, key: str) -> None:
        self.replica_id = type("ReplicaID", (), {"unique_id": key})()
        self.routing_stats = {"capacity_tokens": 4096}


class _Request:
    def __init__(self, hint: RoutingHint, request_id: str) -> None:
        self.args = ["forwarded request", hint]
        self.kwargs: dict[str, Any] = {}
        self.metadata = type("RequestMetadata", (), {"internal_request_id": request_id})()


def _router(kind: str) -> Any:
    """A router with its state but not Ray's (which needs a running Serve)."""
    pytest.importorskip("ray")
    from kvchat.server.ray_serve.router import LoadBalancedRouter, PrefixAffinityRouter, RouterBook

    router: Any = object.__new__(PrefixAffinityRouter if kind == "prefix" else LoadBalancedRouter)
    router.book = RouterBook()
    router.policy = PrefixAffinityPolicy()
    router._pending = PendingDecisions()
    router._replica_queue_len_cache = {}
    return router


@pytest.mark.parametrize("kind", ["prefix", "default"])
def test_the_router_sends_a_stored_responses_requests_only_to_its_replica(kind: str) -> None:
    import asyncio

    from kvchat.server.response_objects import new_id

    router = _router(kind)
    replicas = [_Replica(f"replica-{index}") for index in range(4)]
    owner = replicas[2]
    router.book.in_flight.update({"replica-2": 50})  # far past the load bound: still the only one
    stored = new_id("resp", replica_response_tag("replica-2"))
    for index, (path, body) in enumerate(
        [
            (f"/v1/responses/{stored}", b""),  # GET or DELETE
            (RESPONSES, json.dumps({"previous_response_id": stored, "input": "And then?"}).encode()),
        ]
    ):
        request = _Request(routing_hint(path, body, "Bearer k"), f"request-{index}")
        ranks = asyncio.run(router.choose_replicas(replicas, request))
        assert ranks == [[owner]]  # no fallback to another replica when it is full: wait for it


def test_the_router_falls_back_to_other_replicas_for_a_new_conversation() -> None:
    import asyncio

    router = _router("prefix")
    replicas = [_Replica(f"replica-{index}") for index in range(3)]
    request = _Request(routing_hint(CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}', "Bearer k"), "r")
    ranks = asyncio.run(router.choose_replicas(replicas, request))
    assert (
        len(ranks) == 2 and len(ranks[0]) == 1 and sorted(map(id, [*ranks[0], *ranks[1]])) == sorted(map(id, replicas))
    )


# -- the ingress: refused from the headers, before the body is read -------------------------------


def _access(**options: Any) -> Any:
    from kvchat.server.ray_serve.access import IngressAccess

    return IngressAccess(**{"api_keys": ("key-one", "key-two"), "max_body_bytes": 1000, **options})


GOOD = {"host": "127.0.0.1:8000", "authorization": "Bearer key-two"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("POST", CHAT, GOOD, None, None),
        ("POST", CHAT, {**GOOD, "authorization": "bearer  key-one "}, None, None),
        ("GET", "/v1/models", GOOD, None, None),
        ("POST", CHAT, {"host": "localhost"}, 401, "invalid_api_key"),
        ("POST", CHAT, {**GOOD, "authorization": "Bearer key-three"}, 401, "invalid_api_key"),
        ("POST", CHAT, {**GOOD, "authorization": "Basic key-one"}, 401, "invalid_api_key"),
        ("POST", CHAT, {**GOOD, "authorization": "Bearer "}, 401, "invalid_api_key"),
        ("DELETE", "/v1/responses/resp_x", {"host": "[::1]"}, 401, "invalid_api_key"),
        ("GET", "/v1", {"host": "localhost"}, 401, "invalid_api_key"),
        ("OPTIONS", CHAT, {"host": "localhost"}, None, None),  # a CORS preflight carries no key
        ("GET", "/other", {"host": "localhost"}, None, None),  # not the API: the replica answers 404
        ("POST", CHAT, {**GOOD, "host": "evil.example"}, 403, "host_not_allowed"),
        ("POST", CHAT, {"host": "evil.example"}, 403, "host_not_allowed"),  # the Host is checked first
        ("POST", CHAT, {"authorization": "Bearer key-one"}, 403, "host_not_allowed"),  # no Host at all
        ("POST", CHAT, {**GOOD, "content-length": "1000"}, None, None),
        ("POST", CHAT, {**GOOD, "content-length": "1001"}, 413, "request_too_large"),
        ("POST", CHAT, {"host": "localhost", "content-length": "99999"}, 401, "invalid_api_key"),
        # Anthropic's clients send the key as x-api-key; either credential may be the valid one.
        ("POST", MESSAGES, {"host": "localhost", "x-api-key": "key-one"}, None, None),
        ("POST", MESSAGES, {"host": "localhost", "x-api-key": " key-two "}, None, None),
        ("POST", MESSAGES, {"host": "localhost", "x-api-key": "key-three"}, 401, "invalid_api_key"),
        ("POST", MESSAGES, {"host": "localhost", "x-api-key": ""}, 401, "invalid_api_key"),
        ("POST", MESSAGES, {**GOOD, "x-api-key": "key-three"}, None, None),
        ("POST", MESSAGES, {"host": "localhost", "authorization": "Bearer no", "x-api-key": "key-one"}, None, None),
    ],
)
def test_the_ingress_refuses_from_the_headers_alone(
    method: str, path: str, headers: dict[str, str], status: int | None, code: str | None
) -> None:
    refused = _access().refusal(method, path, headers)
    assert (refused and (refused.status, refused.code)) == ((status, code) if status else None)


def test_the_ingress_without_keys_checks_only_the_host() -> None:
    access = _access(api_keys=(), allowed_hosts=("kvchat.example.com", "*.internal"))
    for host in ("kvchat.example.com", "KVChat.example.com:443", "a.b.internal", "127.0.0.5", "localhost."):
        assert access.refusal("POST", CHAT, {"host": host}) is None
        assert access.host_refusal({"host": host}) is None
    for host in ("example.com", "internal", "kvchat.example.com.evil", "", "a b"):
        refused = access.refusal("POST", CHAT, {"host": host})
        assert refused is not None and refused.status == 403
    assert _access(allowed_hosts=("*",)).host_refusal({}) is None


@pytest.mark.parametrize("path", [CHAT, "/v1/responses", MESSAGES, MESSAGES + "/count_tokens"])
def test_the_ingress_answers_each_api_in_its_own_error_shape(path: str) -> None:
    pytest.importorskip("ray")
    from ray.exceptions import ActorUnavailableError

    from kvchat.server.ray_serve.ingress import _Counts, _queue_full, _relay, _unavailable

    anthropic = path.startswith(MESSAGES)
    for response, status in ((_queue_full(3, path), 429), (_unavailable(3, path), 503)):
        body = json.loads(response.body)
        assert response.status_code == status and response.headers["retry-after"] == "3"
        if anthropic:  # what the anthropic client parses
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        else:
            assert set(body["error"]) == {"message", "type", "param", "code"}

    class Dying:  # a replica's stream that dies after its first chunk
        cancelled = False

        def __aiter__(self):
            return self

        async def __anext__(self):
            raise ActorUnavailableError("the replica died", None)

        def cancel(self) -> None:
            self.cancelled = True

    async def relayed(stream: Dying, counts: _Counts) -> bytes:
        return b"".join([chunk async for chunk in _relay(b"data: first\n\n", stream, path, counts)])

    stream, counts = Dying(), _Counts()
    sent = asyncio.run(relayed(stream, counts)).decode()
    assert sent.startswith("data: first\n\n") and stream.cancelled and counts.failed == 1
    last = sent.split("\n\n")[1]
    if anthropic:
        event, data = last.split("\n")
        assert event == "event: error"
        # A 503's type, which Anthropic's clients retry on.
        assert json.loads(data.removeprefix("data: "))["error"]["type"] == "overloaded_error"
    elif path.endswith("responses"):
        assert last.startswith("event: error\n") and '"code": "replica_unavailable"' in last
    else:
        assert json.loads(last.removeprefix("data: "))["error"]["code"] == "replica_unavailable"
        assert sent.endswith("data: [DONE]\n\n")


# -- the Serve application's bounds and Host names (built, not run) -------------------------------


def test_build_app_bounds_the_handles_queue_and_sizes_the_ingress() -> None:
    pytest.importorskip("ray")
    from kvchat.engine import EngineSettings
    from kvchat.server.ray_serve.app import INGRESS_SPARE_REQUESTS, build_app
    from kvchat.server.ray_serve.ingress import IngressOptions
    from kvchat.server.settings import ServerSettings

    settings = ServerSettings(model_name="m", api_keys=("k",), max_queued=8, allowed_hosts=("a.example",))
    engine = EngineSettings(max_running=3)
    for queued, expected in ((None, 8), (5, 5)):
        app = build_app(
            "m", server_settings=settings, engine_settings=engine, num_replicas=2, max_queued_requests=queued
        )
        ingress = app._bound_deployment
        replicas = ingress.init_args[0]._bound_deployment
        assert (replicas.max_ongoing_requests, replicas.max_queued_requests) == (3 + 8, expected)
        assert ingress.max_ongoing_requests == 2 * (3 + 8) + expected + INGRESS_SPARE_REQUESTS
        assert ingress.max_queued_requests == expected and ingress.backpressure_config.status_code == 429
        options = ingress.init_args[1]
        assert isinstance(options, IngressOptions)
        assert (options.api_keys, options.allowed_hosts, options.max_body_bytes) == (("k",), ("a.example",), 4 << 20)
    no_queue = build_app("m", server_settings=ServerSettings(model_name="m", max_queued=0), engine_settings=engine)
    assert no_queue._bound_deployment.init_args[0]._bound_deployment.max_queued_requests == 1  # Ray's least
    with pytest.raises(ValueError, match="max_queued_requests"):
        build_app("m", server_settings=settings, max_queued_requests=0)


@pytest.mark.parametrize(
    ("host", "added"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("kvchat.example.com", "kvchat.example.com"),
        ("fe80::1", "[fe80::1]"),
        ("127.0.0.1", None),  # loopback: always allowed
        ("localhost", None),
        ("::1", None),
        ("0.0.0.0", None),  # every address: only the names the operator allows
        ("::", None),
    ],
)
def test_kvchat_serve_ray_allows_the_host_it_binds(host: str, added: str | None) -> None:
    pytest.importorskip("ray")
    from typer.testing import CliRunner

    from kvchat.cli import app as cli
    from kvchat.cli.runtime import Runtime
    from kvchat.server.middleware import HostCheck

    built: dict[str, Any] = {}
    runtime = Runtime(
        build_ray_app=lambda model, **options: built.update(options) or "application",
        run_ray=lambda application, **options: built.update(run=(application, options)),
    )
    args = ["serve", "--ray", "--host", host, "--allowed-host", "other.example"]
    result = CliRunner().invoke(cli, args, obj=runtime)
    assert result.exit_code == 0, result.output
    allowed = built["server_settings"].allowed_hosts
    assert allowed == ("other.example",) + ((added,) if added else ())
    assert built["run"] == ("application", {"host": host, "port": 8000, "address": None})
    check = HostCheck(None, allowed)  # type: ignore[arg-type]
    if added:
        assert check.allows(f"{added}:8000")  # what a client that connects to `host` sends
    assert not check.allows("evil.example")


def test_allow_bound_host_adds_a_name_once() -> None:
    pytest.importorskip("ray")
    from kvchat.server.ray_serve.app import allow_bound_host
    from kvchat.server.settings import ServerSettings

    settings = allow_bound_host(ServerSettings(model_name="m", allowed_hosts=("Box.LAN",)), "box.lan")
    assert settings.allowed_hosts == ("box.lan",)
    assert allow_bound_host(settings, "10.0.0.7").allowed_hosts == ("box.lan", "10.0.0.7")
