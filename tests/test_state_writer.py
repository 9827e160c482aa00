"""Tests of `StateStore`'s writer thread: disk-tier files are written off the caller's
thread, through a queue bounded in bytes (no model needed)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from kvchat.atomic_file import write_atomically
from kvchat.engine.state_file import CACHE_ENTRY, header_bytes
from kvchat.engine.state_store import SpilledState, StateStore, entry_key

LAYOUT = "L"


def entry(tokens: list[int], size: int = 100, fill: int = 1) -> SpilledState:
    return SpilledState(tuple(tokens), None, bytes([fill]) * size)


def file_size(e: SpilledState) -> int:
    return len(header_bytes(CACHE_ENTRY, layout_key=LAYOUT, tokens=e.tokens, state=e.state, namespace=None)) + len(
        e.state
    )


def path_of(directory: Path, tokens: list[int]) -> Path:
    return directory / f"{entry_key(LAYOUT, None, tokens)}.kvstate"


def state_files(directory: Path) -> set[Path]:
    return set(directory.glob("*.kvstate"))


class Gate:
    """The stores' `write_file`: notes the writing thread, and holds every write
    until `open()` (a slow disk), then writes the file."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.writing = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self, path: os.PathLike[str], *parts: bytes) -> None:
        self.threads.append(threading.current_thread())
        self.writing.set()
        assert self.opened.wait(10), "the test never opened the gate"
        write_atomically(path, *parts)

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()  # never leave the writer thread waiting


def test_put_returns_while_the_writer_is_stuck_and_the_entry_is_served_from_memory(tmp_path: Path, gate: Gate) -> None:
    store = StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT, write_file=gate)
    e = entry([1, 2, 3])
    store.put(e)  # returns although the write cannot finish
    assert gate.writing.wait(10)
    assert state_files(tmp_path) == set()
    s = store.stats()
    assert (s.disk_entries, s.pending_writes, s.pending_write_bytes, s.spills_to_disk) == (1, 1, file_size(e), 0)
    match = store.best_match([1, 2, 3, 4])
    assert match is not None and (match.length, match.tier) == (3, "disk")
    assert store.load(match) == e  # from the pending bytes: no file yet
    gate.open()
    store.drain()
    assert [t.name for t in gate.threads] == ["kvchat-state-writer"]
    assert gate.threads[0] is not threading.current_thread()
    assert state_files(tmp_path) == {path_of(tmp_path, [1, 2, 3])}
    s = store.stats()
    assert (s.disk_entries, s.pending_writes, s.pending_write_bytes, s.spills_to_disk) == (1, 0, 0, 1)
    assert store.load(match) == e  # now from the file
    store.close()


def test_a_full_queue_drops_the_spill_and_counts_it(tmp_path: Path, gate: Gate) -> None:
    one = file_size(entry([1]))
    store = StateStore(
        ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT, write_queue_bytes=2 * one, write_file=gate
    )
    store.put(entry([1]))
    assert gate.writing.wait(10)  # the writer holds the first; it still counts until written
    store.put(entry([2]))
    store.put(entry([3]))  # a third would pass the bound: dropped, put does not wait
    s = store.stats()
    assert (s.pending_writes, s.pending_write_bytes, s.write_queue_drops, s.dropped) == (2, 2 * one, 1, 1)
    assert s.disk_entries == 2 and store.best_match([3]) is None
    gate.open()
    store.drain()
    assert state_files(tmp_path) == {path_of(tmp_path, [1]), path_of(tmp_path, [2])}
    store.put(entry([3]))  # room again
    store.close()
    assert store.stats().write_queue_drops == 1 and len(state_files(tmp_path)) == 3


def test_an_entry_larger_than_the_bound_goes_alone(tmp_path: Path, gate: Gate) -> None:
    store = StateStore(
        ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT, write_queue_bytes=10, write_file=gate
    )
    store.put(entry([1], size=1000))  # the queue is empty: let in
    store.put(entry([2], size=1000))  # not while another waits
    assert store.stats().write_queue_drops == 1
    gate.open()
    store.close()
    assert state_files(tmp_path) == {path_of(tmp_path, [1])}


