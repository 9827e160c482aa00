"""Tests of `StateStore`: spilled KV states in RAM and on disk (no model needed)."""

from __future__ import annotations

import json
import logging
import os
import random
import struct
from functools import partial
from pathlib import Path

import pytest

from kvchat.atomic_file import leftover_temp_files, write_atomically
from kvchat.engine.radix import common_prefix_length
from kvchat.engine.state_file import CACHE_ENTRY
from kvchat.engine.state_store import (
    FILE_SUFFIX,
    SpilledState,
    StateStore,
    StoreMatch,
    entry_key,
)

LAYOUT = "model-sha256:abc|n_ctx=8192|type_k=f16"
LOGGER = "kvchat.engine.state_store"
MAGIC = CACHE_ENTRY.magic


class DrainingStore(StateStore):
    """These tests read the files a `put` writes: each `put` here waits for the store's
    writer thread (tests/test_state_writer.py tests the writer and its queue)."""

    def put(self, entry: SpilledState) -> None:
        super().put(entry)
        self.drain()


def blob(seed: int, size: int = 100) -> bytes:
    """Distinct pseudo-random state bytes."""
    return random.Random(seed).randbytes(size)


def entry(tokens: list[int], seed: int = 0, size: int = 100, namespace: str | None = None) -> SpilledState:
    return SpilledState(tuple(tokens), namespace, blob(seed, size))


def state_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.kvstate"))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def load_tokens(store: StateStore, tokens: list[int], namespace: str | None = None) -> SpilledState | None:
    match = store.best_match(tokens, namespace=namespace)
    assert match is not None
    return store.load(match)


# -- RAM tier ----------------------------------------------------------------------


def test_ram_round_trip() -> None:
    store = DrainingStore(ram_budget_bytes=10_000, layout_key=LAYOUT)
    e = entry([1, 2, 3, 4], seed=1)
    store.put(e)
    match = store.best_match([1, 2, 3, 4, 5, 6])
    assert match == StoreMatch(length=4, entry_tokens=(1, 2, 3, 4), tier="ram", key=entry_key(LAYOUT, None, e.tokens))
    got = store.load(match)
    assert got == e and got.state == blob(1)
    assert store.best_match([1, 2, 9]) == StoreMatch(2, (1, 2, 3, 4), "ram", match.key)
    assert store.best_match([1, 2, 3, 4]).length == 4  # type: ignore[union-attr]
    assert store.best_match([1]).length == 1  # type: ignore[union-attr]
    assert store.best_match([9, 1, 2]) is None
    assert store.best_match([]) is None
    s = store.stats()
    assert (s.ram_entries, s.ram_bytes, s.ram_tokens, s.loads) == (1, 100, 4, 1)
    assert (s.disk_entries, s.spills_to_disk, s.dropped, s.load_failures) == (0, 0, 0, 0)


def test_best_match_prefers_longest_then_most_recent() -> None:
    store = DrainingStore(ram_budget_bytes=10_000)
    store.put(entry([1, 2, 3, 7], seed=1))
    store.put(entry([1, 2, 3, 4, 5], seed=2))
    store.put(entry([1, 2, 8], seed=3))
    assert store.best_match([1, 2, 3, 4, 9]).entry_tokens == (1, 2, 3, 4, 5)  # type: ignore[union-attr]
    # [1, 2, 3] ties between the first two (length 3): the most recently put wins...
    assert store.best_match([1, 2, 3]).entry_tokens == (1, 2, 3, 4, 5)  # type: ignore[union-attr]
    # ...until the other one is used.
    store.load(store.best_match([1, 2, 3, 7]))  # type: ignore[arg-type]
    assert store.best_match([1, 2, 3]).entry_tokens == (1, 2, 3, 7)  # type: ignore[union-attr]


