"""GeneratedTokenMemory's journal: the exact reply ids survive a restart, even a crash."""

from __future__ import annotations

import json
import logging

from kvchat.chat.history import GeneratedTokenMemory


def test_entries_survive_a_restart(tmp_path) -> None:
    journal = tmp_path / "memory.jsonl"
    memory = GeneratedTokenMemory(journal=journal)
    memory.remember("Hello there!", [10, 11, 12])
    memory.remember("Second reply", [20, 21])
    memory.remember("Hello there!", [13, 14])  # newer ids for the same text win
    again = GeneratedTokenMemory(journal=journal)  # a new process: nothing held in RAM
    assert again.lookup("Hello there!") == (13, 14)
    assert again.lookup("Second reply") == (20, 21)
    # Loading compacted the journal to one line per entry.
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
    assert [json.loads(line)[0] for line in journal.read_text().splitlines()] == ["kept", "after"]


def test_the_journal_keeps_only_max_entries_after_a_restart(tmp_path) -> None:
    journal = tmp_path / "memory.jsonl"
    memory = GeneratedTokenMemory(max_entries=3, journal=journal)
    for i in range(10):
        memory.remember(f"reply {i}", [i + 1])
    again = GeneratedTokenMemory(max_entries=3, journal=journal)
    assert len(again) == 3 and again.lookup("reply 9") == (10,) and again.lookup("reply 6") is None
    assert len(journal.read_text().splitlines()) == 3


def test_an_unwritable_journal_costs_only_the_persistence(tmp_path, caplog) -> None:
    journal = tmp_path / "missing-dir" / "memory.jsonl"
    memory = GeneratedTokenMemory(journal=journal)
    with caplog.at_level(logging.WARNING, logger="kvchat.chat.history"):
        memory.remember("text", [1])
    assert memory.lookup("text") == (1,)
    assert "cannot append to the generated-token journal" in caplog.text