def test_a_removed_queued_entry_leaves_no_file(tmp_path: Path, gate: Gate) -> None:
    store = StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT, write_file=gate)
    store.put(entry([9]))  # the writer holds this one
    assert gate.writing.wait(10)
    store.put(entry([1, 2]))  # queued...
    store.put(entry([1, 2, 3]))  # ...and superseded before it was written
    assert store.best_match([1, 2]).entry_tokens == (1, 2, 3)  # type: ignore[union-attr]
    gate.open()
    store.close()
    assert state_files(tmp_path) == {path_of(tmp_path, [9]), path_of(tmp_path, [1, 2, 3])}
    assert len(gate.threads) == 2  # the cancelled write never ran
    assert store.stats().disk_entries == 2


def test_an_entry_removed_while_its_file_is_written_leaves_no_file(tmp_path: Path, gate: Gate) -> None:
    one = file_size(entry([1]))
    store = StateStore(
        ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT, disk_budget_bytes=one, write_file=gate
    )
    store.put(entry([1]))
    assert gate.writing.wait(10)  # [1] is being written...
    store.put(entry([2]))  # ...when the disk budget evicts it
    assert store.best_match([1]) is None
    gate.open()
    store.close()
    assert state_files(tmp_path) == {path_of(tmp_path, [2])}
    s = store.stats()
    assert (s.disk_entries, s.disk_bytes, s.dropped) == (1, one, 1)


def test_a_failed_write_leaves_the_index(tmp_path: Path) -> None:
    def full_disk(path: object, *parts: bytes) -> None:
        raise OSError(28, "No space left on device")

    store = StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT, write_file=full_disk)
    store.put(entry([1, 2]))
    store.drain()
    assert store.best_match([1, 2]) is None
    s = store.stats()
    assert (s.disk_entries, s.dropped, s.spills_to_disk, s.pending_writes) == (0, 1, 0, 0)
    store.close()


def test_close_drains_the_queue_and_flush_waits_for_room(tmp_path: Path) -> None:
    store = StateStore(ram_budget_bytes=10_000, disk_dir=tmp_path, layout_key=LAYOUT, write_queue_bytes=1)
    for i in range(5):
        store.put(entry([i + 1], fill=i))
    store.flush_to_disk()  # shutdown: waits for room instead of dropping
    store.close()
    assert store._writer is None
    s = store.stats()
    assert (s.ram_entries, s.disk_entries, s.spills_to_disk, s.write_queue_drops, s.pending_writes) == (0, 5, 5, 0, 0)
    restarted = StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    for i in range(5):
        match = restarted.best_match([i + 1])
        assert match is not None and restarted.load(match) == entry([i + 1], fill=i)
    restarted.put(entry([7]))  # a closed store still works: a new writer starts
    restarted.close()
    assert path_of(tmp_path, [7]).exists()


class Killed(BaseException):
    """Stands for SIGKILL inside the writer thread: nothing after the raise runs."""


# The thread's death is the point: pytest reports it as a warning, here expected.
@pytest.mark.filterwarnings(
    "ignore:Exception in thread kvchat-state-writer:pytest.PytestUnhandledThreadExceptionWarning"
)
def test_killed_in_the_writer_keeps_the_saved_prefix(tmp_path: Path) -> None:
    """The writer deletes a superseded file only after the new one is written."""
    turn_1 = SpilledState((1, 2, 3), None, b"state after turn 1")
    turn_2 = SpilledState((1, 2, 3, 4, 5), None, b"state after turn 2")
    first = StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    first.put(turn_1)
    first.close()
    died: list[BaseException] = []

    def kill(fd: int) -> None:
        died.append(Killed())
        raise died[-1]

    dying_write = partial(write_atomically, fsync=kill)
    store = StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT, write_file=dying_write)
    store.put(turn_2)
    assert store._writer is not None
    store._writer.join(10)
    assert not store._writer.is_alive()  # the Killed raised in its fsync ended the thread
    assert len(died) == 1 and isinstance(died[0], Killed)
    restarted = StateStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    match = restarted.best_match([1, 2, 3, 4, 5, 6])
    assert match is not None and match.entry_tokens == turn_1.tokens
    assert restarted.load(match) == turn_1