def test_tie_prefers_ram_over_disk(tmp_path: Path) -> None:
    store = DrainingStore(ram_budget_bytes=100, disk_dir=tmp_path)
    store.put(entry([1, 2, 3, 5], seed=1))
    store.put(entry([1, 2, 3, 6], seed=2))  # pushes the first to disk
    disk_match = store.best_match([1, 2, 3, 5])
    assert disk_match is not None and disk_match.tier == "disk"
    store.load(disk_match)  # the disk entry is now the most recently used
    match = store.best_match([1, 2, 3, 9])
    assert match is not None and match.tier == "ram" and match.entry_tokens == (1, 2, 3, 6)


def test_namespaces_are_isolated() -> None:
    store = DrainingStore(ram_budget_bytes=10_000)
    store.put(entry([1, 2, 3], seed=1, namespace="alice"))
    assert store.best_match([1, 2, 3], namespace="bob") is None
    assert store.best_match([1, 2, 3]) is None
    # The same (or a prefix) token list in another namespace is a separate entry.
    store.put(entry([1, 2], seed=2, namespace="bob"))
    store.put(entry([1, 2, 3], seed=3))
    assert store.stats().ram_entries == 3
    assert load_tokens(store, [1, 2, 3], "alice").state == blob(1)  # type: ignore[union-attr]
    assert load_tokens(store, [1, 2, 3], "bob").state == blob(2)  # type: ignore[union-attr]
    assert load_tokens(store, [1, 2, 3]).state == blob(3)  # type: ignore[union-attr]
    assert entry_key(LAYOUT, "alice", [1, 2, 3]) != entry_key(LAYOUT, "bob", [1, 2, 3])


def test_prefix_dedupe() -> None:
    store = DrainingStore(ram_budget_bytes=10_000)
    store.put(entry([1, 2, 3, 4], seed=1))
    store.put(entry([1, 2, 3], seed=2))  # a prefix: served by the longer one
    store.put(entry([1, 2, 3, 4], seed=3))  # equal: not stored again
    assert store.stats().ram_entries == 1
    assert load_tokens(store, [1, 2, 3]).state == blob(1)  # type: ignore[union-attr]
    store.put(entry([1, 2, 3, 4, 5, 6], seed=4))  # longer: replaces the shorter one
    s = store.stats()
    assert (s.ram_entries, s.ram_bytes, s.ram_tokens, s.dropped) == (1, 100, 6, 0)
    match = store.best_match([1, 2, 3, 4])
    assert match is not None and match.entry_tokens == (1, 2, 3, 4, 5, 6)
    store.put(entry([1, 2, 7], seed=5))  # diverges: stored beside it
    assert store.stats().ram_entries == 2


def test_deduped_put_touches_the_serving_entry() -> None:
    store = DrainingStore(ram_budget_bytes=200)
    store.put(entry([1, 2, 3], seed=1))
    store.put(entry([4, 5], seed=2))
    store.put(entry([1, 2], seed=3))  # not stored, but [1, 2, 3] was just in use
    store.put(entry([6], seed=4))  # over budget: [4, 5] is the least recently used
    assert store.best_match([4, 5]) is None
    assert store.best_match([1, 2, 3]) is not None


def test_prefix_dedupe_reaches_disk(tmp_path: Path) -> None:
    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path)
    store.put(entry([1, 2, 3], seed=1))
    [old_file] = state_files(tmp_path)
    store.put(entry([1, 2], seed=2))  # prefix of a disk entry: not stored
    assert state_files(tmp_path) == [old_file]
    store.put(entry([1, 2, 3, 4], seed=3))  # supersedes the disk entry: its file goes
    assert not old_file.exists()
    assert store.stats().disk_entries == 1
    assert load_tokens(store, [1, 2, 3, 4]).state == blob(3)  # type: ignore[union-attr]


def test_put_rejects_empty_tokens() -> None:
    with pytest.raises(ValueError):
        DrainingStore(ram_budget_bytes=10).put(SpilledState((), None, b"x"))
    with pytest.raises(ValueError):
        DrainingStore(ram_budget_bytes=-1)


