"""The state store's index: lookups that do not grow with unrelated entries, and
answers equal to a scan of every entry (no model needed)."""

from __future__ import annotations

import random
from pathlib import Path

from kvchat.engine.radix import common_prefix_length
from kvchat.engine.state_store import SpilledState, StateStore

SYSTEM = tuple(range(1000, 1040))  # a system prompt every conversation starts with


def conversation(seed: int, length: int = 60) -> tuple[int, ...]:
    rng = random.Random(seed)
    return SYSTEM + (100_000 + seed,) + tuple(rng.randrange(50_000) for _ in range(length))


def test_best_match_does_not_examine_unrelated_entries() -> None:
    store = StateStore(ram_budget_bytes=1 << 30)
    mine = conversation(0)
    store.put(SpilledState(mine, "alice", b"x"))
    query = mine + (7, 8, 9)
    assert store.best_match(query, namespace="alice").length == len(mine)  # type: ignore[union-attr]
    alone = store.index_steps
    # Thousands of other entries: other tenants' copies of the same conversation, other
    # conversations after the same system prompt, and prompts that start elsewhere.
    for i in range(1, 2001):
        store.put(SpilledState(mine, f"tenant {i}", b"x"))
        store.put(SpilledState(conversation(i), "alice", b"x"))
        store.put(SpilledState((200_000 + i,) + mine, "alice", b"x"))
    assert store.stats().ram_entries == 6001
    match = store.best_match(query, namespace="alice")
    assert match is not None and match.entry_tokens == mine and match.length == len(mine)
    assert store.index_steps <= alone + 1  # the split after the system prompt adds one node
    # Storing is a walk too: a prefix of a stored entry is found without a scan.
    store.put(SpilledState(mine[:50], "alice", b"y"))
    assert store.index_steps <= alone + 1 and store.stats().ram_entries == 6001


def test_index_answers_as_a_scan_of_every_entry_would(tmp_path: Path) -> None:
    rng = random.Random(1)
    store = StateStore(ram_budget_bytes=600, disk_dir=tmp_path, disk_budget_bytes=4000)

    def random_tokens() -> tuple[int, ...]:
        return tuple(rng.randrange(3) for _ in range(rng.randrange(1, 9)))

    def scan(query: tuple[int, ...], namespace: str | None) -> tuple[int, bool, int] | None:
        ranks = [
            (common_prefix_length(e.tokens, query), tier == "ram", e.last_used)
            for tier, entries in (("ram", store._ram), ("disk", store._disk))
            for e in entries.values()
            if e.namespace == namespace
        ]
        best = max(ranks, default=None)
        return best if best is not None and best[0] > 0 else None

    for step in range(1500):
        namespace = rng.choice([None, "alice", "bob"])
        action = rng.random()
        if action < 0.5:
            store.put(SpilledState(random_tokens(), namespace, bytes(rng.randrange(20, 120))))
        elif action < 0.8 and (match := store.best_match(random_tokens(), namespace=namespace)) is not None:
            store.load(match)
        elif action < 0.82:
            store.flush_to_disk()
        query = random_tokens()
        match = store.best_match(query, namespace=namespace)
        expected = scan(query, namespace)
        if expected is None:
            assert match is None, step
        else:
            assert match is not None, step
            entry = (store._ram if match.tier == "ram" else store._disk)[match.key]
            assert (match.length, match.tier == "ram", entry.last_used) == expected, step
    stats = store.stats()
    assert stats.ram_tokens == sum(len(e.tokens) for e in store._ram.values())
    assert stats.disk_tokens == sum(len(e.tokens) for e in store._disk.values())
    assert stats.spills_to_disk > 100 and stats.dropped > 100  # both tiers were busy
