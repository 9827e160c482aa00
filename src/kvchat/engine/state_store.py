"""`StateStore`: per-sequence KV states spilled out of the KV pool, in host RAM and on disk.

An entry evicted from llama.cpp's KV pool hands its sequence state bytes here: RAM
within a byte budget (LRU), then, if given a directory, disk (survives restarts). A
prompt sharing a longer prefix with a stored entry than with the KV pool can restore
it instead of recomputing it. This module never talks to llama.cpp.

Entries are found through a :class:`~kvchat.engine.state_index.StateIndex` (a
radix tree per namespace): a lookup costs the length of the query, not the
number of entries, so the engine thread can ask at every admission and eviction.

Disk format: one file ``<key>.kvstate`` per entry, of the kind
:data:`~kvchat.engine.state_file.CACHE_ENTRY` (its header adds the entry's
``namespace``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvchat.atomic_file import leftover_temp_files, write_atomically
from kvchat.engine import state_file
from kvchat.engine.state_file import CACHE_ENTRY, StateFileError
from kvchat.engine.state_index import StateIndex
from kvchat.engine.state_index import _common_prefix_len as _common_prefix_len  # where it lived before

logger = logging.getLogger("kvchat.engine.state_store")

FILE_SUFFIX = ".kvstate"


@dataclass(frozen=True)
class SpilledState:
    """The KV state of one sequence holding `tokens` at positions ``[0, len(tokens))``.

    `namespace` is a tenant key (entries never match across namespaces); `state`
    is the opaque bytes of ``llama_state_seq_get_data``.
    """

    tokens: tuple[int, ...]
    namespace: str | None
    state: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        object.__setattr__(self, "state", bytes(self.state))


@dataclass(frozen=True)
class StoreMatch:
    """The stored entry sharing the longest prefix (`length` tokens) with a query."""

    length: int
    entry_tokens: tuple[int, ...]
    tier: Literal["ram", "disk"]
    key: str


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of a :class:`StateStore`. Bytes are state bytes in RAM, file bytes on disk.

    Counters since construction: `spills_to_disk` files written, `dropped` entries
    discarded for lack of space (or a failed disk write), `loads` successful
    :meth:`StateStore.load` calls (either tier), `load_failures` disk files that
    could not be loaded.
    """

    ram_entries: int
    ram_bytes: int
    ram_tokens: int
    disk_entries: int
    disk_bytes: int
    disk_tokens: int
    spills_to_disk: int
    dropped: int
    loads: int
    load_failures: int


@dataclass(eq=False)
class _Entry:
    key: str
    namespace: str | None
    tokens: tuple[int, ...]
    size: int  # RAM: state bytes; disk: file bytes
    last_used: int
    state: bytes | None = None  # RAM tier only
    tier: Literal["ram", "disk"] = "ram"


def _rank(e: _Entry) -> tuple[int, int]:
    """Among entries sharing as long a prefix with a query: RAM over disk, then most recent."""
    return (e.tier == "ram", e.last_used)