def test_ram_budget_drops_lru_without_disk() -> None:
    store = DrainingStore(ram_budget_bytes=250)
    store.put(entry([1], seed=1))
    store.put(entry([2], seed=2))
    assert load_tokens(store, [1]) is not None  # touch 1: 2 is now least recently used
    store.put(entry([3], seed=3))
    assert store.best_match([2]) is None
    assert store.best_match([1]) is not None and store.best_match([3]) is not None
    s = store.stats()
    assert (s.ram_entries, s.ram_bytes, s.dropped, s.spills_to_disk, s.disk_entries) == (2, 200, 1, 0, 0)
    store.put(entry([4], size=251))  # larger than the whole budget: dropped at once
    assert store.best_match([4]) is None
    assert store.stats().dropped == 2 and store.stats().ram_entries == 2


def test_ram_budget_spills_lru_to_disk(tmp_path: Path) -> None:
    store = DrainingStore(ram_budget_bytes=250, disk_dir=tmp_path, layout_key=LAYOUT)
    store.put(entry([1], seed=1))
    store.put(entry([2], seed=2))
    load_tokens(store, [1])
    store.put(entry([3], seed=3))
    match = store.best_match([2, 5])
    assert match is not None and match.tier == "disk" and match.length == 1
    [path] = state_files(tmp_path)
    assert path.name == f"{entry_key(LAYOUT, None, (2,))}.kvstate"
    s = store.stats()
    assert (s.ram_entries, s.ram_bytes, s.disk_entries, s.disk_tokens) == (2, 200, 1, 1)
    assert (s.disk_bytes, s.spills_to_disk, s.dropped) == (path.stat().st_size, 1, 0)
    assert store.load(match) == entry([2], seed=2)
    assert store.stats().loads == 2
    assert store.best_match([2]).tier == "disk"  # type: ignore[union-attr]  # load does not promote


def test_oversized_and_zero_budget_go_straight_to_disk(tmp_path: Path) -> None:
    store = DrainingStore(ram_budget_bytes=50, disk_dir=tmp_path)
    store.put(entry([1, 2], seed=1, size=51))
    assert store.stats().ram_entries == 0 and store.stats().disk_entries == 1
    zero = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path / "z")
    zero.put(entry([3], seed=2, size=10))
    zero.put(entry([4], seed=3, size=10))
    s = zero.stats()
    assert (s.ram_entries, s.disk_entries, s.spills_to_disk) == (0, 2, 2)
    assert load_tokens(zero, [4]).state == blob(3, 10)  # type: ignore[union-attr]


# -- disk tier ---------------------------------------------------------------------


def test_restart_finds_disk_entries(tmp_path: Path) -> None:
    first = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    big = SpilledState(tuple(range(5000)), "tenant", blob(7, 300_000))
    first.put(big)
    first.put(entry([1, 2, 3], seed=8))
    second = DrainingStore(ram_budget_bytes=1_000_000, disk_dir=tmp_path, layout_key=LAYOUT)
    s = second.stats()
    assert (s.disk_entries, s.disk_tokens, s.ram_entries) == (2, 5003, 0)
    assert s.disk_bytes == sum(p.stat().st_size for p in state_files(tmp_path))
    match = second.best_match(list(range(4000)) + [-1], namespace="tenant")
    assert match is not None and (match.length, match.tier) == (4000, "disk")
    assert match.key == entry_key(LAYOUT, "tenant", big.tokens)
    assert second.load(match) == big
    assert load_tokens(second, [1, 2, 3]) == entry([1, 2, 3], seed=8)


