"""GeneratedTokenMemory is bounded in bytes, and compacts its journal off the caller's thread."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import tracemalloc
from pathlib import Path

import pytest

from kvchat.chat.history import DEFAULT_MAX_BYTES, GeneratedTokenMemory, JournalWriter
from kvchat.errors import InvalidRequestError

# About what a BPE tokenizer gives for English: 4 to 5 characters a token.
WORDS = "the quick brown fox jumps over lazy dogs while seven wizards quietly hex".split()


def reply(i: int, n_tokens: int) -> tuple[str, range]:
    """A distinct reply of `n_tokens` ids, its text about 5 characters a token."""
    text = f"reply {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_tokens))
    return text, range(i % 1000, i % 1000 + n_tokens)


def fill(memory: GeneratedTokenMemory, n_replies: int, n_tokens: int, namespace: str | None = None) -> None:
    for i in range(n_replies):
        text, ids = reply(i, n_tokens)
        memory.remember(text, ids, namespace=namespace)
        assert memory.nbytes <= memory.max_bytes


# -- the byte budget -------------------------------------------------------------------------------


def test_the_default_budget_holds_with_4096_token_replies() -> None:
    memory = GeneratedTokenMemory()
    assert memory.max_bytes == DEFAULT_MAX_BYTES == 64 * 1024 * 1024
    fill(memory, 2500, 4096)  # about 37 KB each: more than the budget holds
    assert 1000 < len(memory) < 2500
    assert memory.nbytes <= DEFAULT_MAX_BYTES
    text, ids = reply(2499, 4096)
    assert memory.lookup(text) == tuple(ids)  # the newest stays
    assert memory.lookup(reply(0, 4096)[0]) is None  # the oldest went first


@pytest.mark.parametrize(("n_tokens", "n_replies"), [(4096, 200), (100_000, 12)])
def test_the_accounting_is_what_the_entries_hold_in_ram(n_tokens: int, n_replies: int) -> None:
    """Filled well past its budget, the memory holds no more RAM than `max_bytes`
    (measured by tracemalloc, not by the memory's own count)."""
    budget = 4 * 1024 * 1024
    memory = GeneratedTokenMemory(max_bytes=budget)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fill(memory, n_replies, n_tokens)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 2 <= len(memory) < n_replies
    assert memory.nbytes <= budget
    # The count is honest: it does not undercount what the entries cost (1% for the
    # dictionaries' spare room, which varies with the Python version).
    assert held <= budget * 1.01
    assert held >= memory.nbytes // 2  # nor is it wildly high


def test_a_100000_token_reply_is_stored_compactly() -> None:
    memory = GeneratedTokenMemory()
    text, ids = reply(1, 100_000)
    memory.remember(text, ids)
    assert memory.lookup(text) == tuple(ids)
    # 4 bytes an id, plus the text: not the ~36 bytes an id of a tuple of Python ints.
    assert memory.nbytes < 4 * 100_000 + len(text) + 4096


def test_a_reply_larger_than_the_budget_is_not_stored(tmp_path: Path) -> None:
    journal = tmp_path / "memory.jsonl"
    memory = GeneratedTokenMemory(max_bytes=256 * 1024, journal=journal)
    memory.remember("small", [1, 2, 3])
    before = memory.nbytes
    text, ids = reply(7, 100_000)
    memory.remember(text, ids)
    assert memory.lookup(text) is None
    assert memory.lookup("small") == (1, 2, 3)  # it evicted nothing to try
    assert memory.nbytes == before and len(memory) == 1
    assert memory.wait_for_compaction(timeout=30)
    assert [json.loads(line)[0] for line in journal.read_text().splitlines()] == ["small"]  # nor journaled


def test_a_text_remembered_again_is_counted_once() -> None:
    memory = GeneratedTokenMemory()
    memory.remember("same", [1, 2, 3])
    once = memory.nbytes
    memory.remember("same", [4, 5, 6])
    assert memory.nbytes == once and memory.lookup("same") == (4, 5, 6)
    memory.remember("other", [7], namespace="alice")
    memory.forget("same")
    memory.forget("other", namespace="alice")
    assert memory.nbytes == 0 and len(memory) == 0
    memory.remember("again", [8])
    memory.clear()
    assert memory.nbytes == 0


def test_a_tenant_filling_the_budget_evicts_its_own_replies_first() -> None:
    memory = GeneratedTokenMemory(max_bytes=1024 * 1024)
    memory.remember("mine", [1, 2], namespace="alice")
    fill(memory, 300, 4096, namespace="bob")  # ~37 KB each: bob alone is over the budget many times
    assert memory.lookup("mine", namespace="alice") == (1, 2)
    text, ids = reply(299, 4096)
    assert memory.lookup(text, namespace="bob") == tuple(ids)
    # Alice, now the larger tenant, evicts her own: bob keeps at least as much as she has.
    fill(memory, 300, 4096, namespace="alice")
    assert memory.lookup(text, namespace="bob") == tuple(ids)


def test_bad_bounds_and_ids_are_refused() -> None:
    for kwargs in ({"max_bytes": 0}, {"max_bytes": -1}, {"max_entries": 0}, {"max_namespaces": 0}):
        with pytest.raises(InvalidRequestError):
            GeneratedTokenMemory(**kwargs)  # type: ignore[arg-type]
    memory = GeneratedTokenMemory(n_vocab=100)
    for ids in ([100], [-1], [1 << 40]):
        with pytest.raises(InvalidRequestError):
            memory.remember("bad", ids)
    assert len(memory) == 0


# -- compaction, off the caller's thread -------------------------------------------------------------


def test_compaction_runs_off_the_event_loop_and_the_journal_reloads(tmp_path: Path) -> None:
    """While a compaction is writing (held mid-write here), the event loop keeps
    remembering and forgetting replies; the compaction ran on another thread, and
    the journal it leaves reads back to exactly what the memory holds."""
    journal = tmp_path / "memory.jsonl"
    writing, proceed = threading.Event(), threading.Event()
    threads: set[int] = set()
    loop_kept_going: list[bool] = []
    real_write_all = JournalWriter().write_all

    def held_write_all(fd: int, data: bytes) -> None:
        threads.add(threading.get_ident())
        if not writing.is_set():  # the first line of the first compaction (outside the lock)
            writing.set()
            loop_kept_going.append(proceed.wait(timeout=60))
        real_write_all(fd, data)

    async def main() -> tuple[int, GeneratedTokenMemory]:
        loop_thread = threading.get_ident()
        memory = GeneratedTokenMemory(max_entries=3, journal=journal, journal_writer=JournalWriter(held_write_all))
        for i in range(7):  # 7 lines for 3 entries: a compaction starts
            memory.remember(f"reply {i}", [i + 1])
        assert await asyncio.to_thread(writing.wait, 60)
        # The compaction is held mid-write: the loop still runs and the memory still answers.
        await asyncio.sleep(0)
        memory.remember("during 1", [101])
        memory.remember("during 2", [102], namespace="alice")
        memory.forget("reply 6")
        assert memory.lookup("during 1") == (101,)
        proceed.set()
        assert await asyncio.to_thread(memory.wait_for_compaction, 60)
        return loop_thread, memory

    loop_thread, memory = asyncio.run(main())
    assert loop_kept_going == [True]  # the loop never waited for the compaction
    assert threads and loop_thread not in threads
    again = GeneratedTokenMemory(max_entries=3, journal=journal)
    assert again.wait_for_compaction(timeout=30)
    assert len(memory) == 3 and len(again) == 3
    for text, namespace in [("reply 5", None), ("during 1", None), ("during 2", "alice")]:
        assert again.lookup(text, namespace=namespace) == memory.lookup(text, namespace=namespace) is not None
    assert again.lookup("reply 6") is None  # forgotten during the compaction: a second pass dropped it
    assert len(journal.read_text().splitlines()) == 3


def test_a_failed_compaction_leaves_the_old_journal_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "memory.jsonl"

    def no_rename(src: str, dst: Path) -> None:
        raise OSError("disk full")

    memory = GeneratedTokenMemory(max_entries=1, journal=journal, journal_writer=JournalWriter(replace=no_rename))
    with caplog.at_level(logging.WARNING, logger="kvchat.chat.history"):
        for i in range(4):
            memory.remember(f"reply {i}", [i + 1])
            assert memory.wait_for_compaction(timeout=30)
    assert "cannot compact the generated-token journal" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["memory.jsonl"]  # no temporary file left behind
    assert len(journal.read_text().splitlines()) == 4  # every line appended, none lost
    again = GeneratedTokenMemory(max_entries=1, journal=journal)
    assert again.lookup("reply 3") == (4,) and len(again) == 1


def test_a_compaction_killed_midway_leaves_a_temporary_file_that_the_next_start_removes(tmp_path: Path) -> None:
    journal = tmp_path / "memory.jsonl"
    GeneratedTokenMemory(journal=journal).remember("kept", [1])
    (tmp_path / ".memory.jsonl.abc123.tmp").write_text('["half", [2')  # the process died while compacting
    again = GeneratedTokenMemory(journal=journal)
    assert again.lookup("kept") == (1,) and again.lookup("half") is None
    assert [p.name for p in tmp_path.iterdir()] == ["memory.jsonl"]