def entry_key(layout_key: str, namespace: str | None, tokens: Sequence[int]) -> str:
    """The stable key of an entry: sha256 hex of its layout key, namespace and tokens."""
    blob = json.dumps([layout_key, namespace, list(tokens)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class StateStore:
    """RAM tier (byte budget, LRU) with an optional disk tier below it.

    Over `ram_budget_bytes` of state, the least-recently-used RAM entries move to
    `disk_dir` (or are dropped without one); over `disk_budget_bytes` of files
    (None: no limit; the engine's default is `EngineSettings.cache_disk_bytes`),
    the least-recently-used disk entries are deleted. Files of
    another `layout_key` (model sha256 + KV-relevant context settings) in the
    directory are foreign: never matched, loaded, counted or deleted. One process
    per directory. Not thread-safe: only the engine's worker thread calls it.
    """

    def __init__(
        self,
        *,
        ram_budget_bytes: int,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_budget_bytes: int | None = None,
        layout_key: str = "",
    ) -> None:
        if not isinstance(ram_budget_bytes, int) or ram_budget_bytes < 0:
            raise ValueError("ram_budget_bytes must be an integer >= 0")
        if disk_budget_bytes is not None and (not isinstance(disk_budget_bytes, int) or disk_budget_bytes < 0):
            raise ValueError("disk_budget_bytes must be an integer >= 0 or None")
        self.ram_budget_bytes = ram_budget_bytes
        self.disk_budget_bytes = disk_budget_bytes
        self.layout_key = layout_key
        self.disk_dir = None if disk_dir is None else Path(disk_dir)
        self._ram: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._disk: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._ram_bytes = 0
        self._disk_bytes = 0
        self._ram_tokens = 0
        self._disk_tokens = 0
        self._index: StateIndex[_Entry] = StateIndex(_rank)
        self._clock = 0
        self._counts = dict.fromkeys(("spills_to_disk", "dropped", "loads", "load_failures"), 0)
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            self._scan_disk()

    def put(self, entry: SpilledState) -> None:
        """Store `entry` as the newest RAM entry, spilling or dropping LRU entries over budget.

        Not stored if its tokens are a prefix of (or equal to) a stored entry's in
        the same namespace (that entry is touched instead); stored entries whose
        tokens are a strict prefix of it are removed. Disk failures are logged,
        never raised.
        """
        if not entry.tokens:
            raise ValueError("a spilled state must hold at least one token")
        extension, superseded = self._index.extension_and_prefixes(entry.tokens, entry.namespace)
        if extension is not None:
            self._touch(extension)
            return
        # Superseded files are deleted only once the new entry is stored: a crash
        # while its file is written must not lose the prefix that was saved.
        stale_files = [self._path(old.key) for old in superseded if old.key in self._disk]
        for old in superseded:
            self._remove(old, delete_file=False)
        self._store_new(
            _Entry(
                entry_key(self.layout_key, entry.namespace, entry.tokens),
                entry.namespace,
                entry.tokens,
                len(entry.state),
                self._tick(),
                entry.state,
            )
        )
        for path in stale_files:
            with suppress(OSError):
                os.unlink(path)

    def _store_new(self, new: _Entry) -> None:
        """Index a new entry in RAM (spilling LRU entries over budget) or straight on disk."""
        if self.ram_budget_bytes == 0 or new.size > self.ram_budget_bytes:
            self._demote(new)
            return
        self._add(new, "ram")
        while self._ram_bytes > self.ram_budget_bytes:
            oldest = next(iter(self._ram.values()))
            self._remove(oldest, delete_file=False)
            self._demote(oldest)

    def best_match(self, tokens: Sequence[int], *, namespace: str | None = None) -> StoreMatch | None:
        """The entry sharing the longest prefix with `tokens` (ties: RAM, then most recent).

        None if no entry of `namespace` shares at least one token. Reads no file.
        """
        found = self._index.longest_match(tokens, namespace)
        if found is None:
            return None
        length, e = found
        return StoreMatch(length, e.tokens, e.tier, e.key)

    def load(self, match: StoreMatch) -> SpilledState | None:
        """The stored entry of `match`, read from RAM or disk and touched as recently used.

        The entry stays stored. None if it is gone, or if its file is missing,
        truncated, corrupt or foreign (logged at WARNING; the entry leaves the
        index, and a broken file of ours is deleted). Never raises for a bad file.
        """
        if (e := self._ram.get(match.key)) is not None:
            self._touch(e)
            self._counts["loads"] += 1
            return SpilledState(e.tokens, e.namespace, e.state or b"")
        if (e := self._disk.get(match.key)) is None:
            logger.debug("entry %s is no longer stored", match.key)
            return None
        path = self._path(e.key)
        try:
            state = self._read_file(path, load=True).state or b""
        except StateFileError as bad:
            logger.warning("cannot load spilled KV state %s: %s", path, bad)
            self._counts["load_failures"] += 1
            self._remove(e, delete_file=bad.problem in ("header", "data"))
            return None
        self._touch(e)
        self._counts["loads"] += 1
        return SpilledState(e.tokens, e.namespace, state)

    def stats(self) -> StoreStats:
        """Current sizes and counters."""
        return StoreStats(
            ram_entries=len(self._ram),
            ram_bytes=self._ram_bytes,
            ram_tokens=self._ram_tokens,
            disk_entries=len(self._disk),
            disk_bytes=self._disk_bytes,
            disk_tokens=self._disk_tokens,
            **self._counts,
        )

    @property
    def ram_room_bytes(self) -> int:
        """Bytes the RAM tier can still take without moving or dropping an entry."""
        return max(0, self.ram_budget_bytes - self._ram_bytes)

    @property
    def has_disk(self) -> bool:
        """True when a disk tier is configured."""
        return self.disk_dir is not None

    def flush_to_disk(self) -> None:
        """Move every RAM entry to the disk tier (before shutdown), oldest first."""
        if self.disk_dir is None:
            return
        for entry in list(self._ram.values()):
            self._remove(entry, delete_file=False)
            self._demote(entry)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @property
    def index_steps(self) -> int:
        """Index nodes the last lookup (`best_match` or `put`) visited, for tests: it does
        not grow with the number of stored entries that share no prefix with the query."""
        return self._index.steps

    def _touch(self, e: _Entry) -> None:
        e.last_used = self._tick()
        if e.key in self._ram:
            self._ram.move_to_end(e.key)
        elif e.key in self._disk:
            self._disk.move_to_end(e.key)
            with suppress(OSError):  # keeps the LRU order across restarts
                os.utime(self._path(e.key))
        self._index.touch(e)

    def _add(self, e: _Entry, tier: Literal["ram", "disk"]) -> None:
        """Index `e` in `tier` (its key is in neither tier)."""
        e.tier = tier
        if tier == "ram":
            self._ram[e.key] = e
            self._ram_bytes += e.size
            self._ram_tokens += len(e.tokens)
        else:
            self._disk[e.key] = e
            self._disk_bytes += e.size
            self._disk_tokens += len(e.tokens)
        self._index.add(e)

    def _remove(self, e: _Entry, *, delete_file: bool) -> None:
        if (held := self._ram.pop(e.key, None)) is not None:
            self._ram_bytes -= held.size
            self._ram_tokens -= len(held.tokens)
        elif (held := self._disk.pop(e.key, None)) is not None:
            self._disk_bytes -= held.size
            self._disk_tokens -= len(held.tokens)
            if delete_file:
                with suppress(OSError):
                    os.unlink(self._path(e.key))
        if held is not None:
            self._index.remove(held)

    def _demote(self, e: _Entry) -> None:
        """Write a RAM entry (already out of the RAM index) to disk, or drop it."""
        if self.disk_dir is None or e.state is None:
            self._drop(e, "no disk tier")
            return
        header = state_file.header_bytes(
            CACHE_ENTRY, layout_key=self.layout_key, tokens=e.tokens, state=e.state, namespace=e.namespace
        )
        file_size = len(header) + len(e.state)
        if self.disk_budget_bytes is not None:
            if file_size > self.disk_budget_bytes:
                self._drop(e, "larger than the disk budget")
                return
            while self._disk and self._disk_bytes + file_size > self.disk_budget_bytes:
                self._evict_oldest_disk_entry()
        if not self._write_file(self._path(e.key), header, e.state):
            self._drop(e, "disk write failed")
            return
        if (old := self._disk.get(e.key)) is not None:
            self._remove(old, delete_file=False)  # the file was just replaced
        self._add(_Entry(e.key, e.namespace, e.tokens, file_size, e.last_used), "disk")
        self._counts["spills_to_disk"] += 1
        logger.debug("spilled %d tokens (%d bytes) to disk as %s", len(e.tokens), file_size, e.key)

    def _evict_oldest_disk_entry(self) -> None:
        oldest = next(iter(self._disk.values()))
        self._remove(oldest, delete_file=True)
        self._drop(oldest, "disk budget")

    def _drop(self, e: _Entry, why: str) -> None:
        """Count and log an entry lost for lack of space (the caller unindexed it)."""
        self._counts["dropped"] += 1
        logger.debug("dropped spilled state of %d tokens (%s)", len(e.tokens), why)

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}{FILE_SUFFIX}"

    def _write_file(self, path: Path, header: bytes, state: bytes) -> bool:
        """Write atomically; False, logged, on an OS error."""
        try:
            write_atomically(path, header, state)
        except OSError as exc:
            logger.warning("cannot write spilled KV state %s: %s", path, exc)
            return False
        return True

    def _scan_disk(self) -> None:
        """Index our files by reading their headers only, least recently modified first."""
        assert self.disk_dir is not None
        found: list[tuple[float, _Entry]] = []
        foreign = 0
        for path in leftover_temp_files(self.disk_dir, FILE_SUFFIX):
            logger.info("removing leftover temporary file %s", path)
            with suppress(OSError):
                path.unlink()
        for path in self.disk_dir.glob(f"*{FILE_SUFFIX}"):
            try:
                read = self._read_file(path, load=False)
            except StateFileError as bad:
                foreign += bad.problem == "foreign"
                if bad.problem != "foreign":
                    logger.warning("skipping spilled KV state file %s: %s", path, bad)
                if bad.problem == "data":  # ours (the layout_key checks out) but partial
                    with suppress(OSError):
                        path.unlink()
                continue
            entry = _Entry(path.stem, read.header["namespace"], read.tokens, read.file_size, 0)
            found.append((read.mtime, entry))
        if foreign:
            logger.info("ignoring %d spilled KV state file(s) of another model or layout in %s", foreign, self.disk_dir)
        for _, e in sorted(found, key=lambda item: item[0]):
            e.last_used = self._tick()
            self._add(e, "disk")
        while self.disk_budget_bytes is not None and self._disk_bytes > self.disk_budget_bytes:
            self._evict_oldest_disk_entry()

    def _read_file(self, path: Path, *, load: bool) -> state_file.StateFile:
        """One of our files, checked (its state verified if `load`); else `StateFileError`."""
        read = state_file.read(path, CACHE_ENTRY, layout_key=self.layout_key, load=load)
        if not read.tokens:
            raise StateFileError("an entry without tokens", "header")
        if entry_key(self.layout_key, read.header["namespace"], read.tokens) != path.stem:
            raise StateFileError("file name does not match its header", "header")
        return read