def test_foreign_layout_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    other = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key="another-model")
    other.put(entry([1, 2, 3], seed=1))
    other.put(entry([4, 5, 6], seed=2))
    foreign_files = state_files(tmp_path)
    caplog.set_level(logging.INFO, logger=LOGGER)
    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, disk_budget_bytes=1, layout_key=LAYOUT)
    infos = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO]
    assert len([m for m in infos if "another model" in m]) == 1 and "2 " in infos[0]
    assert not warnings_of(caplog)
    assert store.best_match([1, 2, 3]) is None and store.stats().disk_entries == 0
    store.put(entry([1, 2, 3], seed=3))  # over the tiny disk budget: dropped, foreign files untouched
    assert store.stats().dropped == 1
    assert state_files(tmp_path) == foreign_files


def test_foreign_file_at_load_is_not_deleted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    store.put(entry([1, 2, 3], seed=1))
    [path] = state_files(tmp_path)
    alien = tmp_path / "alien"
    DrainingStore(ram_budget_bytes=0, disk_dir=alien, layout_key="another-model").put(entry([1, 2, 3], seed=1))
    [alien_file] = state_files(alien)
    os.replace(alien_file, path)  # another process put a foreign file under our name
    match = store.best_match([1, 2, 3])
    assert match is not None and store.load(match) is None
    assert any(str(path) in w and "foreign" in w for w in warnings_of(caplog))
    assert path.exists() and store.best_match([1, 2, 3]) is None


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _assert_store_still_works(store: StateStore) -> None:
    store.put(entry([42, 43], seed=42))
    got = load_tokens(store, [42, 43, 44])
    assert got is not None and got.state == blob(42)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_flip_last_byte, "checksum"),
        (lambda p: p.write_bytes(p.read_bytes()[:-10]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:20]), "header"),
        (lambda p: p.write_bytes(b"garbage" * 10), "magic"),
        (lambda p: p.unlink(), "missing"),
    ],
    ids=["flipped-byte", "truncated-state", "truncated-header", "garbage", "missing"],
)
def test_bad_file_at_load(tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, reason: str) -> None:
    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    store.put(entry([1, 2, 3], seed=1))
    [path] = state_files(tmp_path)
    damage(path)
    match = store.best_match([1, 2, 3])
    assert match is not None
    assert store.load(match) is None
    assert any(str(path) in w and reason in w for w in warnings_of(caplog)), warnings_of(caplog)
    assert not path.exists()  # a broken file of ours is deleted
    s = store.stats()
    assert (s.load_failures, s.loads, s.disk_entries, s.disk_bytes) == (1, 0, 0, 0)
    assert store.best_match([1, 2, 3]) is None and store.load(match) is None
    _assert_store_still_works(store)


def test_bad_files_are_skipped_at_start_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    for i in range(3):
        first.put(entry([i + 1, 100], seed=i))
    good, truncated, flipped = (tmp_path / f"{entry_key(LAYOUT, None, (i + 1, 100))}.kvstate" for i in range(3))
    truncated.write_bytes(truncated.read_bytes()[:-1])
    _flip_last_byte(flipped)  # only detectable when loaded: the scan reads headers only
    garbage = tmp_path / f"{'0' * 64}.kvstate"
    garbage.write_bytes(b"not a state file at all")
    bad_json = tmp_path / f"{'1' * 64}.kvstate"
    raw = b'{"layout_key": '
    bad_json.write_bytes(MAGIC + struct.pack("<HI", 1, len(raw)) + raw)
    (tmp_path / "readme.txt").write_text("unrelated files are left alone")

    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    warnings = warnings_of(caplog)
    assert any(str(truncated) in w for w in warnings)
    assert any(str(garbage) in w and "magic" in w for w in warnings)
    assert any(str(bad_json) in w and "JSON" in w for w in warnings)
    assert not truncated.exists()  # ours but partial: deleted
    assert garbage.exists() and bad_json.exists()  # unknown origin: left alone
    assert store.stats().disk_entries == 2
    assert load_tokens(store, [1, 100]) == entry([1, 100], seed=0)
    assert store.best_match([2, 100]) is None
    assert load_tokens(store, [3, 100]) is None and not flipped.exists()
    assert good.exists()
    _assert_store_still_works(store)


