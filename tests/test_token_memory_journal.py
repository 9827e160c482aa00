"""GeneratedTokenMemory's journal: the exact reply ids survive a restart, even a crash."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from kvchat.chat.history import GeneratedTokenMemory
from kvchat.errors import InvalidRequestError


def test_entries_survive_a_restart(tmp_path) -> None:
    journal = tmp_path / "memory.jsonl"
    memory = GeneratedTokenMemory(journal=journal)
    memory.remember("Hello there!", [10, 11, 12])
    memory.remember("Second reply", [20, 21])
    memory.remember("Hello there!", [13, 14])  # newer ids for the same text win
    again = GeneratedTokenMemory(journal=journal)  # a new process: nothing held in RAM
    assert again.lookup("Hello there!") == (13, 14)
    assert again.lookup("Second reply") == (20, 21)
    # Loading compacted the journal to one line per entry (on the memory's own thread).
    assert again.wait_for_compaction(timeout=30)
    assert len(journal.read_text().splitlines()) == 2


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path, caplog) -> None:
    journal = tmp_path / "memory.jsonl"
    GeneratedTokenMemory(journal=journal).remember("kept", [1, 2])
    with journal.open("a") as f:
        f.write('["cut short", [3, 4')  # the process died mid-write
    with caplog.at_level(logging.WARNING, logger="kvchat.chat.history"):
        again = GeneratedTokenMemory(journal=journal)
    assert again.lookup("kept") == (1, 2) and again.lookup("cut short") is None
    assert "skipped 1 unreadable line" in caplog.text
    again.remember("after", [5])
    assert again.wait_for_compaction(timeout=30)
    assert [json.loads(line)[0] for line in journal.read_text().splitlines()] == ["kept", "after"]


def test_the_journal_keeps_only_max_entries_after_a_restart(tmp_path) -> None:
    journal = tmp_path / "memory.jsonl"
    memory = GeneratedTokenMemory(max_entries=3, journal=journal)
    for i in range(10):
        memory.remember(f"reply {i}", [i + 1])
    assert memory.wait_for_compaction(timeout=30)
    again = GeneratedTokenMemory(max_entries=3, journal=journal)
    assert len(again) == 3 and again.lookup("reply 9") == (10,) and again.lookup("reply 6") is None
    assert again.wait_for_compaction(timeout=30)
    assert len(journal.read_text().splitlines()) == 3


def test_an_unwritable_journal_costs_only_the_persistence(tmp_path, caplog) -> None:
    journal = tmp_path / "missing-dir" / "memory.jsonl"
    memory = GeneratedTokenMemory(journal=journal)
    with caplog.at_level(logging.WARNING, logger="kvchat.chat.history"):
        memory.remember("text", [1])
    assert memory.lookup("text") == (1,)
    assert "cannot append to the generated-token journal" in caplog.text


# -- tenants -------------------------------------------------------------------------------------


def test_namespaces_do_not_see_each_others_replies() -> None:
    memory = GeneratedTokenMemory()
    memory.remember("Hello there!", [1, 2], namespace="alice")
    assert memory.lookup("Hello there!", namespace="alice") == (1, 2)
    assert memory.lookup("Hello there!", namespace="bob") is None
    assert memory.lookup("Hello there!") is None  # the default namespace is one more tenant
    memory.remember("Hello there!", [3], namespace="bob")
    assert memory.lookup("Hello there!", namespace="alice") == (1, 2)
    memory.forget("Hello there!", namespace="bob")
    assert memory.lookup("Hello there!", namespace="alice") == (1, 2)


def test_one_namespace_filling_its_memory_does_not_evict_anothers() -> None:
    memory = GeneratedTokenMemory(max_entries=3)
    memory.remember("mine", [1], namespace="alice")
    for i in range(100):
        memory.remember(f"reply {i}", [i + 1], namespace="bob")
    assert memory.lookup("mine", namespace="alice") == (1,)
    assert memory.lookup("reply 99", namespace="bob") == (100,) and memory.lookup("reply 96", namespace="bob") is None
    assert len(memory) == 4  # 3 of bob's, 1 of alice's


def test_the_least_recently_used_namespace_goes_beyond_max_namespaces() -> None:
    memory = GeneratedTokenMemory(max_entries=2, max_namespaces=2)
    memory.remember("a", [1], namespace="alice")
    memory.remember("b", [2], namespace="bob")
    assert memory.lookup("a", namespace="alice") == (1,)  # bob is now the least recently used
    memory.remember("c", [3], namespace="carol")
    assert memory.lookup("b", namespace="bob") is None
    assert memory.lookup("a", namespace="alice") == (1,) and memory.lookup("c", namespace="carol") == (3,)
    with pytest.raises(InvalidRequestError):
        GeneratedTokenMemory(max_namespaces=0)


def test_namespaces_survive_a_restart(tmp_path) -> None:
    journal = tmp_path / "memory.jsonl"
    memory = GeneratedTokenMemory(journal=journal)
    memory.remember("same text", [1], namespace="alice")
    memory.remember("same text", [2], namespace="bob")
    memory.remember("same text", [3])
    again = GeneratedTokenMemory(journal=journal)
    assert [again.lookup("same text", namespace=n) for n in ("alice", "bob", None)] == [(1,), (2,), (3,)]


# -- the journal's size, mode and content ---------------------------------------------------------


def test_the_journal_stays_bounded_while_running(tmp_path) -> None:
    journal = tmp_path / "memory.jsonl"
    memory = GeneratedTokenMemory(max_entries=5, journal=journal)
    longest = 0
    for i in range(500):
        memory.remember(f"reply {i % 40}", [i + 1], namespace=f"tenant {i % 2}")
        assert memory.wait_for_compaction(timeout=30)
        longest = max(longest, len(journal.read_text().splitlines()))
    assert len(memory) == 10
    assert longest <= 2 * len(memory) + 1  # compacted once it held twice the live entries
    again = GeneratedTokenMemory(max_entries=5, journal=journal)
    assert again.lookup("reply 19", namespace="tenant 1") == (500,)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_the_journal_is_readable_by_its_owner_only(tmp_path, umask: int) -> None:
    journal = tmp_path / "memory.jsonl"
    old = os.umask(umask)
    try:
        memory = GeneratedTokenMemory(max_entries=1, journal=journal)
        memory.remember("secret reply", [1])
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
        for i in range(5):  # compactions replace the file
            memory.remember(f"secret {i}", [i + 1])
        assert memory.wait_for_compaction(timeout=30)
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_an_older_world_readable_journal_is_made_private(tmp_path) -> None:
    journal = tmp_path / "memory.jsonl"
    journal.write_text(json.dumps(["old reply", [1, 2]]) + "\n")
    journal.chmod(0o644)
    assert GeneratedTokenMemory(journal=journal).lookup("old reply") == (1, 2)  # the old line format still reads
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600


def test_journal_ids_outside_the_vocabulary_are_dropped_at_load(tmp_path, caplog) -> None:
    journal = tmp_path / "memory.jsonl"
    lines = [["good", [1, 99]], ["too big", [1, 100]], ["negative", [-1]], ["bool", [True]], ["float", [1.5]]]
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level(logging.WARNING, logger="kvchat.chat.history"):
        memory = GeneratedTokenMemory(journal=journal, n_vocab=100)
    assert memory.lookup("good") == (1, 99) and len(memory) == 1
    assert "outside the vocabulary" in caplog.text or "unreadable" in caplog.text
    assert "dropped 2 " in caplog.text  # "too big" and "negative"; a bool or float id is unreadable
    with pytest.raises(InvalidRequestError):
        memory.remember("bad", [100])