def test_leftover_temp_file_is_removed_at_start_up(tmp_path: Path) -> None:
    leftover = tmp_path / f".{'a' * 64}{FILE_SUFFIX}.crashed.tmp"  # as write_atomically names it
    leftover.write_bytes(MAGIC + b"half written")
    assert leftover_temp_files(tmp_path, FILE_SUFFIX) == [leftover]
    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path)
    assert not leftover.exists()
    assert store.stats().disk_entries == 0
    _assert_store_still_works(store)


def test_crash_during_write_leaves_no_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    disk_full = True

    def rename(src: str, dst: Path) -> None:
        if disk_full:
            raise OSError(28, "No space left on device")
        os.replace(src, dst)

    store = DrainingStore(
        ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT, write_file=partial(write_atomically, replace=rename)
    )
    store.put(entry([1, 2, 3], seed=1))
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the temp file
    assert any("No space left" in w for w in warnings_of(caplog))
    s = store.stats()
    assert (s.disk_entries, s.spills_to_disk, s.dropped) == (0, 0, 1)
    assert store.best_match([1, 2, 3]) is None
    disk_full = False
    store.put(entry([1, 2, 3], seed=1))
    assert len(state_files(tmp_path)) == 1
    assert load_tokens(store, [1, 2, 3]) == entry([1, 2, 3], seed=1)


def test_disk_budget_evicts_least_recently_used(tmp_path: Path) -> None:
    probe = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path / "probe")
    probe.put(entry([1], seed=0))
    file_size = probe.stats().disk_bytes  # every single-token, 100-byte entry has this size
    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path / "d", disk_budget_bytes=2 * file_size)
    store.put(entry([1], seed=1))
    store.put(entry([2], seed=2))
    load_tokens(store, [1])  # 2 is now the least recently used
    store.put(entry([3], seed=3))
    assert store.best_match([2]) is None and not (tmp_path / "d" / f"{entry_key('', None, (2,))}.kvstate").exists()
    s = store.stats()
    assert (s.disk_entries, s.disk_bytes, s.dropped, s.spills_to_disk) == (2, 2 * file_size, 1, 3)
    assert len(state_files(tmp_path / "d")) == 2
    store.put(entry([4], seed=4, size=3 * file_size))  # larger than the whole disk budget
    assert store.stats().dropped == 2 and len(state_files(tmp_path / "d")) == 2


def test_smaller_disk_budget_at_start_up_evicts_oldest_by_mtime(tmp_path: Path) -> None:
    first = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path)
    for i in range(3):
        first.put(entry([i + 1], seed=i))
    file_size = first.stats().disk_bytes // 3
    paths = [tmp_path / f"{entry_key('', None, (i + 1,))}.kvstate" for i in range(3)]
    for age, path in zip((100, 300, 200), paths):  # entry 2 is the oldest, then 3
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, disk_budget_bytes=2 * file_size)
    assert [p.exists() for p in paths] == [True, False, True]
    assert store.stats().dropped == 1
    store2 = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, disk_budget_bytes=file_size)
    assert [p.exists() for p in paths] == [True, False, False]
    assert store2.stats().disk_entries == 1


def test_file_format_header(tmp_path: Path) -> None:
    store = DrainingStore(ram_budget_bytes=0, disk_dir=tmp_path, layout_key=LAYOUT)
    e = entry([5, 6, 7], seed=9, namespace="ns")
    store.put(e)
    [path] = state_files(tmp_path)
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    version, length = struct.unpack_from("<HI", data, len(MAGIC))
    offset = len(MAGIC) + 6
    header = json.loads(data[offset:offset + length])
    assert version == 1
    assert header["layout_key"] == LAYOUT and header["namespace"] == "ns" and header["tokens"] == [5, 6, 7]
    assert header["state_size"] == 100 and len(header["state_sha256"]) == 64
    assert data[offset + length:] == e.state


def test_common_prefix_len_matches_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = tuple(rng.randrange(3) for _ in range(rng.randrange(40)))
        b = tuple(rng.randrange(3) for _ in range(rng.randrange(40)))
        expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix_length(a, b) == expected
        assert common_prefix_length(a, a + b) == len(a)


def test_flush_to_disk_moves_ram_entries_so_a_restart_finds_them(tmp_path) -> None:
    store = DrainingStore(ram_budget_bytes=1 << 20, disk_dir=tmp_path, layout_key="L")
    store.put(SpilledState((1, 2, 3), None, b"abc"))
    assert store.has_disk and store.stats().ram_entries == 1
    store.flush_to_disk()
    assert store.stats().ram_entries == 0 and store.stats().disk_entries == 1
    restarted = DrainingStore(ram_budget_bytes=1 << 20, disk_dir=tmp_path, layout_key="L")
    match = restarted.best_match([1, 2, 3, 4])
    assert match is not None and match.length == 3 and match.tier == "disk"
    assert restarted.load(match).state == b"abc"


# -- tails: state past a prefix the KV pool keeps ----------------------------------


def tail(tokens: list[int], start: int, seed: int = 0, size: int = 100) -> SpilledState:
    return SpilledState(tuple(tokens), None, blob(seed, size), start)


def test_a_tail_must_start_inside_its_tokens() -> None:
    with pytest.raises(ValueError, match="cannot start at position 3"):
        SpilledState((1, 2, 3), None, b"x", 3)
    with pytest.raises(ValueError):
        SpilledState((1, 2, 3), None, b"x", -1)


def test_a_tail_matches_only_where_the_pool_holds_its_prefix() -> None:
    store = DrainingStore(ram_budget_bytes=10_000)
    store.put(tail([1, 2, 3, 4, 5, 6], start=3, seed=1))
    prompt = [1, 2, 3, 4, 5, 6, 7]
    assert store.best_match(prompt) is None  # the pool holds nothing of it
    assert store.best_match(prompt, resident=2) is None  # not all of its prefix
    match = store.best_match(prompt, resident=3)
    assert match is not None and (match.length, match.start) == (6, 3)
    assert store.best_match([1, 2, 3, 9], resident=3) is None  # nothing past the pool's prefix
    loaded = store.load(match)
    assert loaded == tail([1, 2, 3, 4, 5, 6], start=3, seed=1)
    s = store.stats()
    assert (s.ram_entries, s.ram_tokens) == (1, 3)  # the tokens its state holds


def test_a_whole_entry_covers_a_tail_and_a_tail_never_replaces_a_whole_entry() -> None:
    store = DrainingStore(ram_budget_bytes=10_000)
    store.put(tail([1, 2, 3, 4], start=2, seed=1))
    store.put(entry([1, 2, 3, 4, 5], seed=2))  # holds all the tail does, and its prefix
    assert store.stats().ram_entries == 1
    assert store.best_match([1, 2, 3, 4, 5], resident=2).start == 0  # type: ignore[union-attr]
    store.put(tail([1, 2, 3, 4, 5], start=2, seed=3))  # the whole entry holds it: not stored
    store.put(tail([1, 2, 3, 4, 5, 6, 7], start=5, seed=4))  # longer, but needs a prefix: stored beside it
    assert store.stats().ram_entries == 2
    assert store.best_match([1, 2, 3, 4, 5, 6, 7]).entry_tokens == (1, 2, 3, 4, 5)  # type: ignore[union-attr]
    assert store.best_match([1, 2, 3, 4, 5, 6, 7], resident=5).start == 5  # type: ignore[union-attr]


def test_a_tail_replaces_the_tails_it_holds_and_not_those_reaching_further_back() -> None:
    store = DrainingStore(ram_budget_bytes=10_000)
    store.put(tail([1, 2, 3, 4], start=2, seed=1))
    store.put(tail([1, 2, 3, 4, 5, 6], start=3, seed=2))  # starts later: [2, 3) is only in the first
    assert store.stats().ram_entries == 2
    store.put(tail([1, 2, 3, 4, 5, 6, 7], start=1, seed=3))  # starts earlier and reaches further
    assert store.stats().ram_entries == 1
    store.put(tail([1, 2, 3, 4, 5], start=2, seed=4))  # held by it: not stored
    assert store.stats().ram_entries == 1
    assert store.best_match([1, 2, 3, 4, 5, 6, 7], resident=1).entry_tokens == (1, 2, 3, 4, 5, 6, 7)  # type: ignore[union-attr]


def test_tails_stay_in_ram(tmp_path: Path) -> None:
    """A file of a tail would outlive the prefix it needs: leaving the RAM tier drops it."""
    store = DrainingStore(ram_budget_bytes=150, disk_dir=tmp_path, layout_key=LAYOUT)
    store.put(tail([1, 2, 3], start=1, seed=1))
    store.put(entry([5, 6], seed=2))  # over budget: the tail is the least recently used
    assert store.best_match([1, 2, 3], resident=1) is None
    assert state_files(tmp_path) == [] and store.stats().dropped == 1
    store.put(tail([7, 8, 9], start=2, seed=3))  # pushes the whole entry to disk
    store.flush_to_disk()
    assert [p.name for p in state_files(tmp_path)] == [f"{entry_key(LAYOUT, None, (5, 6))}.kvstate"]
    assert store.stats().dropped == 2


def test_a_branch_spilled_piece_by_piece_comes_back_as_a_chain() -> None:
    """A session's turns, each spilled as the tail of the one before: the chain reaches
    furthest first, each link up to where the one before it starts, the last one on
    what the pool holds."""
    store = DrainingStore(ram_budget_bytes=10_000)
    prompt = list(range(1, 13))
    store.put(tail(prompt[:10], start=7, seed=1))
    store.put(tail(prompt[:7], start=4, seed=2))
    store.put(tail(prompt[:5], start=2, seed=3))  # reaches past 4: the links may overlap
    chain = store.best_chain(prompt, resident=2)
    assert [(m.length, m.start) for m in chain] == [(10, 7), (7, 4), (4, 2)]
    assert [(m.length, m.start) for m in store.best_chain(prompt, resident=4)] == [(10, 7), (7, 4)]
    # Without the pool's prefix the chain breaks; a link alone that needs none still serves.
    assert store.best_chain(prompt, resident=1) == []
    store.put(entry(prompt[:3], seed=4))
    assert [(m.length, m.start) for m in store.best_chain(prompt, resident=0)] == [(10, 7), (7, 4), (4, 2), (2, 0)]


def test_a_chain_with_a_gap_falls_back_to_the_best_single_entry() -> None:
    store = DrainingStore(ram_budget_bytes=10_000)
    prompt = list(range(1, 13))
    store.put(tail(prompt[:10], start=7, seed=1))
    store.put(tail(prompt[:6], start=2, seed=2))  # ends before 7: [6, 7) is missing
    assert [(m.length, m.start) for m in store.best_chain(prompt, resident=2)] == [(6, 2)]
    store.put(entry(prompt[:5] + [99], seed=3))  # diverges at 5: no link either
    assert [(m.length, m.start) for m in store.best_chain(prompt, resident=0)] == [(5, 0)]


def test_a_tail_starting_past_what_a_prompt_shares_with_it_is_no_link() -> None:
    store = DrainingStore(ram_budget_bytes=10_000)
    store.put(tail([1, 2, 3, 4, 5, 6, 7, 8], start=6, seed=1))
    store.put(entry([1, 2, 3], seed=2))
    # The prompt shares 5 tokens with the tail, whose state starts at 6: it gives none of them.
    assert [(m.length, m.start) for m in store.best_chain([1, 2, 3, 4, 5, 9])] == [(3, 0)]
